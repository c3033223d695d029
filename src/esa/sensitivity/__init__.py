"""Weight sensitivity: which individual weights matter most to a model's loss.

The pipeline is ``calibration`` (seeded windows → (B, T) batches) → ``scorers`` (one fp32 score tensor per
parameter, produced lazily) → ``topk`` (streaming per-tensor ``torch.topk`` merged into a global or per-layer
candidate set, so at most one full-size score tensor is alive at a time) → ``ranking`` (a table with
(out, in) coordinates, written as parquet and CSV) → ``stability`` (top-k overlap across calibration seeds,
comparison of two rankings, heavy-tail statistics of the score distribution) → ``plots``.
Super-weight detection lives in ``superweights``.
"""
