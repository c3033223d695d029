"""Cost of each sensitivity scorer relative to one forward+backward pass, and what global top-k adds.

For the embedded model (default) and one calibration set, prints per scorer: wall time of scoring, its ratio
to one forward+backward pass over the same calibration set (the gradient of the mean NLL), peak memory above
the loaded model and its ratio to that pass's peak, and the time added by streaming global top-k (target
≤ 20 % of the scoring time) and by the heavy-tail statistics.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` above the allocation before the step; on CPU, resident
set size sampled every 2 ms by a thread (psutil), above the RSS before the step — a sampled lower bound.
On Linux the glibc mmap threshold is pinned to 1 MiB first, so freed tensors go back to the OS and one
scorer's freed heap does not hide the next one's peak.

    HF_HUB_OFFLINE=1 python bench/score_cost.py [--device cuda] [--max-samples 4 --context-len 128]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import threading
import time

import psutil
import torch

from esa.models import ModelSpec, load_model
from esa.sensitivity.calibration import CalibrationSpec, calibration_batches
from esa.sensitivity.ranking import score_and_rank
from esa.sensitivity.scorers import SCORERS, ScoreOptions, mean_nll_grads, select_params


class PeakMemory:
    """Peak memory (bytes) above the level at entry, on CUDA exactly, on CPU by RSS sampling."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        self.proc, self.start, self.stop = psutil.Process(), psutil.Process().memory_info().rss, False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss - self.start)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.stop = True
            self.thread.join()


def pin_mmap_threshold(size: int = 1 << 20) -> None:
    """glibc: serve allocations ≥ size with mmap so that free() returns them (RSS then tracks live memory)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, size)  # M_MMAP_THRESHOLD
        except OSError:
            pass


def forward_backward(model, params, batches, device) -> tuple[float, int]:
    mean_nll_grads(model, params, batches[:1])  # warm-up, untimed
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        grads = mean_nll_grads(model, params, batches)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
    del grads
    return seconds, mem.peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--max-samples", type=int, default=4)
    ap.add_argument("--context-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--probes", type=int, default=2)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--scorers", nargs="+", default=SCORERS.names())
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    pin_mmap_threshold()

    loaded = load_model(ModelSpec(args.model, args.dtype, args.device))
    model, device = loaded.model, loaded.device
    params = select_params(model)
    calib = calibration_batches(loaded.tokenizer, CalibrationSpec("python-docs", args.max_samples,
                                                                  args.context_len, 0, args.batch_size))
    fb_s, fb_mem = forward_backward(model, params, calib.batches, device)
    print(f"model {args.model} on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
          f", {torch.get_num_threads()} threads); {sum(p.numel() for p in params.values()):,} weights in "
          f"{len(params)} tensors; calibration {len(calib.window_indices)}×{args.context_len} tokens")
    print(f"one forward+backward: {fb_s:.2f} s, peak +{fb_mem / 2**20:.0f} MiB")
    print(f"{'scorer':16} {'seconds':>8} {'× f+b':>6} {'peak MiB':>9} {'× f+b':>6} {'top-k s':>8} {'top-k +%':>8} "
          f"{'stats +%':>8}")
    rows = []
    for name in args.scorers:
        with PeakMemory(device) as mem:
            res = score_and_rank(model, params, calib.batches, name, args.k, "global",
                                 options=ScoreOptions(args.probes, 0))
        row = {"scorer": name, "score_seconds": res.score_seconds, "time_ratio": res.score_seconds / fb_s,
               "peak_bytes": mem.peak, "memory_ratio": mem.peak / max(fb_mem, 1),
               "topk_seconds": res.topk_seconds,
               "topk_added": res.topk_seconds / res.score_seconds, "stats_added": res.stats_seconds / res.score_seconds}
        rows.append(row)
        print(f"{name:16} {row['score_seconds']:8.2f} {row['time_ratio']:6.2f} {mem.peak / 2**20:9.0f} "
              f"{row['memory_ratio']:6.2f} {res.topk_seconds:8.3f} {100 * row['topk_added']:8.1f} "
              f"{100 * row['stats_added']:8.1f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"forward_backward_seconds": fb_s, "forward_backward_peak_bytes": fb_mem,
                       "device": str(device), "args": vars(args), "scorers": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
