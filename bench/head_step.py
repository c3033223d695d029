"""The head step: scored positions only (ESA now) vs every position of the batch (ESA before, the baseline).

Both methods score the same batches of real windows from the same backbone states, so the difference is the
head step alone. The baseline is the earlier ``score_states``, reproduced here: it sent every position of a
(B, T) batch through the head and the fp32 log-softmax, ``POSITIONS`` positions of all B rows at a time, and
masked the unscored ones afterwards. ESA now sends only the masked positions, ``HEAD_ELEMENTS // V`` tokens at a
time (``esa.evals.logprobs``). The bench prints, per window method, the head-step seconds of each method, the
whole ``score_batch`` seconds (backbone + head) and the peak live tensor memory above the backbone states. It
also checks that the two methods' NLLs agree.

How memory is measured: ``torch.profiler`` allocator records, as in ``bench/longctx_memory.py``. On CUDA it uses
``torch.cuda.max_memory_allocated`` instead.

    HF_HUB_OFFLINE=1 python bench/head_step.py                      # embedded SmolLM2, fp32, CPU
    python bench/head_step.py --model /tmp/rand-8b --device cuda --dtype bf16 --ctx 2048   # needs a GPU

Methods: ``sliding`` (stride ctx/4: a quarter of the positions scored), ``rolling`` (lm-eval's protocol: each
document's last window scores only its new tokens) and ``chunks`` (every position but the first scored).
"""

from __future__ import annotations

import argparse

import torch
from longctx_memory import peak_live_bytes
from scoring_common import add_scoring_args, clock, load, planned_batches, write_json
from torch.profiler import ProfilerActivity, profile

from esa.evals.logprobs import HEAD_ELEMENTS, hidden_and_head, score_states

POSITIONS = 512  # the baseline's positions per chunk (of every row of the batch at once)


def score_every_position(states, head_fn, targets, mask):
    """The baseline (ESA's earlier head step): all B·T positions through the head, masked afterwards."""
    B, T = targets.shape
    nll = torch.zeros(B, dtype=torch.float64, device=states.device)
    correct = torch.zeros(B, dtype=torch.long, device=states.device)
    for s in range(0, T, POSITIONS):
        logits = head_fn(states[:, s:s + POSITIONS]).float()  # (B, t, V) fp32
        logprobs = torch.log_softmax(logits, dim=-1)
        tgt, m = targets[:, s:s + POSITIONS], mask[:, s:s + POSITIONS]
        tok_nll = -logprobs.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # (B, t)
        nll += torch.where(m, tok_nll, 0.0).sum(1, dtype=torch.float64)
        correct += ((logits.argmax(-1) == tgt) & m).sum(1)
    return nll.cpu(), mask.sum(1).cpu(), correct.cpu()


METHODS = {"positions": score_every_position, "scored": score_states}


@torch.inference_mode()
def head_seconds(fn, states, head_fn, work, device, repeats: int) -> tuple[float, list]:
    """Best of ``repeats`` over the batches: seconds of the head step alone, and its outputs."""
    best, outs = float("inf"), []
    for _ in range(repeats):
        start, outs = clock(device), []
        for s, (_, targets, mask) in zip(states, work):
            outs.append(fn(s, head_fn, targets, mask))
        best = min(best, clock(device) - start)
    return best, outs


@torch.inference_mode()
def peak_bytes(fn, states, head_fn, work, device) -> int:
    """Peak live tensor bytes of the head step above what is live before it (the backbone states)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for s, (_, targets, mask) in zip(states, work):
            fn(s, head_fn, targets, mask)
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for s, (_, targets, mask) in zip(states, work):
            fn(s, head_fn, targets, mask)
    return peak_live_bytes(prof)


@torch.inference_mode()
def run(lm, method: str, args, device) -> dict:
    stride = args.ctx // 4 if method == "sliding" else None
    work = [({"input_ids": ids[:, :-1], "attention_mask": attn[:, :-1]}, ids[:, 1:], scored[:, 1:])
            for ids, attn, scored in planned_batches(lm, args.ctx, args.token_budget, args.max_batches, device,
                                                     method, stride)]
    start = clock(device)
    split = [hidden_and_head(lm.model, forward) for forward, _, _ in work]
    backbone = clock(device) - start
    states, head_fn = [s for s, _ in split], split[0][1]
    if head_fn is None:
        raise SystemExit("this architecture has no exact head split; the head step does not apply")
    row = {"method": method, "windows": sum(len(m) for _, _, m in work),
           "positions": sum(m.numel() for _, _, m in work), "scored": int(sum(m.sum() for _, _, m in work)),
           "backbone_seconds": backbone}
    nll = {}
    for name, fn in METHODS.items():
        seconds, outs = head_seconds(fn, states, head_fn, work, device, args.repeats)
        nll[name] = torch.cat([o[0] for o in outs])
        row[f"{name}_head_seconds"] = seconds
        row[f"{name}_peak_bytes"] = peak_bytes(fn, states, head_fn, work, device)
    row["head_speedup"] = row["positions_head_seconds"] / row["scored_head_seconds"]
    row["score_speedup"] = ((backbone + row["positions_head_seconds"]) / (backbone + row["scored_head_seconds"]))
    row["memory_ratio"] = row["positions_peak_bytes"] / row["scored_peak_bytes"]
    row["max_rel_nll_diff"] = float(((nll["scored"] - nll["positions"]).abs()
                                     / nll["positions"].abs().clamp_min(1e-12)).max())
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_scoring_args(p)
    p.add_argument("--max-batches", type=int, default=4, help="micro-batches scored per window method")
    p.add_argument("--methods", nargs="+", default=["sliding", "rolling", "chunks"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    lm, device = load(args)
    print(f"{args.model} {args.dtype} on {device}, ctx {args.ctx}, token budget {args.token_budget}, "
          f"HEAD_ELEMENTS={HEAD_ELEMENTS}, baseline chunk {POSITIONS} positions, threads {torch.get_num_threads()}")
    rows = []
    for method in args.methods:
        r = run(lm, method, args, device)
        rows.append(r)
        print(f"{method:8s} {r['windows']:3d} windows, {r['scored']}/{r['positions']} positions scored | head: "
              f"every position {r['positions_head_seconds']:.3f} s, scored only {r['scored_head_seconds']:.3f} s "
              f"→ {r['head_speedup']:.2f}× | score_batch (backbone {r['backbone_seconds']:.3f} s) "
              f"{r['score_speedup']:.2f}× | peak head memory {r['positions_peak_bytes'] / 2**20:.0f} → "
              f"{r['scored_peak_bytes'] / 2**20:.0f} MiB ({r['memory_ratio']:.2f}×) | "
              f"max rel NLL diff {r['max_rel_nll_diff']:.1e}")
    write_json(args.json, rows)
    return 0 if all(r["max_rel_nll_diff"] < 1e-6 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
