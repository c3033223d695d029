"""Peak CPU memory of long-context scoring: chunked fp32 log-softmax (``score_batch``) vs full (T, V) logits.

At T tokens the unchunked path holds the fp32 logits (T, V) *and* their log-softmax (T, V): for SmolLM2
(V = 49152) at T = 8192 that is 2 × 1.6 GB. ``score_batch`` runs the backbone once and applies the head and
log-softmax to the scored positions only, ``HEAD_ELEMENTS // V`` of them at a time (``esa.evals.logprobs``), so
the head's share is bounded by ``HEAD_ELEMENTS`` fp32 logits.

How memory is measured (CPU): ``torch.profiler`` with ``profile_memory=True`` records every allocation and free
made through c10's CPU allocator (all CPU tensors, including the backbone's activations) with a nanosecond
timestamp; the running sum of those records in time order is the live tensor memory, and its maximum is the
peak *above what was live when profiling started* (the weights are excluded). It does not see memory that
kernels obtain outside the tensor allocator (oneDNN/MKL scratch, Python objects) — small next to (T, V)
buffers. Process RSS is coarse (it includes the weights, the allocator's cached pages and everything before
the measurement), so each (T, method) is also run in a fresh subprocess and its peak RSS (``ru_maxrss``) is
printed as a cross-check. ``tracemalloc`` does not see torch allocations at all.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python bench/longctx_memory.py --lengths 4096 8192

A single 8k forward of the 135M model takes minutes on one CPU core; the bench does four (two lengths × two
methods), each in its own process.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from esa.data.corpora import load_corpus
from esa.data.windows import make_windows
from esa.evals.logprobs import HEAD_ELEMENTS
from esa.evals.perplexity import collate, score_batch
from esa.models import ModelSpec, load_model

METHODS = ("chunked", "unchunked")


@torch.inference_mode()
def score_unchunked(model, ids, attn, scored):
    """Full logits (B, T-1, V) in fp32, one log-softmax over them, then gather — the naive evaluator."""
    logits = model(input_ids=ids[:, :-1], attention_mask=attn[:, :-1]).logits.float()  # (B, T-1, V)
    logprobs = torch.log_softmax(logits, dim=-1)  # (B, T-1, V): a second full-size buffer
    targets, mask = ids[:, 1:], scored[:, 1:]  # (B, T-1)
    tok_nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    correct = ((logits.argmax(-1) == targets) & mask).sum(1)
    return (tok_nll.double() * mask).sum(1), mask.sum(1), correct


def peak_live_bytes(prof) -> int:
    """Max of the running sum of allocator records (bytes allocated minus freed) since profiling began."""
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    records.sort(key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in records), initial=0))


def one_window(tokenizer, n_ids: int):
    """(ids, attn, scored) of one window holding the first ``n_ids`` tokens of python-docs (chunks method)."""
    docs = load_corpus("python-docs").documents
    ws = make_windows(tokenizer, docs, "chunks", ctx=n_ids, bos="never")
    return collate([ws.windows[0]], tokenizer.pad_token_id or 0)


def measure(n_ids: int, method: str) -> dict:
    """Peak live tensor bytes (profiler), peak process RSS and seconds of one scoring pass."""
    lm = load_model(ModelSpec(device="cpu", dtype="fp32"))
    ids, attn, scored = one_window(lm.tokenizer, n_ids)
    fn = score_batch if method == "chunked" else score_unchunked
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        nll, n, correct = fn(lm.model, ids, attn, scored)
    seconds = time.perf_counter() - start
    return {"tokens": n_ids, "method": method, "peak_live_bytes": peak_live_bytes(prof),
            "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "seconds": seconds, "nll": float(nll[0]), "n_scored": int(n[0]), "n_correct": int(correct[0])}


def run_isolated(n_ids: int, method: str) -> dict:
    """``measure`` in a fresh interpreter, so its peak RSS belongs to this measurement alone."""
    cmd = [sys.executable, __file__, "--one", str(n_ids), method]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def gib(x: float) -> str:
    return f"{x / 2**30:7.3f} GiB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192], help="window lengths in tokens")
    p.add_argument("--one", nargs=2, metavar=("TOKENS", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(int(args.one[0]), args.one[1])))
        return 0
    rows = []
    print(f"HEAD_ELEMENTS={HEAD_ELEMENTS}  threads={torch.get_num_threads()}")
    for n_ids in args.lengths:
        by = {m: run_isolated(n_ids, m) for m in METHODS}
        rows.extend(by.values())
        for m, r in by.items():
            print(f"T={n_ids:5d} {m:9s} peak live tensors {gib(r['peak_live_bytes'])}  "
                  f"process peak RSS {gib(r['process_peak_rss_bytes'])}  {r['seconds']:7.1f} s  "
                  f"nll={r['nll']:.4f} correct={r['n_correct']}")
        ratio = by["unchunked"]["peak_live_bytes"] / by["chunked"]["peak_live_bytes"]
        rss = by["unchunked"]["process_peak_rss_bytes"] / by["chunked"]["process_peak_rss_bytes"]
        same = abs(by["unchunked"]["nll"] - by["chunked"]["nll"]) / abs(by["chunked"]["nll"])
        print(f"T={n_ids:5d} unchunked/chunked: peak live tensors ×{ratio:.2f}, process RSS ×{rss:.2f}, "
              f"relative NLL difference {same:.1e}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
