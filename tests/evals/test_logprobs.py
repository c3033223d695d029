"""The shared head step (``esa.evals.logprobs``): only scored positions reach the head, in chunks bounded by the
vocabulary, and the sums equal a full-logits reference computed here.

The reference materialises ``model(...).logits`` (B, P, V) in fp32, takes one log-softmax and sums each row's
masked token NLLs with a Python loop in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from esa.evals import logprobs
from esa.evals.logprobs import head_chunk, hidden_and_head, score_states
from esa.models.architectures import chunked_head
from esa.models.tiny import VOCAB, random_model, tiny_model

B, P = 3, 20


class CountingHead:
    """Wraps a head and records how many positions each call projects."""

    def __init__(self, head):
        self.head, self.calls = head, []
        self.out_features = head.out_features

    def __call__(self, hidden):
        self.calls.append(hidden.shape[0])
        return self.head(hidden)


def inputs(seed: int = 0):
    """ids (B, P+1), a ragged scored mask (B, P) with unscored prefixes and tails, and the targets ids[:, 1:]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, P + 1), generator=g)
    mask = torch.zeros(B, P, dtype=torch.bool)
    mask[0, 2:] = True  # a prefix left unscored (sliding / rolling windows)
    mask[1, 5:9] = True  # a short continuation (zero-shot)
    # row 2 scores nothing
    return ids, mask, ids[:, 1:]


def reference(model, ids, mask, targets):
    """Loop reference: per row, Σ over masked positions of -log_softmax(fp32 logits)[target], in float64."""
    with torch.inference_mode():
        logits = model(input_ids=ids[:, :-1]).logits.float()  # (B, P, V)
    logp = torch.log_softmax(logits, -1)
    nll, correct = [], []
    for b in range(B):
        total, hits = 0.0, 0
        for p in range(P):
            if mask[b, p]:
                total += -float(logp[b, p, targets[b, p]])
                hits += int(logits[b, p].argmax() == targets[b, p])
        nll.append(total)
        correct.append(hits)
    return torch.tensor(nll, dtype=torch.float64), torch.tensor(correct)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=3)


@pytest.mark.parametrize("chunk", [1, 3, 7, 21, None])
def test_sums_equal_the_full_logits_reference(model, chunk):
    ids, mask, targets = inputs()
    with torch.inference_mode():
        states, head = hidden_and_head(model, {"input_ids": ids[:, :-1]})
        nll, n, correct = score_states(states, head, targets, mask, chunk)
    want_nll, want_correct = reference(model, ids, mask, targets)
    torch.testing.assert_close(nll, want_nll, rtol=1e-6, atol=1e-6)
    assert torch.equal(n, mask.sum(1)) and torch.equal(correct, want_correct)
    assert nll[2] == 0.0 and n[2] == 0  # a row without scored positions


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_only_scored_positions_reach_the_head_in_chunks(model, chunk):
    ids, mask, targets = inputs(seed=1)
    _, linear = chunked_head(model)
    head = CountingHead(linear)
    with torch.inference_mode():
        states = model.base_model(input_ids=ids[:, :-1]).last_hidden_state  # (B, P, D)
        score_states(states, head, targets, mask, chunk)
    n_scored = int(mask.sum())
    assert sum(head.calls) == n_scored < B * P
    assert max(head.calls) == min(chunk, n_scored)


def test_default_chunk_is_bounded_by_the_logit_budget(model, monkeypatch):
    monkeypatch.setattr(logprobs, "HEAD_ELEMENTS", 5 * VOCAB + 17)  # room for 5 rows of fp32 logits
    ids, mask, targets = inputs()
    _, linear = chunked_head(model)
    head = CountingHead(linear)
    with torch.inference_mode():
        states = model.base_model(input_ids=ids[:, :-1]).last_hidden_state
        score_states(states, head, targets, mask)
    assert head_chunk(states, head) == 5 and max(head.calls) == 5


def test_logits_without_a_head_are_scored_as_logits(model):
    """States that already are logits (head None: no exact split) give the same sums."""
    ids, mask, targets = inputs()
    with torch.inference_mode():
        logits = model(input_ids=ids[:, :-1]).logits  # (B, P, V)
        got = score_states(logits, None, targets, mask, chunk=4)
    assert head_chunk(logits, None) == logprobs.HEAD_ELEMENTS // VOCAB
    torch.testing.assert_close(got[0], reference(model, ids, mask, targets)[0], rtol=1e-6, atol=1e-6)


def test_non_finite_states_count_only_where_scored(model):
    """A NaN hidden state at an unscored position changes nothing; at a scored one its row's NLL is NaN."""
    ids, mask, targets = inputs()
    _, head = chunked_head(model)
    with torch.inference_mode():
        states = model.base_model(input_ids=ids[:, :-1]).last_hidden_state.clone()
        clean = score_states(states, head, targets, mask)[0]
        states[0, 0] = float("nan")  # unscored (row 0 scores from position 2)
        assert torch.equal(score_states(states, head, targets, mask)[0], clean)
        states[1, 6] = float("nan")  # scored
        got = score_states(states, head, targets, mask)[0]
    assert math.isnan(got[1]) and got[0] == clean[0]


def test_softcapped_head_equals_the_model_logits():
    """Gemma-2's final soft-capping is reproduced by the head step's ``Head``."""
    model = random_model(dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              final_logit_softcapping=5.0, max_position_embeddings=64), seed=2)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        states, head = hidden_and_head(model, {"input_ids": ids})
        want = model(input_ids=ids).logits
        got = head(states)
    assert head is not None and head.cap == 5.0 and head.out_features == VOCAB
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert float(want.abs().max()) <= 5.0
