"""Calibration batches for the sensitivity scorers: seeded windows from any ESA corpus.

The corpus is cut with the ``chunks`` method (non-overlapping windows of ``context_len`` tokens, the GPTQ /
Wanda convention) and ``max_samples`` windows are drawn by ``select_windows`` with the seed — so different
seeds really resample the calibration set. When the corpus holds no more than ``max_samples`` windows every
window is used and the calibration is marked ``seed_invariant``.

Scored-token convention (identical to the evaluator): ``scored[b, t]`` means token ``t`` is predicted from
tokens ``< t``; in a ``chunks`` window every token but the first is scored, so a window of T tokens gives
T - 1 loss terms. Example with T=4, window [a b c d]: the loss is -log p(b|a) - log p(c|ab) - log p(d|abc).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esa.data.corpora import load_corpus
from esa.data.windows import make_windows, select_windows
from esa.core.errors import EsaError
from esa.evals.perplexity import collate
from esa.models import pad_id as default_pad_id


@dataclass(frozen=True)
class CalibrationSpec:
    dataset: str = "python-docs"  # corpus registry name or a .txt/.jsonl path
    max_samples: int = 128  # number of windows (sequences) drawn
    context_len: int = 512  # tokens per window, BOS included when the tokenizer adds one
    seed: int = 0  # chooses which windows are drawn
    batch_size: int = 8  # windows per (B, T) batch fed to the model
    bos: str = "auto"  # auto | always | never (see esa.data.windows)


@dataclass(frozen=True)
class Batch:
    ids: torch.Tensor  # (B, T) int64
    attn: torch.Tensor  # (B, T) int64, 1 for real tokens
    scored: torch.Tensor  # (B, T) bool, token t predicted from tokens < t and counted

    @property
    def n_scored(self) -> int:
        """Loss terms in this batch (``scored[:, 1:]``: the first position is never predicted)."""
        return int(self.scored[:, 1:].sum())

    def to(self, device: torch.device) -> Batch:
        return Batch(self.ids.to(device), self.attn.to(device), self.scored.to(device))

    def labels(self) -> torch.Tensor:
        """HF-style labels (B, T): the token id where scored, -100 elsewhere (shifted by the loss, not here)."""
        return torch.where(self.scored, self.ids, torch.full_like(self.ids, -100))


@dataclass(frozen=True)
class Calibration:
    batches: tuple[Batch, ...]
    spec: CalibrationSpec
    source: str  # corpus provenance
    window_indices: tuple[int, ...]  # which chunks windows were drawn (ascending)
    available_windows: int
    seed_invariant: bool  # True when every window of the corpus was used: the seed changes nothing

    @property
    def n_scored(self) -> int:
        return sum(b.n_scored for b in self.batches)

    @property
    def n_tokens(self) -> int:
        return sum(int(b.attn.sum()) for b in self.batches)

    def describe(self) -> dict:
        """JSON-ready description for manifests."""
        return {"dataset": self.spec.dataset, "source": self.source, "method": "chunks",
                "context_len": self.spec.context_len, "max_samples": self.spec.max_samples,
                "n_windows": len(self.window_indices), "available_windows": self.available_windows,
                "seed": self.spec.seed, "seed_invariant": self.seed_invariant, "batch_size": self.spec.batch_size,
                "tokens": self.n_tokens, "scored_tokens": self.n_scored, "bos": self.spec.bos}


def _check(spec: CalibrationSpec) -> None:
    if spec.max_samples < 1:
        raise EsaError(f"--max-samples {spec.max_samples} must be at least 1")
    if spec.batch_size < 1:
        raise EsaError(f"--batch-size {spec.batch_size} must be at least 1")


def calibration_batches(tokenizer, spec: CalibrationSpec, pad_id: int | None = None) -> Calibration:
    """Tokenize ``spec.dataset``, draw ``spec.max_samples`` chunks windows with ``spec.seed``, batch them."""
    _check(spec)
    corpus = load_corpus(spec.dataset)
    ws = make_windows(tokenizer, corpus.documents, method="chunks", ctx=spec.context_len, bos=spec.bos)
    per_window = ws.windows[0].n_scored  # every chunks window scores the same number of tokens
    budget = spec.max_samples * per_window
    sel = select_windows(ws, budget if len(ws.windows) > spec.max_samples else None, spec.seed)
    windows = sel.windows.windows
    if pad_id is None:
        pad_id = default_pad_id(tokenizer)
    batches = []
    for s in range(0, len(windows), spec.batch_size):
        ids, attn, scored = collate(list(windows[s:s + spec.batch_size]), pad_id)  # (B, T) each
        batches.append(Batch(ids, attn, scored))
    return Calibration(tuple(batches), spec, corpus.source, tuple(int(i) for i in sel.indices),
                       sel.available_windows, sel.seed_invariant)


def batches_from_ids(ids: torch.Tensor, batch_size: int) -> tuple[Batch, ...]:
    """Batches from a ready (N, T) id tensor (tests, benchmarks): all tokens real, all but the first scored."""
    out = []
    for s in range(0, len(ids), batch_size):
        part = ids[s:s + batch_size]  # (B, T)
        scored = torch.ones_like(part, dtype=torch.bool)
        scored[:, 0] = False
        out.append(Batch(part, torch.ones_like(part), scored))
    return tuple(out)
