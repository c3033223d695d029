"""The head and fp32 log-probability step that every scorer shares.

The scorers are evaluation windows, zero-shot continuations, prefix-cache replays and packed shared contexts.
A scorer runs the backbone once over its inputs and gets the final hidden states (B, P, D). Only the positions
that predict a scored token go through the output head. They are picked by a (B, P) bool mask and projected in
chunks of at most :data:`HEAD_ELEMENTS` fp32 logits (chunk tokens × V). So the logits held at any time are
bounded by the vocabulary alone, never by the batch or the context. Unscored positions cost nothing:

* a sliding window scores stride/ctx of its positions;
* a rolling document's last window scores only its new tokens;
* a zero-shot request scores only its continuation;
* padding is never scored.

Each chunk's log-softmax runs in fp32 whatever the weight dtype. The token NLLs of a row are summed in float64,
in position order, by a dense (B, P) reduction; unlike ``index_add_``, that reduction is deterministic on CUDA.
"""

from __future__ import annotations

import torch

from esa.models.architectures import chunked_head

HEAD_ELEMENTS = 1 << 26  # fp32 logits per head chunk (256 MiB): chunk tokens = HEAD_ELEMENTS // V


def hidden_and_head(model, inputs: dict):
    """Final hidden states (B, T, D) and the head function, or full logits (B, T, V) and None when no exact
    split exists. ``inputs``: the forward's keyword arguments (``input_ids``, ``attention_mask``, …)."""
    split = chunked_head(model)
    if split is None:
        return model(**inputs).logits, None
    backbone, head_fn = split
    return backbone(**inputs).last_hidden_state, head_fn


def head_chunk(states: torch.Tensor, head_fn) -> int:
    """Tokens per head chunk: :data:`HEAD_ELEMENTS` // V, V read from the head (or from ``states`` when they
    already are logits, ``head_fn`` None)."""
    vocab = states.shape[-1] if head_fn is None else head_fn.out_features
    return max(1, HEAD_ELEMENTS // vocab)


def score_states(states: torch.Tensor, head_fn, targets: torch.Tensor, mask: torch.Tensor,
                 chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed NLL (B,) float64, scored counts (B,) and argmax-correct counts (B,) of each row's masked positions.

    ``states`` (B, P, D) are final-norm hidden states, or (B, P, V) logits when ``head_fn`` is None. ``targets``
    and ``mask`` (B, P): the token each position predicts, and whether it is scored. For a window, position p
    predicts token p+1, so they are ``ids[:, 1:]`` and ``scored[:, 1:]``. ``head_fn`` maps (n, D) states to
    (n, V) logits; it is called on the masked positions only, ``chunk`` tokens at a time (default
    :func:`head_chunk`). Example: mask [[F, T, T], [T, F, F]] sends 3 positions to the head, whatever P is.
    """
    rows, cols = mask.nonzero(as_tuple=True)  # (N,) each, row-major: each row's positions in order
    tgt = targets[rows, cols]  # (N,)
    step = chunk or head_chunk(states, head_fn)
    tok_nll = torch.empty(len(tgt), dtype=torch.float32, device=states.device)
    hit = torch.empty(len(tgt), dtype=torch.bool, device=states.device)
    for s in range(0, len(tgt), step):
        part = states[rows[s:s + step], cols[s:s + step]]  # (n, D), or (n, V) logits
        logits = (head_fn(part) if head_fn else part).float()  # (n, V) fp32
        t = tgt[s:s + step, None]  # (n, 1)
        tok_nll[s:s + step] = -torch.log_softmax(logits, dim=-1).gather(-1, t).squeeze(-1)
        hit[s:s + step] = logits.argmax(-1) == t.squeeze(-1)
    dense = torch.zeros(mask.shape, dtype=torch.float64, device=states.device)
    dense[rows, cols] = tok_nll.double()
    correct = torch.zeros(mask.shape, dtype=torch.long, device=states.device)
    correct[rows, cols] = hit.long()
    return dense.sum(1).cpu(), mask.sum(1).cpu(), correct.sum(1).cpu()
