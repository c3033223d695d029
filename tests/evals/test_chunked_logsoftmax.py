"""Chunked fp32 log-softmax (``score_batch``) equals the unchunked computation on a tiny model.

The unchunked reference materialises the full (B, T, V) logits of ``model(...).logits`` in fp32 and takes one
log-softmax, which is what ``score_batch`` avoids for long contexts (see bench/longctx_memory.py).
"""

from __future__ import annotations

import pytest
import torch

from esa.data.windows import Window
from esa.evals.perplexity import collate, score_batch
from esa.models.tiny import tiny_model

PAD = 0


def unchunked(model, ids, attn, scored):
    """Reference: full logits (B, T-1, V) → fp32 log_softmax → summed NLL (float64), counts, correct."""
    with torch.inference_mode():
        logits = model(input_ids=ids[:, :-1], attention_mask=attn[:, :-1]).logits.float()  # (B, T-1, V)
    logprobs = torch.log_softmax(logits, dim=-1)
    targets, mask = ids[:, 1:], scored[:, 1:]  # (B, T-1)
    tok_nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    nll = (tok_nll.double() * mask).sum(1)
    correct = ((logits.argmax(-1) == targets) & mask).sum(1)
    return nll, mask.sum(1), correct


def greedy_fill(model, ids: torch.Tensor) -> torch.Tensor:
    """Set every third token to the model's argmax given the tokens before it, so argmax accuracy is non-zero."""
    ids = ids.clone()
    for t in range(2, len(ids), 3):
        with torch.inference_mode():
            ids[t] = model(input_ids=ids[None, :t]).logits[0, -1].argmax()
    return ids


def batch(model, seed: int = 0):
    """Three right-padded windows of different lengths, with partly unscored prefixes (like rolling/sliding)."""
    g = torch.Generator().manual_seed(seed)
    lengths, unscored = (23, 17, 9), (1, 6, 3)
    windows = []
    for n, u in zip(lengths, unscored):
        ids = greedy_fill(model, torch.randint(3, 49152, (n,), generator=g))
        scored = torch.ones(n, dtype=torch.bool)
        scored[:u] = False
        windows.append(Window(ids, scored, 0, 0))
    return collate(windows, PAD)


@pytest.fixture(scope="module", params=["llama", "gpt_neox", "gpt2"])
def model(request):
    return tiny_model(request.param, seed=1)


@pytest.fixture(scope="module")
def case(model):
    """(ids, attn, scored) of one batch and its unchunked reference, built once per model."""
    ids, attn, scored = batch(model)
    return (ids, attn, scored), unchunked(model, ids, attn, scored)


def test_reference_has_correct_predictions(case):
    _, (_, _, ref_correct) = case
    assert int(ref_correct.sum()) > 0  # the accuracy comparison below is not vacuous


@pytest.mark.parametrize("chunk", [1, 2, 5, 21, 22, 23, 512])
def test_chunked_equals_unchunked(model, case, chunk):
    (ids, attn, scored), (ref_nll, ref_n, ref_correct) = case
    nll, n, correct = score_batch(model, ids, attn, scored, chunk=chunk)
    assert torch.equal(n, ref_n)
    assert torch.equal(correct, ref_correct)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-6, atol=1e-6)


def test_chunk_sizes_agree_with_each_other(model):
    ids, attn, scored = batch(model, seed=7)
    outs = [score_batch(model, ids, attn, scored, chunk=c) for c in (1, 4, 1000)]
    for nll, n, correct in outs[1:]:
        torch.testing.assert_close(nll, outs[0][0], rtol=1e-6, atol=1e-6)
        assert torch.equal(correct, outs[0][2]) and torch.equal(n, outs[0][1])
