"""Sanity guard: flag numbers that look like the earlier tool's bug (a paragraph scored 100 times).

Two independent signals, both recorded in every result and shown in the report:

* **repetition** — the share of duplicated token 8-grams in the scored text. Natural text has few repeated
  8-grams (python-docs: ~0.23, with its code samples); a paragraph repeated 100 times has ~0.99.
* **implausible quality** — perplexity below 1.5 or token accuracy above 95 % on natural text: no public LM
  gets there on held-out prose.
"""

from __future__ import annotations

import numpy as np
import torch

NGRAM = 8
MAX_REPETITION = 0.5  # share of duplicated 8-grams above which the text is flagged as repetitive
MIN_PERPLEXITY = 1.5
MAX_TOKEN_ACCURACY = 0.95


def repetition_rate(token_streams: list[torch.Tensor], n: int = NGRAM) -> float:
    """Share of token n-grams (within each stream) that occur earlier anywhere in the scored text."""
    grams = []
    for ids in token_streams:
        arr = ids.numpy().astype(np.int64)
        if len(arr) >= n:
            grams.append(np.lib.stride_tricks.sliding_window_view(arr, n))
    if not grams:
        return 0.0
    all_grams = np.concatenate(grams)  # (G, n)
    unique = np.unique(all_grams, axis=0)
    return 1.0 - len(unique) / len(all_grams)


def sanity_warnings(repetition: float, perplexity: float, token_accuracy: float) -> list[str]:
    """Human-readable warnings; empty when the result looks like an honest measurement."""
    out = []
    if repetition > MAX_REPETITION:
        out.append(f"scored text is highly repetitive ({repetition:.0%} of {NGRAM}-grams repeat): perplexity "
                   "measured on repeated text is meaningless")
    if perplexity < MIN_PERPLEXITY:
        out.append(f"perplexity {perplexity:.3f} < {MIN_PERPLEXITY} is implausible on natural text: check for "
                   "repeated or leaked evaluation text")
    if token_accuracy > MAX_TOKEN_ACCURACY:
        out.append(f"token accuracy {token_accuracy:.1%} > {MAX_TOKEN_ACCURACY:.0%} is implausible on natural "
                   "text: check for repeated or leaked evaluation text")
    return out
