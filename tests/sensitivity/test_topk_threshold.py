"""Global top-k's threshold skip/filter against a brute-force sort: ties at the threshold, NaN, any feed order."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from esa.sensitivity.topk import TopK


def _brute(scores: list[torch.Tensor], k: int, largest: bool):
    """(score, param, flat) of the k best by (score, param index, flat index); NaN last."""
    s = np.concatenate([t.reshape(-1).double().numpy() for t in scores])
    pid = np.concatenate([np.full(t.numel(), i) for i, t in enumerate(scores)])
    flat = np.concatenate([np.arange(t.numel()) for t in scores])
    key = np.where(np.isnan(s), -np.inf if largest else np.inf, s)
    order = np.lexsort((flat, pid, -key if largest else key))[:k]
    return s[order], pid[order], flat[order]


def _run(scores, k, largest, feed):
    top = TopK(k, "global", largest)
    for i in feed:
        top.add(int(i), scores[i], scores[i] * 10)  # "weights" = 10 × score, to check the gather
    return top.result()


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=8), levels=st.integers(1, 6),
       nan_rate=st.sampled_from([0.0, 0.2]), largest=st.booleans(), seed=st.integers(0, 2**31 - 1),
       shuffle=st.booleans(), k_frac=st.floats(0.01, 1.0))
def test_global_topk_matches_brute_force(sizes, levels, nan_rate, largest, seed, shuffle, k_frac):
    """Few distinct values → many ties with the running threshold; a shuffled feed order breaks the usual
    "later tensors lose ties" assumption, which the skip test must then not rely on."""
    gen = torch.Generator().manual_seed(seed)
    scores = []
    for n in sizes:
        t = torch.randint(0, levels, (n,), generator=gen).float()
        t[torch.rand(n, generator=gen) < nan_rate] = float("nan")
        scores.append(t)
    k = max(1, int(k_frac * sum(sizes)))
    feed = torch.randperm(len(scores), generator=gen).tolist() if shuffle else range(len(scores))
    got = _run(scores, k, largest, feed)
    values, pid, flat = _brute(scores, k, largest)
    np.testing.assert_array_equal(got.param, pid)
    np.testing.assert_array_equal(got.flat, flat)
    np.testing.assert_array_equal(got.score, values)
    np.testing.assert_array_equal(got.weight, values * 10)
    np.testing.assert_array_equal(got.rank, np.arange(1, len(values) + 1))


def test_equal_to_threshold_in_a_later_tensor_does_not_enter():
    """A later tensor whose best equals the k-th best loses the tie; an earlier-indexed one wins it."""
    a, b = torch.tensor([5.0, 3.0]), torch.tensor([3.0, 1.0])
    got = _run([a, b], 2, True, [0, 1])
    assert got.param.tolist() == [0, 0] and got.flat.tolist() == [0, 1]
    got = _run([b, a], 2, True, [1, 0])  # tensor 0 (b) fed second but ranks first among the ties
    assert got.param.tolist() == [1, 0] and got.flat.tolist() == [0, 0]


def test_nan_threshold_lets_finite_scores_in():
    """While the held k include NaN (too few finite scores), any finite score must still enter."""
    got = _run([torch.tensor([float("nan"), 1.0]), torch.tensor([0.5])], 2, True, [0, 1])
    assert got.score.tolist() == [1.0, 0.5] and got.param.tolist() == [0, 1]
