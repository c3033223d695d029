"""The whole-model bit-vulnerability map: the predicted damage of every single-bit flip of every weight.

For each predictable tensor (:func:`esa.predict.taylor.check_predictable`) and each bit position of its dtype,
all its elements are flipped at once on a copy (:func:`esa.perturb.bits.flip_bit`), Δw and the prediction are
computed per element (:func:`esa.predict.taylor.predict`), and only two things are kept:

- per (tensor, bit) a summary row: elements per regime, the largest and mean second-order prediction over the
  ``taylor`` edits, the largest ratio r over the ``large`` ones;
- a global top-k per regime: ``taylor`` by predicted ΔNLL, ``large`` by r, and the first k ``nonfinite``
  flips met (each is a certain collapse).

Nothing of size (weights × bits) is ever materialised: SmolLM2-135M's 106 M matrix weights × 32 bits = 3.4 G
flips pass through one tensor × one bit at a time, in ``chunk``-element slices.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from esa.models.architectures import layer_index
from esa.perturb.bits import flip_bit, layout
from esa.predict.taylor import DEFAULT_TAU, Curvature, channel_scale
from esa.predict.verify import flip_rows

CHUNK = 1 << 22  # elements per slice (≈ 4 M: a few 32 MB float64 temporaries)
TOP_COLUMNS = ("param", "flat", "bit", "value", "delta", "first", "second", "ratio", "regime")


@dataclass
class VulnerabilityMap:
    """Summaries per (tensor, bit) and the global top-k flips per regime."""

    summary: pd.DataFrame  # one row per (param, bit)
    top: dict[str, pd.DataFrame]  # regime → up to k rows of TOP_COLUMNS, worst first
    info: dict = field(default_factory=dict)


class _TopK:
    """A running top-k of rows by one key column (numpy arrays per column); key None: the first k added."""

    def __init__(self, k: int, key: str):
        self.k, self.key, self.rows = k, key, None

    def admits(self, best: float | None) -> bool:
        """Could a candidate scoring ``best`` (None: any, for the key-less list) still enter?"""
        if self.rows is None or len(self.rows["flat"]) < self.k:
            return True
        return self.key is not None and best > self.rows[self.key][-1]

    def add(self, cols: dict[str, np.ndarray]) -> None:
        if not len(cols["flat"]):
            return
        merged = cols if self.rows is None else {c: np.concatenate([self.rows[c], cols[c]]) for c in cols}
        order = np.arange(len(merged["flat"])) if self.key is None else np.argsort(-merged[self.key], kind="stable")
        self.rows = {c: v[order[: self.k]] for c, v in merged.items()}

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows if self.rows is not None else {c: [] for c in TOP_COLUMNS})


def _rows(model, curv: Curvature, name: str, bit: int, flat: torch.Tensor, tau: float) -> dict[str, np.ndarray]:
    """Rows (TOP_COLUMNS) for the flat storage indices ``flat``, recomputed exactly (:func:`flip_rows`)."""
    picks = pd.DataFrame({"param": name, "flat": flat.cpu().numpy(), "bit": bit})
    rows = flip_rows(model, curv, picks, tau)
    return {c: rows[c].to_numpy() for c in TOP_COLUMNS}


def _top(score: torch.Tensor, member: torch.Tensor | None, k: int, offset: int) -> torch.Tensor:
    """Flat storage indices of the (up to) k largest ``score`` of a block (among ``member``, when given)."""
    if member is not None:
        score = torch.where(member, score, -torch.inf)
    n = score.numel() if member is None else int(member.sum())
    return torch.topk(score.reshape(-1), min(k, n)).indices + offset


class _Block:
    """One block of whole storage rows under one bit flip: fp32 Δw, the second-order prediction and, unless
    a bound shows every edit is ``taylor``, the regime masks."""

    def __init__(self, curv: Curvature, name: str, values: torch.Tensor, rows: slice, scale: torch.Tensor,
                 bit: int, tau: float, all_taylor: bool):
        self.delta = flip_bit(values, bit).float() - values.float()  # (R, width); same sign: no overflow
        g, h = curv.grad[name][rows], curv.diag[name][rows]
        self.second = torch.addcmul(g, h, self.delta, value=0.5).mul_(self.delta)  # Δw·(g + ½hΔw)
        self.taylor = self.large = self.nonfinite = None
        if not all_taylor:
            self.ratio = self.delta.abs().mul_(scale)
            self.nonfinite = ~(self.delta.abs() < torch.inf)
            self.taylor = self.ratio <= tau  # False for NaN and inf
            self.large = ~self.taylor & ~self.nonfinite

    def counts(self) -> list[int]:
        if self.taylor is None:
            return [self.delta.numel(), 0, 0]
        return [int(self.taylor.sum()), int(self.large.sum()), int(self.nonfinite.sum())]


def _scan_bit(model, curv: Curvature, name: str, stored: torch.Tensor, bit: int, tau: float, tops: dict,
              chunk: int) -> dict:
    """One (tensor, bit), in fp32 blocks of whole storage rows: its summary row; candidates that can still
    enter a global top-k are handed to it (a block whose best is below the current k-th is skipped)."""
    n_rows, width = stored.shape
    step = max(1, chunk // width)
    scale = channel_scale(curv, name).float()  # (1, in) or (in, 1)
    lay = layout(stored.dtype)
    # a mantissa flip changes |w| by 2^(e + bit - n_mantissa) ≤ max(|w|, smallest normal)·2^(bit - n_mantissa);
    # when that times the largest scale is ≤ tau, every edit of this (tensor, bit) is taylor (no masks needed)
    top = max(float(stored.abs().max()), torch.finfo(stored.dtype).tiny)
    bound = top * 2.0 ** (bit - lay.n_mantissa) * float(scale.max()) if bit in lay.mantissa else np.inf
    counts = [0, 0, 0]
    sum_second, max_second, max_ratio = 0.0, -np.inf, -np.inf
    for r0 in range(0, n_rows, step):
        rows = slice(r0, min(r0 + step, n_rows))
        b = _Block(curv, name, stored[rows], rows, scale[rows] if curv.transposed[name] else scale, bit, tau,
                   bound <= tau)
        n_block = b.counts()
        counts = [x + y for x, y in zip(counts, n_block)]
        offset = r0 * width
        if n_block[0]:
            masked = b.second if b.taylor is None else torch.where(b.taylor, b.second, -torch.inf)
            best = float(masked.amax())
            sum_second += float((b.second if b.taylor is None else torch.where(b.taylor, b.second, 0.0)).sum())
            max_second = max(max_second, best)
            if tops["taylor"].admits(best):
                tops["taylor"].add(_rows(model, curv, name, bit, _top(b.second, b.taylor, tops["taylor"].k, offset),
                                         tau))
        if n_block[1]:
            best = float(torch.where(b.large, b.ratio, -torch.inf).amax())
            max_ratio = max(max_ratio, best)
            if tops["large"].admits(best):
                tops["large"].add(_rows(model, curv, name, bit, _top(b.ratio, b.large, tops["large"].k, offset),
                                        tau))
        if n_block[2] and tops["nonfinite"].admits(None):
            pick = torch.nonzero(b.nonfinite.reshape(-1)).flatten()[: tops["nonfinite"].k] + offset
            tops["nonfinite"].add(_rows(model, curv, name, bit, pick, tau))  # certain collapses: the first k
    n_taylor = counts[0]
    return {"param": name, "layer": layer_index(name), "bit": bit, "bit_name": lay.name_of(bit),
            "n": int(stored.numel()), "n_taylor": n_taylor, "n_large": counts[1], "n_nonfinite": counts[2],
            "max_predicted": max_second if n_taylor else np.nan,
            "mean_predicted": sum_second / n_taylor if n_taylor else np.nan,
            "max_ratio": max_ratio if counts[1] else np.nan}


@torch.no_grad()
def vulnerability_map(model, curv: Curvature, k: int = 100, tau: float = DEFAULT_TAU, bits: list[int] | None = None,
                      chunk: int = CHUNK) -> VulnerabilityMap:
    """Scan every bit (or ``bits``) of every tensor in ``curv``; see the module docstring."""
    t0 = time.perf_counter()
    tops = {"taylor": _TopK(k, "second"), "large": _TopK(k, "ratio"), "nonfinite": _TopK(k, None)}
    rows = []
    for name in curv.grad:
        stored = model.get_parameter(name).detach()
        for bit in sorted(bits if bits is not None else range(layout(stored.dtype).width), reverse=True):
            rows.append(_scan_bit(model, curv, name, stored, bit, tau, tops, chunk))
    summary = pd.DataFrame(rows)
    info = {"estimator": curv.estimator, "tau": tau, "k": k, "calibration_tokens": curv.n_tokens,
            "n_flips": int(summary["n"].sum()) if len(summary) else 0, "seconds": time.perf_counter() - t0}
    return VulnerabilityMap(summary, {r: t.frame() for r, t in tops.items()}, info)
