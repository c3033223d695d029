"""The windows of a super-weight search: ``max_samples`` seeded ``chunks`` windows of ``context_len`` tokens.

The detector itself is :func:`esa.sensitivity.superweights.find_super_weights`; the run kind
:mod:`esa.kinds.superweights` calls :func:`window_batch` then the detector, and ``esa superweights`` exports its
stored rows (schema ``esa.superweights/1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esa.core.errors import EsaError
from esa.sensitivity.superweights import Thresholds


@dataclass(frozen=True)
class SuperWeightRun:
    """One super-weight search: its windows, rounds and thresholds (``run`` in ``superweights.json``)."""

    dataset: str = "python-docs"  # corpus name or .txt/.jsonl path
    context_len: int = 128  # tokens per window (method "chunks", the super-weight paper's convention)
    max_samples: int = 4  # windows in the single forward pass (B)
    seed: int = 0  # picks which windows
    iterations: int = 1  # search rounds in all; > 1 zeroes what was found and searches again
    thresholds: Thresholds = Thresholds()


def window_batch(loaded, run: SuperWeightRun):
    """(ids (B, T), selection) of ``max_samples`` seeded chunks windows."""
    from esa.data.corpora import load_corpus
    from esa.data.windows import make_windows, select_windows
    from esa.models import check_context

    if run.max_samples < 1 or run.iterations < 1:
        raise EsaError("--max-samples and the number of search rounds must be ≥ 1")
    check_context(loaded, run.context_len, "--context-len")
    corpus = load_corpus(run.dataset)
    ws = make_windows(loaded.tokenizer, corpus.documents, "chunks", run.context_len)
    sel = select_windows(ws, run.max_samples * (run.context_len - 1), run.seed)
    windows = sel.windows.windows[: run.max_samples]
    return torch.stack([w.input_ids for w in windows]), sel, corpus
