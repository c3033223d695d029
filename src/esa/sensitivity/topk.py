"""Streaming top-k (or bottom-k) over per-parameter score tensors, without Python loops over elements.

Order: a candidate is better when its score is larger (smaller for bottom-k); ties are broken by the
parameter's position in the stream (``named_parameters()`` order), then by the lower flat index into the
parameter's storage. This total order makes results deterministic and equal to a brute-force stable sort
of all scores (``torch.topk`` alone does not define which of several equal values it returns).

Modes:

* ``global`` — the k best weights of the whole model. Each tensor contributes its own k best (a superset
  of its share of the global k best), which are merged with the running k best; so memory is O(k) plus the
  one score tensor being processed.
* ``per_layer`` — the k best weights of every tensor (the name follows the ESA issue: "layer" means one
  weight tensor of a decoder layer), ranked 1..k within each tensor.

NaN scores are never selected while a finite candidate remains (they rank last in either direction).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from esa.errors import EsaError

MODES = ("global", "per_layer")


@dataclass(frozen=True)
class Candidates:
    """Selected weights, best first (per_layer: grouped by parameter, best first within each)."""

    score: np.ndarray  # (n,) float64
    param: np.ndarray  # (n,) int64 index into the stream's parameter order
    flat: np.ndarray  # (n,) int64 flat index into the parameter's storage
    weight: np.ndarray  # (n,) float64 weight value at that position
    rank: np.ndarray  # (n,) int64, 1-based (global: over the model; per_layer: within the tensor)

    def __len__(self) -> int:
        return len(self.score)


def _empty() -> Candidates:
    z = np.zeros(0, dtype=np.int64)
    return Candidates(np.zeros(0), z, z, np.zeros(0), z)


def tensor_topk(score: torch.Tensor, k: int, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best entries of one tensor as (values, flat indices), best first, ties → lower index.

    Two passes over the tensor: ``torch.topk`` finds the k-th best value, one comparison collects every
    entry at least that good (k plus any extra ties, ascending index), and a stable sort of those few
    orders them by value while keeping ties in index order.
    """
    flat = score.reshape(-1)
    k = min(k, flat.numel())
    kth = torch.topk(flat, k, largest=largest, sorted=False).values
    if torch.isnan(kth).any():  # topk ranks NaN above everything; push NaN to the end and redo
        flat = torch.nan_to_num(flat, nan=-torch.inf if largest else torch.inf)
        kth = torch.topk(flat, k, largest=largest, sorted=False).values
    edge = kth.min() if largest else kth.max()  # the k-th best value
    idx = ((flat >= edge) if largest else (flat <= edge)).nonzero().squeeze(1)  # (≥ k,) ascending
    order = torch.sort(flat[idx], descending=largest, stable=True).indices[:k]  # stable: ties keep index order
    idx = idx[order]
    return score.reshape(-1)[idx], idx


def _order(score: np.ndarray, param: np.ndarray, flat: np.ndarray, largest: bool) -> np.ndarray:
    """Permutation sorting candidates best first by (score, param, flat); NaN last."""
    key = np.where(np.isnan(score), -np.inf if largest else np.inf, score)
    return np.lexsort((flat, param, -key if largest else key))


def merge(a: Candidates, b: Candidates, k: int, largest: bool) -> Candidates:
    """The ``k`` best of the union of two candidate sets, ranked 1..k."""
    score, param = np.concatenate([a.score, b.score]), np.concatenate([a.param, b.param])
    flat, weight = np.concatenate([a.flat, b.flat]), np.concatenate([a.weight, b.weight])
    keep = _order(score, param, flat, largest)[:k]
    return Candidates(score[keep], param[keep], flat[keep], weight[keep], np.arange(1, len(keep) + 1))


class TopK:
    """Feed ``add(param_index, score, weight)`` one tensor at a time; read ``result()`` at the end."""

    def __init__(self, k: int, mode: str = "global", largest: bool = True) -> None:
        if mode not in MODES:
            raise EsaError(f"unknown --mode {mode!r}; choose one of {', '.join(MODES)}")
        if k < 1:
            raise EsaError(f"--k {k} must be at least 1")
        self.k, self.mode, self.largest = k, mode, largest
        self._best = _empty()
        self._parts: list[Candidates] = []

    def add(self, param_index: int, score: torch.Tensor, weight: torch.Tensor) -> None:
        """Take this tensor's k best entries; the score tensor can be dropped afterwards."""
        values, idx = tensor_topk(score, self.k, self.largest)
        picked = weight.detach().reshape(-1)[idx].double().cpu().numpy()
        cand = Candidates(values.double().cpu().numpy(), np.full(len(idx), param_index, dtype=np.int64),
                          idx.cpu().numpy().astype(np.int64), picked, np.arange(1, len(idx) + 1))
        if self.mode == "global":
            self._best = merge(self._best, cand, self.k, self.largest)
        else:
            self._parts.append(cand)

    def result(self) -> Candidates:
        if self.mode == "global":
            return self._best
        if not self._parts:
            return _empty()
        cat = [np.concatenate([getattr(c, f) for c in self._parts]) for f in ("score", "param", "flat", "weight",
                                                                             "rank")]
        return Candidates(*cat)


def check_k(k: int, mode: str, sizes: dict[str, int]) -> None:
    """Refuse a k larger than the weights it selects from (whole model for global, each tensor per_layer)."""
    total = sum(sizes.values())
    if mode == "global" and k > total:
        raise EsaError(f"--k {k} is larger than the {total} selected weights; use --k ≤ {total} or widen --params")
    if mode == "per_layer":
        name, smallest = min(sizes.items(), key=lambda kv: kv[1])
        if k > smallest:
            raise EsaError(f"--k {k} is larger than {name} ({smallest} weights) in --mode per_layer; use "
                           f"--k ≤ {smallest} or narrow --params")
