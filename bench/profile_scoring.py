"""Where the time of ``esa baseline``'s scoring goes: ``torch.profiler`` over real micro-batches.

It scores the first planned micro-batches of python-docs windows with ``score_batch`` (the scoring pass of
``evaluate_windows``) under ``torch.profiler``, after one untimed warm-up batch. It then prints the top
operators by self time and each category's share of the profiled self time. The categories are: matmul
(linear layers and the head), attention kernels, normalisation, elementwise (activations, rotary, residual
adds), head log-softmax (log_softmax, gather, argmax), copies and indexing, and other. On CUDA the shares are of
device time (``self_device_time_total``); on CPU they are of CPU time. A Chrome trace can be written with
``--trace``.

    HF_HUB_OFFLINE=1 python bench/profile_scoring.py                            # embedded SmolLM2, CPU
    python bench/make_random_model.py llama-3.1-8b /tmp/rand-8b                 # needs a GPU for the next line
    python bench/profile_scoring.py --model /tmp/rand-8b --device cuda --dtype bf16 --ctx 2048 --token-budget 65536

The attention implementation the model runs (``config._attn_implementation``: sdpa, eager, …) is printed too.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch
from scoring_common import add_scoring_args, load, planned_batches, write_json
from torch.profiler import ProfilerActivity, profile

from esa.evals.perplexity import score_batch

CATEGORIES = (  # (category, pattern on the aten operator name); the first match wins
    ("attention", r"scaled_dot_product|flash|efficient_attention|cudnn_attention|_sdpa"),
    ("matmul", r"^aten::(mm|addmm|bmm|baddbmm|matmul|linear)$|gemm"),
    ("head log-softmax", r"log_softmax|gather|argmax|logsumexp"),
    ("normalisation", r"layer_norm|rms_norm|rsqrt|^aten::(pow|mean|var)$"),
    ("elementwise", r"^aten::(mul|add|sub|div|silu|gelu|tanh|neg|cos|sin|exp|sigmoid|where|masked_fill)_?$"),
    ("copies and indexing", r"copy|cat|index|slice|contiguous|to$|_to_copy|clone|fill|zero|empty|select|view"),
)


def category(name: str) -> str:
    return next((c for c, pattern in CATEGORIES if re.search(pattern, name)), "other")


def self_time(event, cuda: bool) -> float:
    return event.self_device_time_total if cuda else event.self_cpu_time_total


def profile_scoring(lm, batches, cuda: bool):
    """The profiler's key averages of scoring ``batches`` (µs), after scoring the warm-up batch untimed."""
    score_batch(lm.model, *batches[0])
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=False) as prof:
        for b in batches[1:]:
            score_batch(lm.model, *b)
        if cuda:
            torch.cuda.synchronize()
    return prof


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_scoring_args(p)
    p.add_argument("--batches", type=int, default=2, help="micro-batches profiled (after one warm-up)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--trace", help="write a Chrome trace (chrome://tracing, Perfetto) here")
    p.add_argument("--json", help="write the category shares and top operators here")
    args = p.parse_args(argv)
    lm, device = load(args)
    cuda = device.type == "cuda"
    batches = planned_batches(lm, args.ctx, args.token_budget, args.batches + 1, device)  # the first: warm-up
    prof = profile_scoring(lm, batches, cuda)
    if args.trace:
        prof.export_chrome_trace(args.trace)
    ops = [e for e in prof.key_averages() if e.key.startswith("aten::") and self_time(e, cuda) > 0]
    total = sum(self_time(e, cuda) for e in ops)
    shares = defaultdict(float)
    for e in ops:
        shares[category(e.key)] += self_time(e, cuda) / total
    tokens = sum(int(b[2][:, 1:].sum()) for b in batches[1:])
    clock = "device" if cuda else "CPU"
    print(f"{args.model} {args.dtype} on {'cuda' if cuda else 'cpu'}, attention "
          f"{getattr(lm.model.config, '_attn_implementation', '?')}, ctx {args.ctx}, token budget "
          f"{args.token_budget}, {len(batches) - 1} micro-batches ({tokens} scored tokens), threads "
          f"{torch.get_num_threads()}; profiled {clock} self time {total / 1e6:.2f} s")
    print("share of self time by category:")
    for name, share in sorted(shares.items(), key=lambda kv: -kv[1]):
        print(f"  {name:22s} {share:6.1%}")
    print(f"top {args.top} operators by self {clock} time:")
    top = sorted(ops, key=lambda e: -self_time(e, cuda))[: args.top]
    for e in top:
        print(f"  {e.key:40s} {self_time(e, cuda) / 1e3:10.1f} ms  {self_time(e, cuda) / total:6.1%}  "
              f"calls {e.count:6d}  [{category(e.key)}]")
    write_json(args.json, {
        "model": args.model, "dtype": args.dtype, "cuda": cuda, "ctx": args.ctx, "token_budget": args.token_budget,
        "scored_tokens": tokens, "self_seconds": total / 1e6,
        "attn_implementation": getattr(lm.model.config, "_attn_implementation", None), "shares": dict(shares),
        "top": [{"op": e.key, "self_ms": self_time(e, cuda) / 1e3, "calls": e.count, "category": category(e.key)}
                for e in top]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
