"""Streaming top-k against brute-force sorts; (out, in) coordinates for GPT-2 Conv1D; memory discipline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from esa.models.architectures import as_out_in
from esa.core.errors import EsaError
from esa.sensitivity import ranking
from esa.sensitivity.scorers import score_parameters, select_params
from esa.sensitivity.topk import TopK, check_k, tensor_topk
from esa.models.tiny import tiny_model

from .conftest import random_batches


def _tied_scores(model, params):
    """|W| rounded to 2 decimals: thousands of exact ties across and within tensors."""
    return [(torch.round(p.detach().abs() * 100) / 100) for p in params.values()]


def _brute(scores, k, largest):
    """Stable sort of every score by (score, parameter order, flat index); the first k."""
    s = np.concatenate([t.reshape(-1).numpy().astype(np.float64) for t in scores])
    pid = np.concatenate([np.full(t.numel(), i) for i, t in enumerate(scores)])
    flat = np.concatenate([np.arange(t.numel()) for t in scores])
    order = np.lexsort((flat, pid, -s if largest else s))[:k]
    return s[order], pid[order], flat[order]


@pytest.mark.parametrize("largest", [True, False])
def test_global_topk_equals_brute_force_with_ties(largest):
    model = tiny_model("llama", seed=2)
    params = select_params(model)
    scores = _tied_scores(model, params)
    k = 700
    top = TopK(k, "global", largest)
    for i, (s, p) in enumerate(zip(scores, params.values())):
        top.add(i, s, p)
    got = top.result()
    values, pid, flat = _brute(scores, k, largest)
    assert len(np.unique(values)) < k / 2  # the case really has ties
    np.testing.assert_array_equal(got.param, pid)
    np.testing.assert_array_equal(got.flat, flat)
    np.testing.assert_array_equal(got.score, values)
    np.testing.assert_array_equal(got.rank, np.arange(1, k + 1))
    weights = [list(params.values())[i].detach().reshape(-1)[j].item() for i, j in zip(pid, flat)]
    np.testing.assert_allclose(got.weight, weights)


def test_per_layer_topk_equals_per_tensor_brute_force():
    model = tiny_model("gpt_neox", seed=0)
    params = select_params(model)
    scores = _tied_scores(model, params)
    top = TopK(50, "per_layer")
    for i, (s, p) in enumerate(zip(scores, params.values())):
        top.add(i, s, p)
    got = top.result()
    for i, s in enumerate(scores):
        _, _, flat = _brute([s], 50, True)
        sel = got.param == i
        np.testing.assert_array_equal(got.flat[sel], flat)
        np.testing.assert_array_equal(got.rank[sel], np.arange(1, 51))


def test_tensor_topk_skips_nan_and_orders_ties_by_index():
    x = torch.tensor([1.0, float("nan"), 3.0, 3.0, 2.0, 3.0])
    values, idx = tensor_topk(x, 4)
    assert idx.tolist() == [2, 3, 5, 4] and values.tolist() == [3.0, 3.0, 3.0, 2.0]
    values, idx = tensor_topk(x, 2, largest=False)
    assert idx.tolist() == [0, 4]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_ranking_coordinates_are_out_in(family):
    model = tiny_model(family, seed=0)
    params = select_params(model)
    res = ranking.score_and_rank(model, params, (), "magnitude", 200)
    for row in res.table.itertuples():
        w = params[row.param].detach()
        out_in = w.t() if family == "gpt2" else w  # Conv1D stores (in, out)
        assert out_in[row.row, row.col].item() == pytest.approx(row.weight)
        assert row.score == pytest.approx(abs(row.weight))
        if family == "gpt2":
            torch.testing.assert_close(as_out_in(w, model), out_in)
    if family == "gpt2":  # c_fc is (in=64, out=256): rows beyond 64 prove the transpose
        fc = res.table[res.table.param.str.contains("c_fc")]
        assert (fc.row >= 64).any() and (fc.col < 64).all()


def test_k_larger_than_weights_is_refused():
    with pytest.raises(EsaError, match="larger than the 30 selected weights"):
        check_k(31, "global", {"a": 10, "b": 20})
    with pytest.raises(EsaError, match="larger than a"):
        check_k(11, "per_layer", {"a": 10, "b": 20})
    check_k(30, "global", {"a": 10, "b": 20})


def test_one_score_tensor_alive_at_a_time(monkeypatch):
    """score_and_rank drops each score tensor before asking the scorer for the next one."""
    model = tiny_model("llama")
    params = select_params(model)
    alive: list[StorageWeakRef] = []  # storage, not Python-object, liveness: views and detach share storage
    peak = [0]

    def tracked(*args):
        for name, score in score_parameters(*args):
            peak[0] = max(peak[0], sum(not r.expired() for r in alive))
            alive.append(StorageWeakRef(score.untyped_storage()))
            yield name, score
            del score

    class BigPool(ranking.TailStats):  # a pool larger than every tensor, so nothing is compacted early
        def __init__(self, total, sample_size, seed):
            super().__init__(total, sample_size, seed, fractions=(0.001, 0.5))

    monkeypatch.setattr(ranking, "score_parameters", tracked)
    monkeypatch.setattr(ranking, "TailStats", BigPool)
    ranking.score_and_rank(model, params, random_batches(), "grad_x_weight", 10)
    assert len(alive) == len(params) and peak[0] == 0


@pytest.mark.parametrize("mode", ["global", "per_layer"])
@pytest.mark.parametrize("k", [1, 7, 60])
def test_matched_floor_equals_brute_force(k, mode):
    """Per tensor: its lowest non-zero scores, as many as it holds in the final top k (a brute-force sort)."""
    from esa.sensitivity.topk import MatchedFloor

    gen = torch.Generator().manual_seed(k)
    weights = [torch.randn(s, generator=gen) for s in ((16, 8), (32,), (8, 8), (40, 4))]
    weights[2][0, :3] = 0.0  # exact zeros are never a floor (zeroing them would change nothing)
    scores = [w.abs() * torch.rand(w.shape, generator=gen) for w in weights]
    top = TopK(k, mode)
    floor = MatchedFloor(top)
    for i, (s, w) in enumerate(zip(scores, weights)):
        top.add(i, s, w)
        floor.add(i, s.clone(), w)
    picked = top.result()
    counts = np.bincount(picked.param, minlength=len(scores))
    got = floor.result()
    for i, (s, w) in enumerate(zip(scores, weights)):
        flat, wf = s.reshape(-1).numpy(), w.reshape(-1).numpy()
        order = [j for j in np.argsort(flat, kind="stable") if wf[j] != 0][: counts[i]]
        assert got.flat[got.param == i].tolist() == order, i
    assert len(got) == len(picked)  # as many floor weights as top weights: memory and output stay O(top)
