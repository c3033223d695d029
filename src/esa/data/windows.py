"""Evaluation windows: how a token stream is cut into model inputs, which tokens are scored, what text they cover.

A :class:`Window` is ``input_ids`` (T,) plus ``scored`` (T,) bool, where ``scored[t]`` means token ``t`` is
predicted from tokens ``< t`` and counted. ``scored[0]`` is always False (nothing predicts the first input).

Methods (named in every result):

* ``chunks`` (default; ESA's own protocol): drop whitespace-only documents, join the rest with a blank line
  (``"\\n\\n"``), tokenize once without special tokens and cut non-overlapping windows of ``ctx`` tokens; every
  token but the first of each window is scored and the tail remainder is dropped. Example with ctx=4 and tokens
  a b c d e f g h i: windows [a b c d], [e f g h]; scored b c d, f g h; ``i`` is dropped. With BOS (``--bos``
  below) each window is [BOS] + ctx-1 corpus tokens, all of them scored.
* ``gptq`` (GPTQ / SparseGPT / Wanda ``datautils``, token for token): the reference loader's stream — every row
  of the split, empty rows included, joined by the dataset's joiner (see ``esa.data.corpora.PROTOCOL_SOURCES``),
  tokenized in *one* call with the tokenizer's default special tokens (so at most one BOS, at the very start),
  cut to ``stream_windows`` · ctx tokens where the loader cuts (c4: 256), then ``numel // ctx`` windows of ctx
  tokens; every token but the first of each window is scored (their loss is on shifted logits).
* ``rolling`` (lm-evaluation-harness ``loglikelihood_rolling``): per document, a prefix token (BOS, else EOS)
  then disjoint windows that each predict up to ``ctx`` tokens; the last window is shifted left to keep a full
  context and scores only its new tokens. Every document token is scored exactly once.
* ``sliding`` (Hugging Face perplexity guide): windows of ``ctx`` tokens starting every ``stride`` tokens; each
  scores only the tokens not scored by the previous window.

BOS: ``always`` prepends the tokenizer's BOS to every ``chunks``/``sliding`` window (the window then holds
ctx-1 corpus tokens, all scored); ``never`` does not; ``auto`` follows the tokenizer's own default. ``gptq`` takes
the tokenizer's default for one call (recorded as ``start`` or ``never``); ``rolling`` records ``prefix``.

Word and byte counts (word perplexity, bits per byte) are counted on the *source text* the scored tokens cover,
never on decoded tokens, so a word cut by a window edge is counted once: token i covers the characters from its
offset-mapping start to the next token's start (:class:`SourceText`), a window covers what its scored tokens
cover, and a word belongs to the window that holds its first character. Summed over windows that score every
token, bytes = ``len(text.encode())`` and words = ``len(text.split())``. ``rolling`` uses lm-eval's definitions
per document instead: words = ``len(re.split(r"\\s+", doc))`` and bytes = ``len(doc.encode())`` on the raw
document (before any detokenizer); the difference to the covered-text counts sits on the document's first
window, so every whole document sums to lm-eval's numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np
import torch

from esa.core.errors import EsaError

METHODS = ("chunks", "gptq", "rolling", "sliding")


@dataclass(frozen=True)
class Window:
    input_ids: torch.Tensor  # (T,) int64
    scored: torch.Tensor  # (T,) bool — token t is predicted from tokens < t and counted
    doc: int  # document index (rolling) or 0
    start: int  # offset of the window's first corpus token in its token stream
    span: tuple[int, int] = (0, 0)  # [a, b): stream (rolling: document) indices of the scored tokens
    n_bytes: int = 0  # UTF-8 bytes of the source text the scored tokens cover (module docstring)
    n_words: int = 0  # words whose first character lies in that text (rolling: lm-eval's count, see above)

    @property
    def n_scored(self) -> int:
        return int(self.scored.sum())


@dataclass(frozen=True)
class WindowSet:
    windows: tuple[Window, ...]
    method: str
    ctx: int
    stride: int | None
    bos: str  # resolved: "always" | "never" | "prefix" (rolling's prefix token) | "start" (gptq: one, at the start)
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


class SourceText:
    """A source text with its tokens' character coverage and prefix sums of bytes and word starts.

    Token i covers characters ``[bounds[i], bounds[i+1])``: from its offset-mapping start to the next token's
    start, so whitespace a tokenizer folds into no token (SentencePiece/Metaspace, stripped spaces) belongs to the
    token before it and the tokens tile the text: ``bounds[0] = 0``, ``bounds[N] = len(text)``. Byte-level tokens
    that split one multi-byte character share its start; the character belongs to the last of them. Special
    tokens (offsets (0, 0)) cover nothing. Example: "ab cd" as "ab", " c", "d" (offsets (0,2) (2,4) (4,5)) →
    bounds [0, 2, 4, 5]; a word starts at a non-space character at the text start or after whitespace.
    """

    def __init__(self, tokenizer, text: str, special: bool = False):
        if not getattr(tokenizer, "is_fast", False):
            raise EsaError(f"{type(tokenizer).__name__} is a slow tokenizer without offset mappings; word and byte "
                           "counts need a fast one (load the model's tokenizer.json / use_fast=True)")
        enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        starts = np.array([0] + [o[0] for o in enc["offset_mapping"]][1:] + [len(text)], dtype=np.int64)
        self.ids = torch.tensor(enc["input_ids"], dtype=torch.long)  # (N,)
        self.bounds = np.maximum.accumulate(starts)  # (N+1,) nondecreasing
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        width = 1 + (codes >= 0x80) + (codes >= 0x800) + (codes >= 0x10000)  # UTF-8 bytes per character
        self.byte_cum = np.concatenate([[0], np.cumsum(width)])  # (len+1,)
        self.word_starts = np.array([m.start() for m in re.finditer(r"\S+", text)], dtype=np.int64)

    def counts(self, a: int, b: int) -> tuple[int, int]:
        """(UTF-8 bytes, words starting) in the text covered by tokens ``a .. b-1``."""
        x, y = int(self.bounds[a]), int(self.bounds[b])
        words = np.searchsorted(self.word_starts, y) - np.searchsorted(self.word_starts, x)
        return int(self.byte_cum[y] - self.byte_cum[x]), int(words)


def lm_eval_counts(doc: str) -> tuple[int, int]:
    r"""lm-eval's (bytes, words) of a document: ``len(doc.encode("utf-8"))``, ``len(re.split(r"\s+", doc))``."""
    return len(doc.encode("utf-8")), len(re.split(r"\s+", doc))


def _window(ids: torch.Tensor, n_unscored: int, doc: int, start: int, lead: int = 0) -> Window:
    """Score ``ids`` after its first ``max(1, n_unscored)`` tokens; ``lead`` ids precede the stream (BOS/prefix)."""
    first = max(1, n_unscored)
    scored = torch.ones(len(ids), dtype=torch.bool)
    scored[:first] = False
    return Window(ids, scored, doc, start, (start - lead + first, start - lead + len(ids)))


def chunk_windows(tokens: torch.Tensor, ctx: int, bos_id: int | None) -> list[Window]:
    """Non-overlapping windows; with ``bos_id`` each window is [BOS] + ctx-1 corpus tokens."""
    body = ctx - 1 if bos_id is not None else ctx
    out = []
    for i in range(len(tokens) // body):
        ids = tokens[i * body:(i + 1) * body]
        if bos_id is not None:
            ids = torch.cat([torch.tensor([bos_id]), ids])
        out.append(_window(ids, 1, 0, i * body, int(bos_id is not None)))
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
        out.append(_window(ids, len(ids) - n_new, 0, begin, int(bos_id is not None)))
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
        out.append(_window(ids, 1, d, 0, lead=1))
        predicted = first
        while predicted < n:
            pred_len = min(n - predicted, ctx)
            end = predicted + pred_len
            begin = max(0, end - ctx - 1)
            ids = toks[begin:end]
            out.append(_window(ids, len(ids) - pred_len, d, begin))
            predicted = end
    return out


def gptq_windows(tokens: torch.Tensor, ctx: int) -> list[Window]:
    """GPTQ ``eval``: ``numel // ctx`` windows ``tokens[i*ctx:(i+1)*ctx]``, all but each window's first scored.

    ``tokens`` is the whole stream as one tokenizer call returns it (its BOS, if any, is token 0 and is
    never scored). Example, ctx=4, stream B a b c d e f g h: windows [B a b c], [d e f g]; scored a b c, e f g.
    """
    return [_window(tokens[i * ctx:(i + 1) * ctx], 1, 0, i * ctx) for i in range(len(tokens) // ctx)]


def _counted(windows: list[Window], src: SourceText) -> list[Window]:
    return [replace(w, n_bytes=c[0], n_words=c[1]) for w in windows for c in [src.counts(*w.span)]]


def _rolling_set(tokenizer, documents, ctx, raw) -> WindowSet:
    """Rolling windows with per-window covered-text counts, topped up on each document's first window to
    lm-eval's counts on the raw document (``raw``: the documents before detokenization, default themselves)."""
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    sources = [SourceText(tokenizer, d) for d in documents]
    windows: list[Window] = []
    for d, src in enumerate(sources):
        own = [replace(w, doc=d) for w in rolling_windows([src.ids], ctx, prefix)]
        own = _counted(own, src)
        if own:
            want = lm_eval_counts((raw or documents)[d])
            have = (sum(w.n_bytes for w in own), sum(w.n_words for w in own))
            own[0] = replace(own[0], n_bytes=own[0].n_bytes + want[0] - have[0],
                             n_words=own[0].n_words + want[1] - have[1])
        windows += own
    return _finish(windows, "rolling", ctx, None, "prefix", sum(len(s.ids) for s in sources))


def _gptq_set(tokenizer, text: str, ctx: int, stream_windows: int | None) -> WindowSet:
    """The GPTQ stream (one tokenizer call, default special tokens), cut to ``stream_windows`` · ctx tokens."""
    src = SourceText(tokenizer, text, special=True)
    tokens = src.ids if stream_windows is None else src.ids[: stream_windows * ctx]
    bos_id = tokenizer.bos_token_id
    bos = "start" if bos_id is not None and len(src.ids) and int(src.ids[0]) == bos_id else "never"
    return _finish(_counted(gptq_windows(tokens, ctx), src), "gptq", ctx, None, bos, len(src.ids))


def make_windows(tokenizer, documents: tuple[str, ...], method: str, ctx: int, *, stride: int | None = None,
                 bos: str = "auto", raw: tuple[str, ...] | None = None, joiner: str = "\n\n",
                 stream_windows: int | None = None) -> WindowSet:
    """Tokenize a corpus and cut it into windows by ``method`` (see module docstring).

    ``raw`` (rolling): the documents before detokenization, on which lm-eval counts words and bytes. ``joiner``
    and ``stream_windows`` (gptq): how the rows are joined and where the stream is cut (``Corpus`` fields).
    """
    if method not in METHODS:
        raise EsaError(f"unknown window method {method!r}; choose one of {', '.join(METHODS)}")
    if ctx < 2:
        raise EsaError(f"context length {ctx} is too short; use at least 2 tokens")
    if method == "rolling":
        return _rolling_set(tokenizer, documents, ctx, raw)
    if method == "gptq":
        if bos != "auto":
            raise EsaError(f"--bos {bos} does not apply to the gptq method: its BOS is the tokenizer's default, "
                           "once at the start of the stream; drop --bos")
        return _gptq_set(tokenizer, joiner.join(documents), ctx, stream_windows)
    resolved = resolve_bos(tokenizer, bos)
    bos_id = tokenizer.bos_token_id if resolved == "always" else None
    src = SourceText(tokenizer, joiner.join(documents))
    if method == "chunks":
        windows = chunk_windows(src.ids, ctx, bos_id)
    else:
        if stride is None or not 1 <= stride <= ctx - (bos_id is not None):
            raise EsaError(f"--stride must be between 1 and the context length {ctx} for the sliding method")
        windows = sliding_windows(src.ids, ctx, stride, bos_id)
    return _finish(_counted(windows, src), method, ctx, stride, resolved, len(src.ids))


def corpus_windows(tokenizer, corpus, method: str, ctx: int, *, stride: int | None = None,
                   bos: str = "auto") -> WindowSet:
    """:func:`make_windows` on an ``esa.data.corpora.Corpus`` read for ``method`` (its joiner, raw texts, cut)."""
    return make_windows(tokenizer, corpus.documents, method, ctx, stride=stride, bos=bos, raw=corpus.raw,
                        joiner=corpus.joiner, stream_windows=corpus.stream_windows)


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


def scored_text_counts(windows) -> tuple[int, int]:
    """(UTF-8 bytes, words) of the source text the windows' scored tokens cover, summed (module docstring).

    Counted on the source text when the windows were made, so a word cut by a window edge counts once and a
    multi-byte character split across tokens counts its bytes once. Used for byte perplexity, bits per byte and
    word perplexity.
    """
    return sum(w.n_bytes for w in windows), sum(w.n_words for w in windows)
