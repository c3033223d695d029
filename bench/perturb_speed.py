"""Trials per second for single-weight perturbations: deep copy vs in-place vs in-place + prefix cache.

Each trial sets one element of ``model.layers.{L}.mlp.down_proj.weight`` (a seeded random index, value
``-8 × |w|max`` of that row, large enough to move the loss) and scores the same fixed windows. Three ways:

  (a) copy   — ``copy.deepcopy(model)`` per trial, perturb the copy, full forward (the old tool's way);
  (b) inplace — perturb in place, full forward, restore (what ``esa.perturb.perturbed`` does);
  (c) prefix — perturb in place, re-run only layers L.. + final norm + head from a PrefixCache, restore.

All three run in the same process on the same windows for an early, a middle and a late layer; (c) is checked
against (b) trial by trial (max relative per-window NLL difference). The bench does not set a thread count:
torch follows OMP_NUM_THREADS (on a shared machine, set it to 1 — oversubscribed threads make every number
several times slower and noisy). The default run (8 windows × 128 tokens, 3 trials) takes ~2-3 min on one
CPU core.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python bench/perturb_speed.py [--trials 3]
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from esa.data.corpora import load_corpus
from esa.data.windows import make_windows, select_windows
from esa.evals.perplexity import score_batch
from esa.models import ModelSpec, load_model
from esa.perturb.context import perturbed
from esa.perturb.ops import make_op
from esa.perturb.prefix_cache import PrefixCache
from esa.perturb.targets import TargetSet

PARAM = "model.layers.{}.mlp.down_proj.weight"


def nudge(model, name: str, flat_index: int, value: float):
    """Set one stored weight element through ``perturbed`` (ESA's only weight writer; bit-exact restore)."""
    return perturbed(model, TargetSet({name: torch.tensor([flat_index])}), make_op("set", value=value))


def make_trials(model, layer: int, n: int, seed: int) -> list[tuple[str, int, float]]:
    """(param name, flat index, new value) per trial, seeded per layer so every method sees the same trials."""
    name = PARAM.format(layer)
    weight = dict(model.named_parameters())[name].detach()  # (D, I) out × in
    rng = np.random.default_rng(seed + layer)
    picks = rng.integers(0, weight.numel(), size=n)
    rows = weight.abs().amax(dim=1)  # (D,)
    return [(name, int(i), float(-8 * rows[int(i) // weight.shape[1]])) for i in picks]


def full_forward(model, cache: PrefixCache) -> np.ndarray:
    """Per-window NLL (W,) of ``model`` on the cache's fixed micro-batches, by a plain full forward."""
    return np.concatenate([score_batch(model, b.ids, b.attn, b.scored)[0].numpy() for b in cache.batches])


def run_copy(model, cache, trials) -> list[np.ndarray]:
    out = []
    for name, idx, value in trials:
        clone = copy.deepcopy(model)
        with torch.no_grad():
            dict(clone.named_parameters())[name].view(-1)[idx] = value
        out.append(full_forward(clone, cache))
        del clone
    return out


def run_inplace(model, cache, trials) -> list[np.ndarray]:
    out = []
    for name, idx, value in trials:
        with nudge(model, name, idx, value):
            out.append(full_forward(model, cache))
    return out


def run_prefix(model, cache, trials) -> list[np.ndarray]:
    out = []
    for name, idx, value in trials:
        with nudge(model, name, idx, value):
            scores = cache.score_params([name])
        assert not scores.full_forward, scores.reason
        out.append(scores.nll)
    return out


METHODS = {"copy": run_copy, "inplace": run_inplace, "prefix": run_prefix}


def time_method(fn, model, cache, trials) -> tuple[float, float, list[np.ndarray]]:
    """Trials per wall second and per process-CPU second of ``fn`` (the cache build was the warm-up).

    CPU time is the steadier number on a shared machine with one torch thread: it excludes time spent waiting
    for a core. With several threads it sums over them and stops being comparable to wall time.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    nlls = fn(model, cache, trials)
    return len(trials) / (time.perf_counter() - wall), len(trials) / (time.process_time() - cpu), nlls


def max_rel(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x / y - 1))) for x, y in zip(a, b))


def bench_layer(model, cache, layer: int, n: int, seed: int) -> dict:
    trials = make_trials(model, layer, n, seed)
    row = {"layer": layer}
    results = {}
    for key, fn in METHODS.items():
        row[key], row[f"{key}_cpu"], results[key] = time_method(fn, model, cache, trials)
    row["rel_diff_prefix_vs_inplace"] = max_rel(results["prefix"], results["inplace"])
    row["rel_diff_copy_vs_inplace"] = max_rel(results["copy"], results["inplace"])
    row["mean_dnll_per_token"] = float(np.mean([(r - cache.baseline.nll).sum() for r in results["inplace"]])
                                       / cache.baseline.n_scored.sum())
    return row


def print_table(rows: list[dict], unit: str, suffix: str) -> None:
    """One table of trials per ``unit`` for keys ``copy{suffix}``, ``inplace{suffix}``, ``prefix{suffix}``."""
    head = (f"{'layer':>5} {'(a) copy':>10} {'(b) inplace':>12} {'(c) prefix':>11} {'b/a':>6} "
            f"{'c/a':>6} {'c/b':>6} {'max rel Δ c~b':>14} {'mean ΔNLL/tok':>14}")
    print(f"trials per {unit}\n{head}\n{'-' * len(head)}")
    for r in rows:
        a, b, c = r[f"copy{suffix}"], r[f"inplace{suffix}"], r[f"prefix{suffix}"]
        print(f"{r['layer']:>5} {a:>10.3f} {b:>12.3f} {c:>11.3f} {b / a:>6.2f} {c / a:>6.2f} {c / b:>6.2f} "
              f"{r['rel_diff_prefix_vs_inplace']:>14.2e} {r['mean_dnll_per_token']:>14.4f}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=3, help="timed trials per (method, layer)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="default: 2, L/2, L-2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    lm = load_model(ModelSpec(device=args.device))
    model, n_layers = lm.model, lm.model.config.num_hidden_layers
    layers = args.layers or [2, n_layers // 2, n_layers - 2]
    ws = make_windows(lm.tokenizer, load_corpus("python-docs").documents, method="chunks", ctx=args.ctx)
    windows = select_windows(ws, args.windows * (args.ctx - 1), args.seed).windows.windows[:args.windows]
    start = time.perf_counter()
    cache = PrefixCache(model, windows, lm.tokenizer.pad_token_id or 0, layers=layers)
    build = time.perf_counter() - start
    print(f"model {lm.fingerprint.model_id} ({n_layers} layers, {lm.fingerprint.dtype}) on {lm.device}, "
          f"torch threads {torch.get_num_threads()}; {len(windows)} windows × {args.ctx} tokens, "
          f"{int(cache.baseline.n_scored.sum())} scored; {args.trials} timed trials per cell")
    print(f"prefix cache: layers {list(cache.layers)}, {cache.nbytes / 2**20:.1f} MiB, "
          f"build {build:.2f} s (one full forward + capture + verify)\n")
    rows = [bench_layer(model, cache, layer, args.trials, args.seed) for layer in layers]
    print_table(rows, "wall-clock second", "")
    print()
    print_table(rows, "process-CPU second", "_cpu")
    print("\nb/a, c/a, c/b are speed ratios; 'max rel Δ c~b' compares per-window NLL of (c) and (b); "
          "(a) vs (b) max rel Δ: " + ", ".join(f"{r['rel_diff_copy_vs_inplace']:.1e}" for r in rows))


if __name__ == "__main__":
    main()
