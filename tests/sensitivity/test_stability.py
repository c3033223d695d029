"""Jaccard / Spearman against hand and scipy values; streaming tail statistics against a full sort."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

from esa.core.errors import EsaError
from esa.sensitivity.ranking import COLUMNS, read_ranking, write_ranking
from esa.sensitivity.stability import TailStats, compare_rankings, jaccard, seed_overlap


def _table(keys, param="p"):
    """A ranking table ranking (row, col) keys in the given order."""
    return pd.DataFrame({"param": param, "layer": pd.array([0] * len(keys), dtype="Int64"), "role": "mlp_down",
                         "row": [r for r, _ in keys], "col": pd.array([c for _, c in keys], dtype="Int64"),
                         "score": np.linspace(1, 0.1, len(keys)), "weight": 0.5,
                         "rank": np.arange(1, len(keys) + 1)})[COLUMNS]


def test_jaccard_by_hand():
    assert jaccard({1, 2, 3}, {2, 3, 4, 5}) == pytest.approx(2 / 5)
    assert jaccard(set(), set()) == 1.0


def test_compare_rankings_docstring_example():
    a, b = _table([(0, 0), (0, 1)]), _table([(0, 1), (0, 2)])  # x y  vs  y z
    out = compare_rankings(a, b)
    assert out["jaccard"] == pytest.approx(1 / 3) and out["n_union"] == 3 and out["n_common"] == 1
    # union (x, y, z): ranks A = (1, 2, 3), B = (3, 1, 2); d = (-2, 1, 1); ρ = 1 - 6·6 / (3·8) = -0.5
    assert out["spearman_union"] == pytest.approx(-0.5)


def test_compare_rankings_matches_scipy():
    rng = np.random.default_rng(0)
    keys = [(int(r), int(c)) for r, c in rng.integers(0, 30, size=(200, 2))]
    keys = list(dict.fromkeys(keys))
    a_keys, b_keys = keys[:80], list(reversed(keys[40:120]))
    out = compare_rankings(_table(a_keys), _table(b_keys))
    union = sorted(set(a_keys) | set(b_keys))
    ra = [a_keys.index(k) + 1 if k in a_keys else len(a_keys) + 1 for k in union]
    rb = [b_keys.index(k) + 1 if k in b_keys else len(b_keys) + 1 for k in union]
    assert out["spearman_union"] == pytest.approx(sps.spearmanr(ra, rb).statistic)
    assert out["jaccard"] == pytest.approx(40 / 120)


def test_seed_overlap_pairs():
    t0, t1, t2 = _table([(0, 0), (0, 1)]), _table([(0, 1), (0, 2)]), _table([(0, 0), (0, 1)])
    out = seed_overlap({0: t0, 1: t1, 2: t2})
    assert out["jaccard_pairs"] == {"0-1": pytest.approx(1 / 3), "0-2": 1.0, "1-2": pytest.approx(1 / 3)}
    assert out["jaccard_min"] == pytest.approx(1 / 3)


def _gini(x: np.ndarray) -> float:
    x = np.sort(x.astype(np.float64))
    n = len(x)
    return float((2 * np.arange(1, n + 1) - n - 1).dot(x) / (n * x.sum()))


def test_tail_stats_match_full_sort():
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.rand(300, 50, generator=gen).pow(6) * 10 ** i for i in range(-3, 3)]
    tensors.append(torch.round(torch.rand(5000, generator=gen) * 4))  # ties and zeros
    tensors.append(torch.tensor([float("nan"), float("inf"), 2.0]))
    total = sum(t.numel() for t in tensors)
    st = TailStats(total, sample_size=1000, seed=0)
    for t in tensors:
        st.add(t)
    out = st.result()
    allv = torch.cat([t.reshape(-1) for t in tensors]).double().numpy()
    finite = allv[np.isfinite(allv)]
    desc = np.sort(finite)[::-1]
    for q, key in ((0.001, "top_0.1pct_share"), (0.01, "top_1pct_share")):
        assert out[key] == pytest.approx(desc[: math.ceil(q * total)].sum() / finite.sum(), rel=1e-9)
    exact = _gini(finite)
    assert out["gini_low"] <= exact <= out["gini_high"] and out["gini_high"] - out["gini_low"] < 2 ** -8
    assert out["n_nonfinite"] == 2 and out["n_zero"] == int((finite == 0).sum()) and out["n_weights"] == total
    assert out["score_max"] == pytest.approx(desc[0])
    assert 900 <= len(st.sample()) <= 1100 and np.isfinite(st.sample()).all()


def test_ranking_roundtrip_parquet_and_csv(tmp_path):
    table = _table([(3, 1), (2, 7)])
    table.loc[1, "col"] = pd.NA  # a 1-D parameter
    paths = write_ranking(table, tmp_path / "r")
    for path in paths:
        back = read_ranking(path)
        pd.testing.assert_frame_equal(back[COLUMNS].reset_index(drop=True), table, check_dtype=False)
    with pytest.raises(EsaError, match="does not exist"):
        read_ranking(tmp_path / "missing.parquet")
    pd.DataFrame({"x": [1]}).to_csv(tmp_path / "bad.csv")
    with pytest.raises(EsaError, match="missing columns"):
        read_ranking(tmp_path / "bad.csv")


def test_layer_role_counts_cover_every_layer():
    from esa.sensitivity.plots import layer_role_counts

    table = pd.concat([_table([(0, 0), (0, 1)]), _table([(1, 1)])], ignore_index=True)
    table["layer"] = pd.array([3, 3, pd.NA], dtype="Int64")
    counts = layer_role_counts(table)
    assert list(counts.index) == ["0", "1", "2", "3", "-"] and int(counts.to_numpy().sum()) == 3
    assert counts.loc["3", "mlp_down"] == 2 and counts.loc["-", "mlp_down"] == 1
