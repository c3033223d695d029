"""Evaluation windows: how a token stream is cut into model inputs and which tokens are scored.

A :class:`Window` is ``input_ids`` (T,) plus ``scored`` (T,) bool, where ``scored[t]`` means token ``t`` is
predicted from tokens ``< t`` and counted. ``scored[0]`` is always False (nothing predicts the first input).

Methods (named in every result):

* ``chunks`` (default; GPTQ / SparseGPT / Wanda / super-weight papers): tokenize the joined corpus once and cut
  non-overlapping windows of ``ctx`` tokens; every token but the first of each window is scored. Example with
  ctx=4 and tokens a b c d e f g h i: windows [a b c d], [e f g h]; scored b c d, f g h; ``i`` is dropped.
* ``rolling`` (lm-evaluation-harness ``loglikelihood_rolling``): per document, a prefix token (BOS, else EOS)
  then disjoint windows that each predict up to ``ctx`` tokens; the last window is shifted left to keep a full
  context and scores only its new tokens. Every document token is scored exactly once.
* ``sliding`` (Hugging Face perplexity guide): windows of ``ctx`` tokens starting every ``stride`` tokens; each
  scores only the tokens not scored by the previous window.

BOS: ``always`` prepends the tokenizer's BOS to every ``chunks``/``sliding`` window (the window then holds
ctx-1 corpus tokens, all scored); ``never`` does not; ``auto`` follows the tokenizer's own default.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from esa.errors import EsaError

METHODS = ("chunks", "rolling", "sliding")


@dataclass(frozen=True)
class Window:
    input_ids: torch.Tensor  # (T,) int64
    scored: torch.Tensor  # (T,) bool — token t is predicted from tokens < t and counted
    doc: int  # document index (rolling) or 0
    start: int  # offset of the window's first corpus token in its token stream

    @property
    def n_scored(self) -> int:
        return int(self.scored.sum())


@dataclass(frozen=True)
class WindowSet:
    windows: tuple[Window, ...]
    method: str
    ctx: int
    stride: int | None
    bos: str  # resolved: "always" | "never" | "prefix" (rolling's prefix token)
    corpus_tokens: int  # tokens in the tokenized corpus
    dropped_tokens: int  # corpus tokens no window scores (chunks' tail remainder, first token, …)

    @property
    def scored_tokens(self) -> int:
        return sum(w.n_scored for w in self.windows)


def resolve_bos(tokenizer, bos: str) -> str:
    """``auto`` → ``always`` when the tokenizer prepends BOS by default (Llama, Gemma), else ``never``."""
    if bos not in ("auto", "always", "never"):
        raise EsaError(f"unknown --bos {bos!r}; choose auto, always or never")
    if bos != "auto":
        if bos == "always" and tokenizer.bos_token_id is None:
            raise EsaError("--bos always but this tokenizer has no BOS token; use --bos never")
        return bos
    ids = tokenizer("a").input_ids
    adds = tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id
    return "always" if adds else "never"


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` without special tokens, (N,) int64."""
    return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)


def _window(ids: torch.Tensor, n_unscored: int, doc: int, start: int) -> Window:
    scored = torch.ones(len(ids), dtype=torch.bool)
    scored[: max(1, n_unscored)] = False
    return Window(ids, scored, doc, start)


def chunk_windows(tokens: torch.Tensor, ctx: int, bos_id: int | None) -> list[Window]:
    """Non-overlapping windows; with ``bos_id`` each window is [BOS] + ctx-1 corpus tokens."""
    body = ctx - 1 if bos_id is not None else ctx
    out = []
    for i in range(len(tokens) // body):
        ids = tokens[i * body:(i + 1) * body]
        if bos_id is not None:
            ids = torch.cat([torch.tensor([bos_id]), ids])
        out.append(_window(ids, 1, 0, i * body))
    return out


def sliding_windows(tokens: torch.Tensor, ctx: int, stride: int, bos_id: int | None) -> list[Window]:
    """HF-guide sliding windows: start every ``stride`` tokens, score only tokens not scored before."""
    body = ctx - 1 if bos_id is not None else ctx
    out, prev_end = [], 0
    for begin in range(0, len(tokens), stride):
        end = min(begin + body, len(tokens))
        ids = tokens[begin:end]
        n_new = end - prev_end
        if bos_id is not None:
            ids = torch.cat([torch.tensor([bos_id]), ids])
        out.append(_window(ids, len(ids) - n_new, 0, begin))
        prev_end = end
        if end == len(tokens):
            break
    return out


def rolling_windows(doc_tokens: list[torch.Tensor], ctx: int, prefix_id: int) -> list[Window]:
    """lm-evaluation-harness ``loglikelihood_rolling`` windows (context_len=1), one document at a time.

    For a document t0..t9 and ctx=4 the windows are [P t0 t1 t2 t3] scoring t0..t3, [t3 t4 t5 t6 t7] scoring
    t4..t7, and the last one shifted left to a full context, [t5 t6 t7 t8 t9] scoring only t8 t9. A window
    holds its inputs *and* its last predicted token (up to ctx+1 ids); the model reads the first ctx of them.
    """
    out = []
    for d, toks in enumerate(doc_tokens):
        n = len(toks)
        if n == 0:
            continue
        first = min(ctx, n)
        ids = torch.cat([torch.tensor([prefix_id]), toks[:first]])
        out.append(_window(ids, 1, d, 0))
        predicted = first
        while predicted < n:
            pred_len = min(n - predicted, ctx)
            end = predicted + pred_len
            begin = max(0, end - ctx - 1)
            ids = toks[begin:end]
            out.append(_window(ids, len(ids) - pred_len, d, begin))
            predicted = end
    return out


def make_windows(tokenizer, documents: tuple[str, ...], method: str, ctx: int, *, stride: int | None = None,
                 bos: str = "auto") -> WindowSet:
    """Tokenize a corpus and cut it into windows by ``method`` (see module docstring)."""
    if method not in METHODS:
        raise EsaError(f"unknown window method {method!r}; choose one of {', '.join(METHODS)}")
    if ctx < 2:
        raise EsaError(f"context length {ctx} is too short; use at least 2 tokens")
    if method == "rolling":
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        docs = [tokenize(tokenizer, d) for d in documents]
        windows = rolling_windows(docs, ctx, prefix)
        total = sum(len(d) for d in docs)
        return _finish(windows, method, ctx, None, "prefix", total)
    resolved = resolve_bos(tokenizer, bos)
    bos_id = tokenizer.bos_token_id if resolved == "always" else None
    tokens = tokenize(tokenizer, "\n\n".join(documents))
    if method == "chunks":
        windows = chunk_windows(tokens, ctx, bos_id)
    else:
        if stride is None or not 1 <= stride <= ctx - (bos_id is not None):
            raise EsaError(f"--stride must be between 1 and the context length {ctx} for the sliding method")
        windows = sliding_windows(tokens, ctx, stride, bos_id)
    return _finish(windows, method, ctx, stride, resolved, len(tokens))


def _finish(windows, method, ctx, stride, bos, total) -> WindowSet:
    if not windows:
        raise EsaError(f"the corpus has {total} tokens, fewer than one {method} window of {ctx}; "
                       "use a shorter --context-lens or a longer corpus")
    ws = WindowSet(tuple(windows), method, ctx, stride, bos, total, 0)
    return WindowSet(ws.windows, method, ctx, stride, bos, total, total - ws.scored_tokens)


@dataclass(frozen=True)
class Selection:
    windows: WindowSet
    indices: np.ndarray  # indices into the full window list, ascending
    seed: int
    seed_invariant: bool  # True when every window was evaluated: the seed changes nothing
    available_windows: int


def select_windows(ws: WindowSet, max_tokens: int | None, seed: int) -> Selection:
    """Pick windows until ``max_tokens`` scored tokens; the seed chooses which windows (a random subset).

    With no budget, or a budget covering the whole corpus, every window is used and the result is marked
    seed-invariant instead of pretending to have seed variance.
    """
    n = len(ws.windows)
    if max_tokens is None or ws.scored_tokens <= max_tokens:
        return Selection(ws, np.arange(n), seed, True, n)
    order = np.random.default_rng(seed).permutation(n)
    counts = np.array([ws.windows[i].n_scored for i in order])
    keep = max(1, int(np.searchsorted(np.cumsum(counts), max_tokens, side="right")))
    idx = np.sort(order[:keep])
    chosen = tuple(ws.windows[i] for i in idx)
    sub = WindowSet(chosen, ws.method, ws.ctx, ws.stride, ws.bos, ws.corpus_tokens,
                    ws.corpus_tokens - sum(w.n_scored for w in chosen))
    return Selection(sub, idx, seed, False, n)


def scored_text_counts(tokenizer, window: Window) -> tuple[int, int]:
    """(UTF-8 bytes, whitespace-separated words) of the decoded scored tokens of one window.

    Scored tokens of a window are contiguous, so decoding them recovers the scored text (up to tokenizer
    normalisation at the span's edges). Used for byte perplexity, bits per byte and word perplexity.
    """
    text = tokenizer.decode(window.input_ids[window.scored].tolist())
    return len(text.encode("utf-8")), len([w for w in re.split(r"\s+", text) if w])
