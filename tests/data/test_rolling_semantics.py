"""Independent check of ESA's ``rolling`` windows against lm-evaluation-harness ``loglikelihood_rolling``.

The reference here is written from the *semantics* of lm-eval 0.4.x (``utils.get_rolling_token_windows`` with
``context_len=1`` followed by ``utils.make_disjoint_window``, as called by ``HFLM.loglikelihood_rolling``),
not from its code:

* a document t0..t(n-1) is predicted in disjoint blocks of up to ``ctx`` tokens: the first block is
  t0..t(min(ctx, n)-1), each later block the next ``ctx`` tokens (the last one may be shorter);
* the first block is predicted from the prefix token P (BOS, else EOS): the model reads P t0 .. t(first-2);
* a later block ending at token index ``e`` (exclusive) is predicted from the ``ctx`` tokens t(e-ctx-1) ..
  t(e-2) — the window is shifted left to a full context, so a short last block still sees ``ctx`` tokens;
* hence token i of a block that ends at ``e`` is predicted from exactly t(max(0, e-ctx-1)) .. t(i-1), with P
  in front for the first block. Every token is scored exactly once.

Worked example, n=10, ctx=4: blocks [0,4) [4,8) [8,10); t9 is predicted from t5 t6 t7 t8 (e=10 → t5..t8).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esa.data.windows import make_windows, rolling_windows
from esa.evals.perplexity import evaluate_windows
from esa.models.tiny import tiny_model

PREFIX = 1  # a prefix id that no fixture token uses, so contexts are unambiguous


def reference_contexts(n: int, ctx: int, prefix: int) -> list[list]:
    """For each document index i, the token sequence the model must read to predict t_i.

    Tokens are written as ("t", j) for document token j and ("P",) for the prefix, independent of any ids.
    """
    out = []
    end = min(ctx, n)
    block_ends = [end]
    while end < n:
        end = min(end + ctx, n)
        block_ends.append(end)
    begin = 0
    for k, e in enumerate(block_ends):
        for i in range(begin, e):
            if k == 0:
                out.append([("P",)] + [("t", j) for j in range(i)])
            else:
                out.append([("t", j) for j in range(e - ctx - 1, i)])
        begin = e
    return out


def symbolic(ids: list[int], base: int) -> list:
    """Map fixture ids back to symbols: ``PREFIX`` → ("P",), ``base + j`` → ("t", j)."""
    return [("P",) if x == PREFIX else ("t", x - base) for x in ids]


def esa_contexts(n: int, ctx: int, base: int = 100) -> tuple[list, list[int], list[torch.Tensor]]:
    """ESA's (context, target) per scored token, in window order, for document ``base .. base+n-1``."""
    doc = torch.arange(base, base + n)
    windows = rolling_windows([doc], ctx, PREFIX)
    contexts, targets = [], []
    for w in windows:
        ids = w.input_ids.tolist()
        for j in torch.nonzero(w.scored).flatten().tolist():
            contexts.append(symbolic(ids[:j], base))
            targets.append(ids[j] - base)
    return contexts, targets, [w.input_ids for w in windows]


CASES = [  # (n, ctx): shorter than ctx, exact multiples, remainders, tiny contexts
    (1, 4), (3, 4), (4, 4), (5, 4), (8, 4), (10, 4), (12, 4), (13, 4),
    (1, 2), (2, 2), (3, 2), (7, 2), (6, 3), (7, 3), (30, 7), (49, 16), (64, 16),
]


@pytest.mark.parametrize("n,ctx", CASES)
def test_every_token_scored_once_with_reference_context(n, ctx):
    contexts, targets, _ = esa_contexts(n, ctx)
    assert targets == list(range(n))  # every token once, in order
    assert contexts == reference_contexts(n, ctx, PREFIX)


@pytest.mark.parametrize("n,ctx", CASES)
def test_window_inputs_are_the_ctx_tokens_before_the_last_target(n, ctx):
    _, _, windows = esa_contexts(n, ctx)
    first = min(ctx, n)
    assert windows[0].tolist() == [PREFIX] + list(range(100, 100 + first))  # first predicted from P
    for ids in windows[1:]:
        last = int(ids[-1]) - 100
        # the model reads ids[:-1]: exactly ctx document tokens ending just before the last target
        assert ids[:-1].tolist() == list(range(100 + last - ctx, 100 + last))
    assert all(len(ids) - 1 <= ctx for ids in windows)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), ctx=st.integers(2, 20))
def test_rolling_matches_reference_for_any_length(n, ctx):
    contexts, targets, _ = esa_contexts(n, ctx)
    assert targets == list(range(n))
    assert contexts == reference_contexts(n, ctx, PREFIX)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from esa.models import resolve_source

    _, location, _ = resolve_source("smollm2-135m")
    return AutoTokenizer.from_pretrained(location)


def test_prefix_is_bos_like_lm_eval_hflm(tokenizer):
    """HFLM.prefix_token_id: the tokenizer's BOS if it has one, else EOS (lm_eval 0.4.x)."""
    assert tokenizer.bos_token_id is not None
    ws = make_windows(tokenizer, ("def f(): pass",), "rolling", ctx=8)
    assert int(ws.windows[0].input_ids[0]) == tokenizer.bos_token_id
    no_bos = copy.deepcopy(tokenizer)
    no_bos.bos_token = None
    assert no_bos.bos_token_id is None
    ws = make_windows(no_bos, ("def f(): pass",), "rolling", ctx=8)
    assert int(ws.windows[0].input_ids[0]) == tokenizer.eos_token_id


def brute_force_nll(model, doc_ids: list[int], ctx: int, prefix: int) -> float:
    """Σ −log p(t_i | reference context of t_i), one forward per token, fp32 log-softmax."""
    total = 0.0
    for i, context in enumerate(reference_contexts(len(doc_ids), ctx, prefix)):
        ids = [prefix if s == ("P",) else doc_ids[s[1]] for s in context]
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()  # (V,)
        total -= float(torch.log_softmax(logits, -1)[doc_ids[i]])
    return total


@pytest.mark.parametrize("ctx", [5, 16, 64])
def test_rolling_nll_equals_token_by_token_brute_force(tokenizer, ctx):
    docs = ("The quick brown fox jumps over the lazy dog, twice.",
            "x = [i * i for i in range(10)]\nprint(sum(x))\n# squares of the first ten integers",
            "Short.")
    model = tiny_model("llama", seed=3)
    ws = make_windows(tokenizer, docs, "rolling", ctx=ctx)
    scores = evaluate_windows(model, ws.windows, tokenizer.eos_token_id, token_budget=4 * (ctx + 1))
    per_doc = np.zeros(len(docs))
    np.add.at(per_doc, [w.doc for w in ws.windows], scores.nll)
    for d, text in enumerate(docs):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        expected = brute_force_nll(model, ids, ctx, tokenizer.bos_token_id)
        assert per_doc[d] == pytest.approx(expected, rel=1e-5)
    n_doc_tokens = sum(len(tokenizer(t, add_special_tokens=False).input_ids) for t in docs)
    assert int(scores.n_scored.sum()) == n_doc_tokens == ws.corpus_tokens
