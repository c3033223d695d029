"""Shared-context scoring (esa.evals.shared_context): the packed layout, equality with plain windows per
architecture, the packing rules, the prefix-cache replay of packed batches, and the fallback when a model's
attention does not honour the custom mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import esa.evals.shared_context as sc
from esa.evals.perplexity import collate, score_batch
from esa.evals.shared_context import SharedContext, agreement, collate_shared, pack, score_shared
from esa.models.tiny import tiny_model
from esa.perturb import from_coordinates, make_op, perturbed
from esa.perturb.prefix_cache import PrefixCache

ITEMS = [  # (context, options): several options, a one-token option, unequal lengths
    ((5, 9, 13, 2), ((7, 8), (11,), (3, 4, 6, 10))),
    ((21, 22, 23, 24, 25, 26), ((30, 31, 32), (40, 41, 42))),
    ((1,), ((50, 51), (52, 53, 54))),
]


def _units():
    return [SharedContext(c, o) for c, o in ITEMS]


def _plain_scores(model, units):
    windows = [w for u in units for w in u.plain()]
    return score_batch(model, *collate(windows, pad_id=0))


def test_layout_matches_the_worked_example_in_the_module_docstring():
    batch = collate_shared([SharedContext((100, 101, 102), ((200, 201), (300, 301, 302)))], 0, torch.float32)
    assert batch.ids.tolist() == [[100, 101, 102, 200, 300, 301]]
    assert batch.positions.tolist() == [[0, 1, 2, 3, 3, 4]]
    assert batch.gather.tolist() == [[2, 3, 0], [2, 4, 5]]
    assert batch.targets.tolist() == [[200, 201, 0], [300, 301, 302]]
    allowed = (batch.mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                       [1, 1, 1, 1, 0, 0],  # option 1's token: the context and itself
                       [1, 1, 1, 0, 1, 0],  # option 2's first token never sees option 1
                       [1, 1, 1, 0, 1, 1]]


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2"])
def test_packed_scores_equal_plain_windows(family):
    model = tiny_model(family, seed=2)
    nll, n_scored, n_correct = score_shared(model, _units(), pad_id=0)
    want = _plain_scores(model, _units())
    np.testing.assert_allclose(nll.numpy(), want[0].numpy(), rtol=1e-5)
    assert n_scored.tolist() == want[1].tolist() == [len(x) for _, opts in ITEMS for x in opts]
    assert n_correct.tolist() == want[2].tolist()
    assert agreement(model, _units(), pad_id=0) == ""


def test_packed_scores_equal_plain_windows_on_the_embedded_model(smol):
    ids = smol.tokenizer("The quick brown fox jumps over the lazy dog because").input_ids
    opts = [smol.tokenizer(t).input_ids for t in (" it was bored", " the dog", " foxes always do that")]
    units = [SharedContext(tuple(ids), tuple(map(tuple, opts)))]
    got = score_shared(smol.model, units, pad_id=0)[0].numpy()
    np.testing.assert_allclose(got, _plain_scores(smol.model, units)[0].numpy(), rtol=1e-5)


def test_pack_shares_only_adjacent_options_with_equal_context_that_fit():
    a, b = (1, 2, 3), (4, 5)
    pairs = [(0, a, (7,)), (0, a, (8, 9)),  # item 0: shared
             (1, a, (7,)),  # item 1: one option → a plain window
             (2, a, (7,)), (2, b, (7,)),  # item 2: winogrande-style different contexts → plain windows
             (3, a, (1, 2, 3, 4)), (3, a, (5,))]  # item 3: 3 + 4 tokens > L + 1 = 6 → plain, truncated
    units = pack(pairs, max_length=5)
    assert [type(u).__name__ for u in units] == ["SharedContext", "Window", "Window", "Window", "Window", "Window"]
    assert units[0] == SharedContext(a, ((7,), (8, 9)))
    assert units[4].input_ids.tolist() == [2, 3, 1, 2, 3, 4]  # (ctx + cont)[-(L+1):], as lm-eval truncates
    assert sum(sc.n_outputs(u) for u in units) == len(pairs)
    assert [type(u).__name__ for u in pack(pairs[:2], max_length=5, sliding_window=3)] == ["Window", "Window"]


def test_prefix_cache_replays_packed_batches_like_a_full_forward():
    model = tiny_model("llama", seed=4)
    units = [*_units(), *_units()[0].plain()]  # shared contexts and plain windows in one cache
    cache = PrefixCache(model, units, pad_id=0, layers=[1], token_budget=24)
    assert cache.supported and len(cache.baseline.nll) == 7 + 3
    name = "model.layers.1.mlp.down_proj.weight"
    targets = from_coordinates(model, [{"param": name, "row": 3, "col": c} for c in range(32)])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with perturbed(model, targets, make_op("scale", factor=30.0)):
        fast = cache.score_params([name])
        full = cache.score_full()
        plain = _plain_scores(model, _units())[0].numpy()
    assert fast.start_layer == 1 and not fast.full_forward
    np.testing.assert_allclose(fast.nll, full.nll, rtol=1e-5)
    np.testing.assert_allclose(fast.nll[:7], plain, rtol=1e-5)
    assert not np.allclose(fast.nll, cache.baseline.nll, rtol=1e-3)  # the perturbation moved the scores
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_agreement_reports_a_mask_the_model_does_not_honour(monkeypatch):
    model = tiny_model("llama", seed=2)
    real = sc.collate_shared

    def causal_only(units, pad_id, dtype):  # what a kernel ignoring the custom mask would compute
        batch = real(units, pad_id, dtype)
        T = batch.ids.shape[1]
        causal = torch.triu(torch.full((T, T), torch.finfo(dtype).min), diagonal=1)
        batch.mask = causal.expand_as(batch.mask).clone()
        return batch

    monkeypatch.setattr(sc, "collate_shared", causal_only)
    reason = agreement(model, _units(), pad_id=0)
    assert "differ from plain windows" in reason and "custom 4-D masks" in reason
