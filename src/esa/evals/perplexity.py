"""Per-window negative log-likelihood, token accuracy and the perplexity family.

For every window the evaluator returns the *summed* NLL of its scored tokens (float64), the number of scored
tokens and how many of them the model's argmax predicted. Only scored positions go through the head, in chunks
whose fp32 logits are bounded by the vocabulary (:mod:`esa.evals.logprobs`), never O(B · T · V).

Perplexity = exp(Σ NLL / Σ scored tokens) over all windows; non-finite window losses are counted and kept
(they make the total non-finite — a collapse is a result, not noise).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from esa.core import parallel, progress
from esa.data.windows import Window
from esa.core.errors import EsaError
from esa.evals.logprobs import hidden_and_head, score_states
from esa.evals.resources import is_oom, timed

log = logging.getLogger(__name__)

MAX_PADDING = 0.05  # a micro-batch wastes at most this share of its longest window on padding


@dataclass
class WindowScores:
    """Per-window outputs, aligned with the evaluated windows."""

    nll: np.ndarray  # (W,) float64 summed NLL in nats over scored tokens
    n_scored: np.ndarray  # (W,) int64
    n_correct: np.ndarray  # (W,) int64 argmax == next token among scored tokens
    forward_seconds: float = 0.0  # timed forwards (after an untimed warm-up batch)
    batch_sizes: list[int] = field(default_factory=list)  # final micro-batch sizes, in order

    @property
    def n_nonfinite(self) -> int:
        return int((~np.isfinite(self.nll)).sum())


def collate(windows: list[Window], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad windows to a batch: ids (B, T), attention mask (B, T), scored mask (B, T)."""
    T = max(len(w.input_ids) for w in windows)
    ids = torch.full((len(windows), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(windows), T), dtype=torch.long)
    scored = torch.zeros((len(windows), T), dtype=torch.bool)
    for b, w in enumerate(windows):
        n = len(w.input_ids)
        ids[b, :n], attn[b, :n], scored[b, :n] = w.input_ids, 1, w.scored
    return ids, attn, scored


@torch.inference_mode()
def score_batch(model, ids: torch.Tensor, attn: torch.Tensor, scored: torch.Tensor,
                chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed NLL (B,) float64, scored counts (B,) and correct counts (B,) for one padded batch.

    Position p's logits predict token p+1, so the model reads ids[:, :-1] and is scored on ids[:, 1:]; only
    scored positions reach the head (:func:`esa.evals.logprobs.score_states`, ``chunk`` tokens at a time).
    """
    device = model.get_input_embeddings().weight.device
    ids, attn, scored = ids.to(device), attn.to(device), scored.to(device)
    inputs, targets, mask = ids[:, :-1], ids[:, 1:], scored[:, 1:]  # (B, T-1) each
    states, head_fn = hidden_and_head(model, {"input_ids": inputs, "attention_mask": attn[:, :-1]})
    return score_states(states, head_fn, targets, mask, chunk)


def batch_plan(windows: tuple[Window, ...], token_budget: int) -> list[list[int]]:
    """Micro-batches as lists of window indices: longest first, each filled to ``token_budget`` tokens.

    A batch holds at most ``token_budget // T`` windows, T being its longest, and only windows at least
    (1 - MAX_PADDING)·T long — a shorter one starts the next batch instead of adding padding (rolling
    windows: each document's last, short window would otherwise pad a batch of full ones). Example with
    lengths [60, 100, 98, 59, 100] and a large budget: [[1, 4, 2], [0, 3]].
    """
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].input_ids))  # stable for equal lengths
    plan: list[list[int]] = []
    for i in order:
        n = len(windows[i].input_ids)
        current = plan[-1] if plan else None
        if (current is not None and n >= (1 - MAX_PADDING) * len(windows[current[0]].input_ids)
                and len(current) < max(1, token_budget // len(windows[current[0]].input_ids))):
            current.append(i)
        else:
            plan.append([i])
    return plan


def evaluate_windows(model, windows: tuple[Window, ...], pad_id: int, token_budget: int,
                     description: str = "scoring") -> WindowScores:
    """Score every window in the micro-batches of :func:`batch_plan`; halve a batch on out-of-memory.

    Outputs are returned in the input order. One window of the first batch is run untimed as a warm-up;
    ``forward_seconds`` covers the scoring passes (in a data-parallel run, :mod:`esa.core.parallel`, the
    replicas' passes side by side: the wall time of the scoring phase).
    """
    device = model.get_input_embeddings().weight.device
    W = len(windows)
    nll, n_scored, n_correct = np.zeros(W), np.zeros(W, dtype=np.int64), np.zeros(W, dtype=np.int64)
    plan = batch_plan(windows, token_budget)
    cap: list[int | None] = [None]  # largest batch that fits after an out-of-memory error
    times: list[float] = []  # a pass that raises records no time
    sizes: list[int] = []
    with progress.bar(W, description) as advance:
        if plan:  # warm-up: one window, untimed
            _warm_up(model, windows[plan[0][0]], pad_id, device)
        with timed(device, times):
            scores = parallel.units("windows", _score_planned,
                                    [(model, windows, idx, pad_id, cap, advance) for idx in plan])
    for idx, (batch_nll, batch_scored, batch_correct, batch_sizes) in zip(plan, scores):
        nll[idx], n_scored[idx], n_correct[idx] = batch_nll, batch_scored, batch_correct
        sizes += batch_sizes
    return WindowScores(nll, n_scored, n_correct, float(sum(times)), sizes)


def _warm_up(model, window: Window, pad_id: int, device: torch.device) -> None:
    ids, attn, scored = collate([window], pad_id)
    try:
        score_batch(model, ids, attn, scored)
    except RuntimeError as exc:  # out of memory with one window: the one-line error (anything else: re-raised)
        _halve_or_raise(exc, 1, ids.shape[1], device)


def _score_planned(model, windows: tuple[Window, ...], idx: list[int], pad_id: int, cap: list, advance
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
    """One planned micro-batch: summed NLL, scored and correct counts (len(idx),) each, in ``idx`` order, and the
    sizes of the passes that scored it — smaller than planned after an out-of-memory error (``cap[0]``)."""
    device = model.get_input_embeddings().weight.device
    queue, parts, sizes = deque([idx]), [], []
    while queue:
        part = queue.popleft()
        if cap[0] is not None and len(part) > cap[0]:
            queue.appendleft(part[cap[0]:])
            part = part[:cap[0]]
        ids, attn, scored = collate([windows[j] for j in part], pad_id)
        try:
            parts.append(score_batch(model, ids, attn, scored))
        except RuntimeError as exc:  # every allocator failure is one (esa.evals.resources.is_oom)
            cap[0] = _halve_or_raise(exc, len(part), ids.shape[1], device)
            queue.appendleft(part)
            continue
        sizes.append(len(part))
        advance(len(part))
    nll, n_scored, n_correct = (torch.cat(t).numpy() for t in zip(*parts))
    return nll, n_scored, n_correct, sizes


def _halve_or_raise(exc: BaseException, batch: int, length: int, device: torch.device) -> int:
    """Next micro-batch size after an out-of-memory error (re-raise anything else)."""
    if not is_oom(exc):
        raise exc
    if batch == 1:
        raise EsaError(f"out of memory at batch size 1 with {length} tokens; use a shorter --context-lens, "
                       "--dtype bf16, or a GPU with more memory") from exc
    log.warning("out of memory; retrying with micro-batch size %d", batch // 2)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return batch // 2


def perplexity_metrics(scores: WindowScores, n_bytes: int, n_words: int) -> dict:
    """Aggregate metrics. Higher is better only for ``token_accuracy`` and ``tokens_per_second``."""
    total_nll = float(scores.nll.sum())
    tokens = int(scores.n_scored.sum())
    nll_per_token = total_nll / tokens
    return {
        "perplexity": _safe_exp(nll_per_token),
        "nll_per_token": nll_per_token,
        "token_accuracy": float(scores.n_correct.sum()) / tokens,
        "word_perplexity": _safe_exp(total_nll / n_words) if n_words else None,
        "byte_perplexity": _safe_exp(total_nll / n_bytes) if n_bytes else None,
        "bits_per_byte": total_nll / (n_bytes * math.log(2)) if n_bytes else None,
        "scored_tokens": tokens,
        "scored_bytes": n_bytes,
        "scored_words": n_words,
        "n_windows": len(scores.nll),
        "n_nonfinite_windows": scores.n_nonfinite,
        "tokens_per_second": tokens / scores.forward_seconds if scores.forward_seconds > 0 else None,
        "forward_seconds": scores.forward_seconds,
        "batch_sizes": sorted(set(scores.batch_sizes)),
    }


def _safe_exp(x: float) -> float:
    """exp that maps overflow to inf and keeps NaN as NaN (a NaN loss must stay visible)."""
    return x if math.isnan(x) else (math.exp(x) if x < 700 else float("inf"))
