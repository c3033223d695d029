"""Trials per second for K single-element edits of one weight matrix: batched rank-1 trials vs sequential
prefix-cached trials, in one run on the embedded SmolLM2-135M.

Both start from the same PrefixCache (the unperturbed residual stream entering the edited layer):

  (a) sequential — one ``esa.perturb.perturbed`` write per edit (bit-exact restore) + ``cache.score_params``;
  (b) batched    — ``esa.perturb.batched.score_edits``: ``--chunk`` edits per forward, each batch copy with its
                   own rank-1 correction Δ·x_j added to output channel i by a hook; no weight is written.

Edits: ``--k`` seeded random elements of ``--layer``'s MLP output projection, each moved by −8 × its row's
max |w| (large enough to move the loss). (b) is checked against (a) edit by edit (max relative NLL difference).
Both do the same FLOPs; what (b) saves is the per-trial overhead and small-matmul inefficiency, which is much
larger on a GPU than on a CPU. Clock: process CPU time, one thread (see bench/perturb_speed.py).

Measured (2026-12, shared 2-core CPU, one thread; bench/results/cpu/batched_trials_smollm2.txt): 32 edits of
layer 20's down_proj on 4 × 128 tokens: (a) 0.79 trials/s, (b) ×16 0.71 trials/s — 0.91×: on a CPU the stacked
forward buys nothing (same FLOPs, larger temporaries); equal to 2.4e-7 relative. Not measured on a GPU here.

    OMP_NUM_THREADS=1 .venv/bin/python bench/batched_trials.py [--k 32] [--chunk 16] [--layer 20]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from esa.data.corpora import load_corpus
from esa.data.windows import make_windows, select_windows
from esa.models import ModelSpec, load_model, pad_id
from esa.models.architectures import as_out_in, mlp_out_modules
from esa.perturb import TargetSet, make_op, perturbed
from esa.perturb.batched import score_edits
from esa.perturb.prefix_cache import PrefixCache


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--layer", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=4 * 127, help="scored evaluation tokens (128-token windows)")
    args = ap.parse_args()
    lm = load_model(ModelSpec("smollm2-135m"))
    ws = make_windows(lm.tokenizer, load_corpus("python-docs").documents, "chunks", 128)
    windows = select_windows(ws, args.tokens, 0).windows.windows
    name = f"{mlp_out_modules(lm.model)[args.layer][0]}.weight"
    cache = PrefixCache(lm.model, windows, pad_id(lm.tokenizer, lm.model), [args.layer])
    w = as_out_in(lm.model.get_parameter(name).detach(), lm.model)  # (out, in); Llama stores it so
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(0, w.shape[0], args.k), rng.integers(0, w.shape[1], args.k)
    deltas = (-8 * w.abs().amax(dim=1)[rows]).numpy().astype(np.float64) - w[rows, cols].numpy()
    t0 = time.process_time()
    seq = []
    for r, c, d in zip(rows, cols, deltas):
        value = float(w[r, c]) + d
        with perturbed(lm.model, TargetSet({name: torch.tensor([r * w.shape[1] + c])}), make_op("set", value=value)):
            seq.append(cache.score_params([name]).nll)
    t_seq = time.process_time() - t0
    t0 = time.process_time()
    batched = score_edits(cache, name, rows, cols, deltas, chunk=args.chunk)
    t_bat = time.process_time() - t0
    diff = float(np.max(np.abs(batched - np.stack(seq)) / np.abs(np.stack(seq))))
    print(f"{args.k} edits of {name}, {len(windows)} windows × 128 tokens, replay from layer {args.layer}")
    print(f"(a) sequential: {args.k / t_seq:.2f} trials/s   (b) batched ×{args.chunk}: {args.k / t_bat:.2f} trials/s"
          f"   (b)/(a) = {t_seq / t_bat:.2f}   max rel Δ NLL {diff:.1e}")


if __name__ == "__main__":
    main()
