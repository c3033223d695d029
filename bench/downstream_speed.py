"""Items per second for zero-shot evaluation under perturbation: four ways of scoring the same items, one run.

Each trial zeroes one seeded element of a decoder layer's MLP output projection (through ``esa.perturb.perturbed``,
bit-exact restore) and scores every option of every item. The four ways:

  (a) plain, full   — one window per option, full forward per trial (the baseline: what lm-eval does per model);
  (b) plain, prefix — one window per option, re-run only layers L.. from the prefix cache;
  (c) shared, full  — one packed sequence per item (esa.evals.shared_context), full forward;
  (d) shared, prefix — packed sequences from the prefix cache: what ESA's protocols use.

Every way is checked against (a) trial by trial (max relative difference of the option log-likelihoods). Trials
target layers spread over the depth (``--layers``, default 1, 15, 28 of SmolLM2's 30), so the prefix-cache gain
is that of a sweep over those depths. Tokens read per trial are printed for the plain and packed layouts.

Clock: process CPU time with one thread (OMP_NUM_THREADS=1), the steadier number on a shared machine
(bench/perturb_speed.py explains why). Default: the embedded SmolLM2-135M, 100 corpus_mc items (4 options:
context 24, span 8) plus the shipped arc_easy and piqa samples; ~25 CPU-minutes.

Measured (2026-12, shared 2-core CPU, one thread; bench/results/cpu/downstream_speed_smollm2.txt): 144 items,
531 options, 21,859 plain vs 9,494 packed tokens per trial; items/s (a) 0.8, (b) 1.4 (1.63×), (c) 1.8 (2.12×),
(d) 3.0 (3.64×); option log-likelihoods equal to 3e-6 relative.

    OMP_NUM_THREADS=1 .venv/bin/python bench/downstream_speed.py [--items 100] [--layers 1 15 28]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from esa.evals.shared_context import pack, unit_length
from esa.evals.tasks import load_task_data
from esa.evals.zeroshot import build_requests
from esa.models import ModelSpec, load_model, max_positions, pad_id
from esa.models.architectures import mlp_out_modules
from esa.perturb import TargetSet, make_op, perturbed
from esa.perturb.prefix_cache import PrefixCache
from esa.perturb.protocols.downstream import TaskSet, request_windows

FIX = Path(__file__).resolve().parents[1] / "tests" / "evals" / "fixtures"


def task_requests(lm, items: int):
    """All requests of the benchmark's tasks, task after task (options of an item adjacent)."""
    max_length = max_positions(lm.model)
    out = []
    for name, path, limit in (("corpus_mc:python-docs:context=24:span=8", None, items),
                              ("arc_easy", str(FIX / "arc_easy.jsonl"), None), ("piqa", str(FIX / "piqa.jsonl"), None)):
        data = load_task_data(name, path, limit, 0)
        out.append(TaskSet(data, build_requests(lm.tokenizer, data, max_length), 0))
    return out, max_length


def trial_params(lm, layers: list[int]) -> list[tuple[str, int]]:
    """(parameter, flat index) per trial: one seeded element of each layer's MLP output projection."""
    rng = np.random.default_rng(0)
    out = []
    for layer in layers:
        name = f"{mlp_out_modules(lm.model)[layer][0]}.weight"
        out.append((name, int(rng.integers(0, lm.model.get_parameter(name).numel()))))
    return out


def run(cache: PrefixCache, model, trials, use_prefix: bool) -> tuple[float, list[np.ndarray]]:
    """Process-CPU seconds over all trials and each trial's per-option log-likelihoods."""
    lls, spent = [], 0.0
    for name, idx in trials:
        with perturbed(model, TargetSet({name: torch.tensor([idx])}), make_op("zero")):
            t0 = time.process_time()
            scores = cache.score_params([name]) if use_prefix else cache.score_full()
            spent += time.process_time() - t0
        lls.append(-scores.nll)
    return spent, lls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=100, help="corpus_mc items (the shipped samples add 40)")
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 15, 28])
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model(ModelSpec("smollm2-135m"))
    sets, max_length = task_requests(lm, args.items)
    requests = [r for s in sets for r in s.requests]
    n_items = sum(len(s.data.items) for s in sets)
    pad = pad_id(lm.tokenizer, lm.model)
    plain = request_windows(requests, max_length)
    shared = pack([(r.item, r.context, r.continuation) for r in requests], max_length)
    trials = trial_params(lm, args.layers)
    layers = sorted(args.layers)
    caches = {"plain": PrefixCache(lm.model, plain, pad, layers), "shared": PrefixCache(lm.model, shared, pad, layers)}
    print(f"{n_items} items, {len(requests)} options; tokens read per trial: plain "
          f"{sum(unit_length(w) - 1 for w in plain)}, shared {sum(unit_length(u) for u in shared)}; "
          f"trials at layers {args.layers}")
    ways = {"(a) plain, full": ("plain", False), "(b) plain, prefix": ("plain", True),
            "(c) shared, full": ("shared", False), "(d) shared, prefix": ("shared", True)}
    results = {way: run(caches[layout], lm.model, trials, prefix) for way, (layout, prefix) in ways.items()}
    base_s, base_ll = results["(a) plain, full"]
    print(f"{'way':20} {'items/s':>9} {'× (a)':>7} {'max rel Δ ll vs (a)':>20}")
    for way, (seconds, lls) in results.items():
        rate = n_items * len(trials) / seconds
        diff = max(float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-12))) for x, y in zip(lls, base_ll))
        print(f"{way:20} {rate:9.1f} {base_s / seconds:7.2f} {diff:20.2e}")


if __name__ == "__main__":
    main()
