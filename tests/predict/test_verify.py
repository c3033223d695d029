"""Verification of predictions (esa.predict.verify): measured damage vs a direct perturbed forward, the
calibration statistics vs scipy and loops, the screening stop rule in simulation, and the overlap refusal."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

from esa.core.errors import EsaError
from esa.evals.perplexity import collate, score_batch
from esa.perturb import TargetSet, make_op, perturbed
from esa.perturb.protocols.common import EvalConfig, build_cache, make_bench
from esa.predict.taylor import curvature
from esa.predict.verify import (calibration, check_disjoint, flip_rows, measure, random_flips, recall_at, screen,
                                screening_key)
from esa.sensitivity.calibration import batches_from_ids
from esa.sensitivity.scorers import select_params
from helpers.models import tiny_loaded


@pytest.fixture(scope="module")
def bench(tokenizer, corpus):
    lm = tiny_loaded(tokenizer, seed=3)
    return make_bench(lm, EvalConfig(dataset=corpus, context_len=32, max_eval_tokens=31 * 3, seed=1, n_boot=200))


def test_measured_damage_is_the_per_token_nll_change_of_a_direct_forward(bench):
    model = bench.model
    curv = curvature(model, select_params(model), list(batches_from_ids(bench.calib, 2)), "grad_squared")
    rows = flip_rows(model, curv, random_flips(model, curv, 6, seed=2), tau=1.0)
    build_cache(bench, [TargetSet({p: torch.tensor([f])}) for p, f in zip(rows.param, rows.flat)])
    got = measure(bench, rows)
    ids, attn, scored = collate(list(bench.windows), 0)
    base = score_batch(model, ids, attn, scored)[0].sum().item()
    for (name, flat, bit), value in zip(zip(rows.param, rows.flat, rows.bit), got):
        with perturbed(model, TargetSet({name: torch.tensor([flat])}), make_op("bit_flip", bit=int(bit))):
            after = score_batch(model, ids, attn, scored)[0].sum().item()
        want = (after - base) / int(scored[:, 1:].sum()) if np.isfinite(after) else np.inf
        assert value == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_calibration_statistics_equal_scipy_and_a_recall_loop():
    rng = np.random.default_rng(0)
    n = 60
    rows = pd.DataFrame({"regime": ["taylor"] * 40 + ["large"] * 15 + ["nonfinite"] * 5,
                         "second": rng.normal(size=n), "ratio": rng.uniform(1, 10, size=n)})
    rows["measured"] = rows["second"] + rng.normal(scale=0.3, size=n)
    rows.loc[rows.regime != "taylor", "measured"] = np.r_[rng.uniform(5, 20, 15), [np.inf] * 5]
    cal = calibration(rows, n=10)
    t = rows[rows.regime == "taylor"]
    assert cal["taylor"]["spearman"] == pytest.approx(sps.spearmanr(t.second, t.measured).statistic)
    assert cal["taylor"]["kendall"] == pytest.approx(sps.kendalltau(t.second, t.measured).statistic)
    key = screening_key(rows)
    predicted_top = set(np.argsort(-key)[:10])
    worst = np.argsort(-rows["measured"].to_numpy(), kind="stable")[:10]
    assert cal["recall"] == pytest.approx(np.mean([i in predicted_top for i in worst]))
    assert np.all(key[rows.regime == "nonfinite"].min() > key[rows.regime == "large"].max())
    assert cal["nonfinite"] == {"n": 5, "n_collapsed": 5}


def test_recall_counts_ties_at_the_nth():
    measured = np.array([5.0, 5.0, 5.0, 1.0, 0.0])
    assert recall_at(np.array([4.0, 3.0, 0.0, 2.0, 1.0]), measured, n=2) == pytest.approx(2 / 3)


def test_screening_never_misses_the_worst_when_errors_stay_within_the_bound():
    """Simulation: measured = predicted + noise bounded by b; the stop rule must find the top 10 every time."""
    rng = np.random.default_rng(1)
    saved = []
    for trial in range(200):
        pred = rng.lognormal(size=500) * 1e-3
        truth = pred + rng.uniform(-1, 1, size=500) * 2e-4
        rows = pd.DataFrame({"regime": "taylor", "second": pred, "ratio": 0.0, "truth": truth})
        out = screen(rows, lambda r: r["truth"].to_numpy(), n=10, floor=2e-4)
        assert int((out["measured"]["truth"] >= np.sort(truth)[-10]).sum()) == 10, trial
        saved.append(out["n_measured"])
    assert np.mean(saved) < 100  # and it stops early: ≥ 5× fewer than the 500 candidates on average


def test_calibration_windows_overlapping_evaluation_windows_are_refused(bench):
    info = {**bench.info, "calibration_indices": bench.info["window_indices"][:1]}
    overlapping = dataclasses.replace(bench, info=info)
    with pytest.raises(EsaError, match="calibration windows overlap the evaluation windows"):
        check_disjoint(overlapping)
    check_disjoint(bench)
