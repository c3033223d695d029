"""Attention kernels × token budgets on ESA's scoring path: throughput ratios and NLL agreement.

Every (kernel, budget) cell scores the same python-docs windows with ``esa.evals.perplexity.score_batch``, the
function ``esa baseline`` runs, on a model loaded with that kernel (``--attention``, transformers'
``attn_implementation``). Two ratios come out of the same run:

* kernel: scored tokens/s over **eager** attention (transformers' reference implementation) at the same budget;
* budget: scored tokens/s over the same kernel at the **first** (smallest) budget.

Each cell's summed NLL per window is compared with eager attention at the first budget (same dtype); on CUDA the
peak allocated memory of the timed pass is printed as well. One micro-batch per cell is run untimed first.

    HF_HUB_OFFLINE=1 python bench/attention_kernels.py                        # embedded SmolLM2, fp32, CPU
    python bench/attention_kernels.py --model /tmp/rand-8b --device cuda --dtype bf16 --ctx 2048 \\
        --kernels eager sdpa flash_attention_2 --budgets 16384 65536 131072   # needs a GPU (flash: flash-attn)

A kernel that cannot be loaded here (flash-attn not installed) is reported as skipped with its one-line reason.
"""

from __future__ import annotations

import argparse

import torch
from scoring_common import add_scoring_args, clock, load, planned_batches, write_json

from esa.core.errors import EsaError
from esa.evals.perplexity import score_batch


@torch.inference_mode()
def timed_pass(model, batches, device) -> tuple[float, torch.Tensor, int | None]:
    """Seconds, summed NLL per window (float64) and peak CUDA bytes (None on CPU) of scoring ``batches``."""
    score_batch(model, *batches[0])  # untimed warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, nll = clock(device), []
    for ids, attn, scored in batches:
        nll.append(score_batch(model, ids, attn, scored)[0])
    seconds = clock(device) - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return seconds, torch.cat(nll).cpu(), peak


def measure(args) -> tuple[list[dict], list[str]]:
    """One row per (kernel, budget) cell that loads, and the one-line reasons of the kernels that do not."""
    rows, skipped, reference = [], [], None
    for kernel in args.kernels:
        try:
            lm, device = load(args, attention=kernel)
        except EsaError as exc:
            skipped.append(f"{kernel}: {exc}")
            continue
        for budget in args.budgets:
            batches = planned_batches(lm, args.ctx, budget, None, device, n_windows=args.windows)
            seconds, nll, peak = timed_pass(lm.model, batches, device)
            reference = nll if reference is None else reference
            scored = int(sum(b[2][:, 1:].sum() for b in batches))
            rows.append({"kernel": kernel, "budget": budget, "batch_rows": int(batches[0][0].shape[0]),
                         "seconds": seconds, "scored_tokens": scored, "tokens_per_second": scored / seconds,
                         "max_rel_nll_diff": float(((nll - reference).abs() / reference.abs()).max()),
                         "peak_bytes": peak})
        del lm
    return rows, skipped


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row plus ``over_eager`` (same budget) and ``over_first_budget`` (same kernel); None without a base."""
    rate = {(r["kernel"], r["budget"]): r["tokens_per_second"] for r in rows}
    first = min(r["budget"] for r in rows)
    return [{**r, "over_eager": (r["tokens_per_second"] / rate[("eager", r["budget"])]
                                 if ("eager", r["budget"]) in rate else None),
             "over_first_budget": r["tokens_per_second"] / rate[(r["kernel"], first)]
             if (r["kernel"], first) in rate else None} for r in rows]


def fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_scoring_args(p)
    p.add_argument("--kernels", nargs="+", default=["eager", "sdpa"],
                   help="attention kernels, eager first (it is the ratios' baseline)")
    p.add_argument("--budgets", nargs="+", type=int, default=[2048, 8192], help="token budgets, smallest first")
    p.add_argument("--windows", type=int, default=16, help="windows scored in every cell")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    rows, skipped = measure(args)
    rows = with_ratios(rows)
    print(f"{args.model} {args.dtype} on {args.device}, ctx {args.ctx}, {args.windows} windows per cell, "
          f"threads {torch.get_num_threads()}")
    print(f"{'kernel':<18} {'budget':>7} {'rows':>4} {'tok/s':>9} {'×eager':>7} {'×budget':>8} "
          f"{'NLL diff':>8} {'peak GiB':>8}")
    for r in rows:
        peak = None if r["peak_bytes"] is None else r["peak_bytes"] / 2**30
        print(f"{r['kernel']:<18} {r['budget']:>7} {r['batch_rows']:>4} {r['tokens_per_second']:>9.1f} "
              f"{fmt(r['over_eager'], '.2f'):>7} {fmt(r['over_first_budget'], '.2f'):>8} "
              f"{r['max_rel_nll_diff']:>8.1e} {fmt(peak, '.2f'):>8}")
    for line in skipped:
        print("skipped", line)
    write_json(args.json, {"args": vars(args), "rows": rows, "skipped": skipped})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
