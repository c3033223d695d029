"""How much a ranking can be trusted: overlap across seeds, comparison of two rankings, heavy tails.

* :func:`jaccard` — |A ∩ B| / |A ∪ B| of two top-k sets of weights, a weight being (param, row, col).
* :func:`compare_rankings` — Jaccard plus Spearman's ρ over the *union* of two ranking tables. A weight
  missing from one table is given rank ``len(table) + 1`` there (tied, below every listed weight), so
  disagreement about membership lowers ρ instead of being dropped. Example: A ranks x, y (1, 2) and B
  ranks y, z (1, 2): on the union (x, y, z) the ranks are A = (1, 2, 3), B = (3, 1, 2).
* :class:`TailStats` — fed one score tensor at a time: the exact share of the total score held by the top
  0.1 % and 1 % of weights (a pool of candidate values above the running m-th largest, m = 1 % of the
  weights, compacted to its m largest when it reaches 2m), and the Gini coefficient from per-bucket counts and
  sums, with the 32768 buckets cut on the float32 bit pattern (exponent + 7 mantissa bits, relative width
  ≤ 2⁻⁷). Cross-bucket pairs are
  exact; within-bucket pairs are bounded, so the Gini is reported with a guaranteed interval
  [gini_low, gini_high] whose width is ≤ 2⁻⁸. A random sample (for the histogram only) is kept as well.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

KEY = ["param", "row", "col"]
BUCKET_SHIFT = 16  # keep sign + 8 exponent + 7 mantissa bits of the float32 pattern
N_BUCKETS = 1 << (32 - BUCKET_SHIFT - 1)  # non-negative floats only
CHUNK = 1 << 24  # elements per bucketing step (bounds the float64 temporary)


def weight_keys(table: pd.DataFrame) -> list[tuple]:
    """(param, row, col) per ranking row; a 1-D parameter's missing col becomes -1."""
    col = table["col"].astype("Int64").fillna(-1).astype(np.int64)
    return list(zip(table["param"].astype(str), table["row"].astype(np.int64), col))


def jaccard(a: set, b: set) -> float:
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def seed_overlap(tables: dict[int, pd.DataFrame]) -> dict:
    """Pairwise Jaccard of the top-k sets of rankings made with different calibration seeds."""
    sets = {s: set(weight_keys(t)) for s, t in tables.items()}
    pairs = {f"{a}-{b}": jaccard(sets[a], sets[b]) for a, b in itertools.combinations(sorted(sets), 2)}
    values = list(pairs.values())
    return {"seeds": sorted(sets), "jaccard_pairs": pairs,
            "jaccard_mean": float(np.mean(values)) if values else None,
            "jaccard_min": float(np.min(values)) if values else None}


def compare_rankings(a: pd.DataFrame, b: pd.DataFrame) -> dict:
    """Jaccard and Spearman ρ (scipy) of two ranking tables over the union of their weights."""
    rank_a = dict(zip(weight_keys(a), a["rank"].astype(np.int64)))
    rank_b = dict(zip(weight_keys(b), b["rank"].astype(np.int64)))
    union = sorted(set(rank_a) | set(rank_b))
    ra = np.array([rank_a.get(k, len(a) + 1) for k in union], dtype=np.float64)
    rb = np.array([rank_b.get(k, len(b) + 1) for k in union], dtype=np.float64)
    rho = sps.spearmanr(ra, rb).statistic if len(union) > 1 else float("nan")
    return {"n_a": len(a), "n_b": len(b), "n_common": len(set(rank_a) & set(rank_b)), "n_union": len(union),
            "jaccard": jaccard(set(rank_a), set(rank_b)), "spearman_union": float(rho)}


class TailStats:
    """Streaming distribution statistics of non-negative scores (negative ones are taken as |score|)."""

    def __init__(self, total: int, sample_size: int = 200_000, seed: int = 0,
                 fractions: tuple[float, ...] = (0.001, 0.01)) -> None:
        self.total, self.fractions, self.sample_size = total, fractions, sample_size
        self.m = max(1, math.ceil(max(fractions) * total))  # size of the exact top buffer
        self._pool: list[torch.Tensor] = []  # candidate top values (CPU), at most ~2m + one tensor between compactions
        self._pool_n = 0
        self._threshold: float | None = None  # m-th largest value seen so far, once m values were seen
        self._count = np.zeros(N_BUCKETS, dtype=np.int64)
        self._sum = np.zeros(N_BUCKETS, dtype=np.float64)
        self._samples: list[np.ndarray] = []
        self._gen = torch.Generator().manual_seed(seed)
        self.n_seen = self.n_nonfinite = self.n_zero = 0

    def add(self, score: torch.Tensor) -> None:
        flat = score.detach().reshape(-1).float()
        self.n_seen += flat.numel()
        finite = torch.isfinite(flat)
        if not bool(finite.all()):
            self.n_nonfinite += int((~finite).sum())
            flat = flat[finite]
        if flat.numel() and bool((flat < 0).any()):
            flat = flat.abs()
        self.n_zero += int((flat == 0).sum())
        self._add_top(flat)
        self._add_buckets(flat)
        self._add_sample(flat)

    def _add_top(self, flat: torch.Tensor) -> None:
        """Pool values above the threshold; compact the pool to its m largest when it reaches 2m."""
        if self._threshold is not None:
            flat = flat[flat > self._threshold]  # equal values cannot change the sum of the top m
        self._pool.append(flat.to("cpu", copy=True))  # a copy: never keep the caller's score tensor alive
        self._pool_n += flat.numel()
        if self._pool_n >= 2 * self.m:
            self._compact()

    def _compact(self) -> None:
        merged = torch.cat(self._pool) if self._pool else torch.zeros(0)
        top = torch.topk(merged, min(self.m, len(merged))).values  # sorted, largest first
        self._pool, self._pool_n = [top], len(top)
        if len(top) == self.m:
            self._threshold = float(top[-1])

    def _add_buckets(self, flat: torch.Tensor) -> None:
        for s in range(0, flat.numel(), CHUNK):
            part = flat[s:s + CHUNK]
            keys = (part.view(torch.int32) >> BUCKET_SHIFT).long()  # monotone in value for x ≥ 0
            self._count += torch.bincount(keys, minlength=N_BUCKETS).cpu().numpy()
            self._sum += torch.bincount(keys, weights=part.double(), minlength=N_BUCKETS).cpu().numpy()

    def _add_sample(self, flat: torch.Tensor) -> None:
        n = min(flat.numel(), math.ceil(flat.numel() * self.sample_size / max(self.total, 1)))
        if n:
            idx = torch.randint(0, flat.numel(), (n,), generator=self._gen).to(flat.device)
            self._samples.append(flat[idx].cpu().numpy())

    def sample(self) -> np.ndarray:
        """A uniform random sample (with replacement) of the finite scores, for histograms only."""
        return np.concatenate(self._samples) if self._samples else np.zeros(0, dtype=np.float32)

    def _gini_bounds(self) -> tuple[float, float]:
        c, s = self._count, self._sum
        n, total = c.sum(), s.sum()
        if n == 0 or total <= 0:
            return float("nan"), float("nan")
        # Σ_{i<j buckets} (c_i s_j − c_j s_i): exact sum of |x − y| over pairs in different buckets.
        cross = float((np.cumsum(c)[:-1] * s[1:]).sum() - (np.cumsum(s)[:-1] * c[1:]).sum())
        lo_edge = (np.arange(N_BUCKETS, dtype=np.int64) << BUCKET_SHIFT).astype(np.int32).view(np.float32)
        hi_edge = ((np.arange(N_BUCKETS, dtype=np.int64) + 1) << BUCKET_SHIFT).astype(np.uint32)
        hi_edge = np.minimum(hi_edge, 0x7F800000).astype(np.int32).view(np.float32)
        used = c > 0
        width = hi_edge[used].astype(np.float64) - lo_edge[used].astype(np.float64)
        # Over ordered pairs inside one bucket Σ|x − y| ≤ c²·width/2 (two-point extreme); G halves it again.
        within = float((c[used].astype(np.float64) ** 2 * width / 4).sum())
        scale = float(n) ** 2 * (total / n)  # N² μ
        return cross / scale, min(1.0, (cross + within) / scale)

    def result(self) -> dict:
        finite_total = float(self._sum.sum())
        self._compact()
        top = self._pool[0].double().numpy()
        cum = np.cumsum(top)
        shares = {}
        for q in self.fractions:
            m = max(1, math.ceil(q * self.total))
            shares[f"top_{q * 100:g}pct_share"] = float(cum[min(m, len(cum)) - 1] / finite_total) \
                if len(cum) and finite_total > 0 else float("nan")
        low, high = self._gini_bounds()
        return {"n_weights": self.n_seen, "n_nonfinite": self.n_nonfinite, "score_sum": finite_total,
                "score_max": float(top[0]) if len(top) else float("nan"), **shares,
                "gini": (low + high) / 2, "gini_low": low, "gini_high": high, "n_zero": self.n_zero}
