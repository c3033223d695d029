"""Shared-context scoring: the options of one zero-shot item in one sequence, their context run once.

lm-eval scores an item with context C and options x_1..x_k as k sequences ``(C + x_i)[:-1]``, so the context
runs k times. Here the item is one sequence ``C ⊕ x_1[:-1] ⊕ … ⊕ x_k[:-1]`` with a 4-D attention mask and
restarted position ids:

- a context token attends causally to the context;
- a token of option i attends to the whole context and causally to its own segment, never to another option;
- option i's position ids restart at |C|, so each token sees exactly the keys, values and positions it sees in
  its own plain sequence.

Option i's log-likelihood reads the logits at C's last position (→ x_i[0]) and at its segment's positions
(→ x_i[1:]); "every one is the argmax" is lm-eval's ``is_greedy``. The numbers equal the plain path to float
rounding (a test holds them to 1e-5) on |C| + Σ(|x_i| − 1) tokens instead of Σ(|C| + |x_i| − 1).

Example: C = [c0 c1 c2], x_1 = [a0 a1], x_2 = [b0 b1 b2] → ids [c0 c1 c2 a0 b0 b1], positions [0 1 2 3 3 4];
x_1 is scored at positions (2 → a0, 3 → a1), x_2 at (2 → b0, 4 → b1, 5 → b2).

An item is packed only when it has ≥ 2 options sharing the same context tokens and every option fits
untruncated in the model's positions (and its sliding window, if any); otherwise its options stay plain windows
(:func:`continuation_window`). Whether a model honours custom 4-D masks and position ids depends on its
attention kernel, so :func:`agreement` compares both paths on the first items before a run relies on packing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from esa.data.windows import Window
from esa.evals.logprobs import hidden_and_head, score_states
from esa.evals.perplexity import collate

AGREE_RTOL = {torch.float32: 1e-4, torch.float64: 1e-6}  # packed vs plain, per item; half dtypes: HALF_TOL
HALF_TOL = (1e-2, 5e-2)  # (rtol, atol in nats) for bf16/fp16, whose kernels differ in reduction order


@dataclass(frozen=True)
class SharedContext:
    """One context and the options scored after it, as a single packed sequence."""

    context: tuple[int, ...]  # (C,) token ids, C ≥ 1
    options: tuple[tuple[int, ...], ...]  # k continuations, each ≥ 1 token

    @property
    def length(self) -> int:
        """Tokens the model reads: |C| + Σ(|x_i| − 1)."""
        return len(self.context) + sum(len(x) - 1 for x in self.options)

    @property
    def n_outputs(self) -> int:
        return len(self.options)

    def plain(self) -> list[Window]:
        """The same options as one plain window each (the reference path)."""
        return [continuation_window(self.context, x, len(self.context) + len(x)) for x in self.options]


Unit = Window | SharedContext


def continuation_window(context: tuple[int, ...], continuation: tuple[int, ...], max_length: int) -> Window:
    """The last L+1 tokens of context + continuation, only the continuation scored (lm-eval's request)."""
    ids = (context + continuation)[-(max_length + 1):]
    scored = torch.zeros(len(ids), dtype=torch.bool)
    scored[len(ids) - len(continuation):] = True
    return Window(torch.tensor(ids, dtype=torch.long), scored, doc=0, start=0)


def unit_length(unit: Unit) -> int:
    """Tokens of a unit as batched: a window's ids, a shared context's packed sequence."""
    return unit.length if isinstance(unit, SharedContext) else len(unit.input_ids)


def n_outputs(unit: Unit) -> int:
    """Scores a unit yields: one per window, one per option of a shared context."""
    return unit.n_outputs if isinstance(unit, SharedContext) else 1


def pack(pairs: list[tuple[int, tuple[int, ...], tuple[int, ...]]], max_length: int,
         sliding_window: int | None = None) -> list[Unit]:
    """(item, context, continuation) triples, options of an item adjacent → units yielding one score per triple,
    in order. Consecutive triples of one item with equal context tokens share a context when they all fit."""
    limit = min(max_length + 1, (sliding_window or max_length) + 1)
    units: list[Unit] = []
    i = 0
    while i < len(pairs):
        j = i + 1
        while j < len(pairs) and pairs[j][:2] == pairs[i][:2]:
            j += 1
        item, context = pairs[i][:2]
        options = tuple(p[2] for p in pairs[i:j])
        if j - i >= 2 and context and all(len(context) + len(x) <= limit for x in options):
            units.append(SharedContext(context, options))
        else:
            units += [continuation_window(context, x, max_length) for x in options]
        i = j
    return units


@dataclass
class PackedBatch:
    """Shared-context units right-padded to one batch; S = their options in order, M = longest option."""

    ids: torch.Tensor  # (B, T) long
    mask: torch.Tensor  # (B, 1, T, T) additive float: 0 = attend, dtype min = masked
    positions: torch.Tensor  # (B, T) long
    gather: torch.Tensor  # (S, M) flat indices into B·T of the positions predicting each option token
    targets: torch.Tensor  # (S, M) the option tokens
    valid: torch.Tensor  # (S, M) bool

    def to(self, device) -> PackedBatch:
        return PackedBatch(*(t.to(device) for t in (self.ids, self.mask, self.positions, self.gather,
                                                     self.targets, self.valid)))

    @property
    def forward(self) -> dict:
        """Keyword arguments of the model's forward for this batch."""
        return {"input_ids": self.ids, "attention_mask": self.mask, "position_ids": self.positions}


def _layout(unit: SharedContext) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    """ids, segment (0 = context, i+1 = option i), positions, and per option the positions predicting it."""
    C = len(unit.context)
    ids, seg, pos, reads = list(unit.context), [0] * C, list(range(C)), []
    for i, x in enumerate(unit.options):
        start = len(ids)
        ids += x[:-1]
        seg += [i + 1] * (len(x) - 1)
        pos += range(C, C + len(x) - 1)
        reads.append([C - 1, *range(start, start + len(x) - 1)])
    return ids, seg, pos, reads


def collate_shared(units: list[SharedContext], pad_id: int, dtype: torch.dtype) -> PackedBatch:
    """One padded batch of packed units; padding positions attend only to themselves (never scored)."""
    B, T = len(units), max(u.length for u in units)
    M = max(len(x) for u in units for x in u.options)
    S = sum(u.n_outputs for u in units)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    allowed = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1)  # (B, T, T)
    positions = torch.zeros((B, T), dtype=torch.long)
    gather, targets = torch.zeros((S, M), dtype=torch.long), torch.zeros((S, M), dtype=torch.long)
    valid = torch.zeros((S, M), dtype=torch.bool)
    s = 0
    for b, unit in enumerate(units):
        u_ids, seg, pos, reads = _layout(unit)
        n = len(u_ids)
        ids[b, :n], positions[b, :n] = torch.tensor(u_ids), torch.tensor(pos)
        seg_t = torch.tensor(seg)
        same = (seg_t[None, :] == 0) | (seg_t[None, :] == seg_t[:, None])  # key is context or own segment
        allowed[b, :n, :n] = torch.tril(same)
        for x, read in zip(unit.options, reads):
            gather[s, :len(x)] = b * T + torch.tensor(read)
            targets[s, :len(x)], valid[s, :len(x)] = torch.tensor(x), True
            s += 1
    mask = torch.zeros((B, 1, T, T), dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    return PackedBatch(ids, mask, positions, gather, targets, valid)


def score_packed(states: torch.Tensor, head_fn, batch: PackedBatch) -> tuple[torch.Tensor, ...]:
    """Summed NLL (S,), scored (S,) and argmax-correct (S,) counts per option from (B, T, D) final states
    (or (B, T, V) logits with ``head_fn`` None)."""
    picked = states.flatten(0, 1)[batch.gather]  # (S, M, D)
    return score_states(picked, head_fn, batch.targets, batch.valid)


@torch.inference_mode()
def score_shared(model, units: list[SharedContext], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Full forward of one batch of packed units: per option summed NLL, scored and correct counts."""
    device = model.get_input_embeddings().weight.device
    batch = collate_shared(units, pad_id, model.get_input_embeddings().weight.dtype).to(device)
    states, head_fn = hidden_and_head(model, batch.forward)
    return score_packed(states, head_fn, batch)


@torch.inference_mode()
def agreement(model, units: list[Unit], pad_id: int, n_items: int = 8) -> str:
    """'' when the first ``n_items`` shared contexts score as their plain windows do, else why not.

    Tolerance: relative 1e-4 per option in fp32 (a correct packing agrees to ~1e-6); in bf16/fp16 relative
    1e-2 or 0.05 nats, since the masked and causal kernels sum in different orders there. A model whose
    kernel ignores the custom mask lets options see each other and misses by nats.
    """
    from esa.evals.perplexity import score_batch

    shared = [u for u in units if isinstance(u, SharedContext)][:n_items]
    if not shared:
        return ""
    got = score_shared(model, shared, pad_id)[0].numpy()
    plain = [w for u in shared for w in u.plain()]
    want = score_batch(model, *collate(plain, pad_id))[0].numpy()
    dtype = model.get_input_embeddings().weight.dtype
    rtol, atol = (AGREE_RTOL[dtype], 0.0) if dtype in AGREE_RTOL else HALF_TOL
    if np.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
        return ""
    return (f"shared-context scores differ from plain windows by up to {np.nanmax(np.abs(got - want)):.3g} nats "
            f"on the first {len(shared)} items (this attention implementation does not honour custom 4-D masks)")
