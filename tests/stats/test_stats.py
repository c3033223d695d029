"""Paired statistics against scipy and hand formulas; the bootstrap-t CI; seed aggregation; non-finite handling."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from esa import stats
from esa.core.errors import EsaError

BASE = np.array([310.2, 295.7, 402.1, 288.0, 350.5, 333.3, 301.9, 299.4, 360.0, 315.8])
PERT = np.array([312.9, 295.1, 409.8, 290.3, 351.0, 340.2, 303.3, 298.0, 366.6, 318.1])
NTOK = np.array([128, 128, 128, 128, 128, 128, 128, 128, 128, 100])


def test_per_window_delta_and_perplexity():
    d = stats.per_window_delta(BASE, PERT, NTOK)
    np.testing.assert_allclose(d, (PERT - BASE) / NTOK)
    assert stats.perplexity(BASE, NTOK) == pytest.approx(math.exp(BASE.sum() / NTOK.sum()))
    with pytest.raises(EsaError, match="same windows"):
        stats.per_window_delta(BASE, PERT[:-1], NTOK)
    with pytest.raises(EsaError, match="no scored tokens"):
        stats.per_window_delta(BASE, PERT, np.where(NTOK == 100, 0, NTOK))
    with pytest.raises(EsaError, match="empty"):
        stats.per_window_delta([], [], [])


def test_paired_compare_against_scipy_and_hand():
    c = stats.paired_compare(BASE, PERT, NTOK, n_boot=2000, seed=3)
    d = (PERT - BASE) / NTOK
    assert c.n_windows == 10 and c.n_tokens == NTOK.sum()
    assert c.mean_delta_nll == pytest.approx(d.mean())
    assert c.p_wilcoxon == pytest.approx(sps.wilcoxon(d).pvalue)
    assert c.p_ttest == pytest.approx(sps.ttest_rel(PERT / NTOK, BASE / NTOK).pvalue)
    assert c.p_ttest == pytest.approx(sps.ttest_1samp(d, 0.0).pvalue)
    assert c.cohens_dz == pytest.approx(d.mean() / d.std(ddof=1))
    ppl_b, ppl_p = math.exp(BASE.sum() / NTOK.sum()), math.exp(PERT.sum() / NTOK.sum())
    assert (c.ppl_baseline, c.ppl_perturbed) == (pytest.approx(ppl_b), pytest.approx(ppl_p))
    assert c.delta_ppl == pytest.approx(ppl_p - ppl_b)
    assert c.delta_nll_per_token == pytest.approx(math.log(ppl_p / ppl_b))
    assert c.ci_low < c.mean_delta_nll < c.ci_high
    assert not c.collapsed and c.n_nonfinite_perturbed == 0
    row = c.to_dict()
    assert "delta_nll" not in row and row["p_ttest"] == c.p_ttest
    assert c.to_dict(arrays=True)["delta_nll"] == pytest.approx(d.tolist())


def test_wilcoxon_large_sample_matches_scipy():
    rng = np.random.default_rng(0)
    d = rng.normal(0.01, 0.05, 300)
    assert stats.wilcoxon_p(d) == pytest.approx(sps.wilcoxon(d).pvalue)
    assert stats.wilcoxon_p(np.zeros(5)) != stats.wilcoxon_p(np.zeros(5))  # NaN, not an exception


def test_holm_and_bh_hand_example():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted 0.005, 0.01, 0.03, 0.04 → Holm 4·0.005, 3·0.01, 2·0.03, max(1·0.04, 0.06)
    np.testing.assert_allclose(stats.holm(p), [0.03, 0.06, 0.06, 0.02])
    # BH m/j·p: 0.02, 0.02, 0.04, 0.04, then running min from the top
    np.testing.assert_allclose(stats.benjamini_hochberg(p), [0.02, 0.04, 0.04, 0.02])


def _holm_reference(p):
    m, out = len(p), [0.0] * len(p)
    order = sorted(range(m), key=lambda i: p[i])
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def _bh_reference(p):
    m, out = len(p), [0.0] * len(p)
    order = sorted(range(m), key=lambda i: p[i])
    for rank, i in enumerate(order):
        out[i] = min(min(1.0, m / (r + 1) * p[order[r]]) for r in range(rank, m))
    return out


def test_holm_and_bh_against_reference_loops():
    rng = np.random.default_rng(7)
    for _ in range(50):
        p = np.concatenate([rng.uniform(0, 0.1, 5), rng.uniform(0, 1, int(rng.integers(1, 15)))])
        p[rng.integers(0, len(p))] = p[0]  # ties
        np.testing.assert_allclose(stats.holm(p), _holm_reference(list(p)), rtol=1e-12)
        np.testing.assert_allclose(stats.benjamini_hochberg(p), _bh_reference(list(p)), rtol=1e-12)


def test_corrections_keep_nan_and_count_it():
    p = [0.01, float("nan"), 0.02]
    holm, bh = stats.holm(p), stats.benjamini_hochberg(p)
    assert math.isnan(holm[1]) and math.isnan(bh[1])
    np.testing.assert_allclose(holm[[0, 2]], [0.03, 0.04])  # m = 3, NaN ranked last as p = 1
    np.testing.assert_allclose(bh[[0, 2]], [0.03, 0.03])


def _bootstrap_t_loop(x, n_boot, level, seed):
    """Bootstrap-t by hand, one resample at a time: t* = (mean* - mean) / (sd*/√W), interval from its quantiles."""
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    m, se = x.mean(), x.std(ddof=1) / math.sqrt(x.size)
    t = [(x[i].mean() - m) / (x[i].std(ddof=1) / math.sqrt(x.size)) for i in idx]
    q_lo, q_hi = np.quantile(t, [(1 - level) / 2, (1 + level) / 2])
    return m - q_hi * se, m - q_lo * se


def test_bootstrap_t_matches_hand_loop():
    x = np.random.default_rng(2).lognormal(size=12)
    got = stats.bootstrap_t_ci(x, n_boot=800, level=0.9, seed=4)
    assert got == pytest.approx(_bootstrap_t_loop(x, 800, 0.9, 4), rel=1e-9)
    assert got[0] < x.mean() < got[1]


def test_bootstrap_t_seeded_and_blocked(monkeypatch):
    x = np.random.default_rng(1).normal(size=57)
    a = stats.bootstrap_t_ci(x, n_boot=3000, seed=5)
    assert a == stats.bootstrap_t_ci(x, n_boot=3000, seed=5)
    assert a != stats.bootstrap_t_ci(x, n_boot=3000, seed=6)
    monkeypatch.setattr(stats, "_BOOT_BLOCK", 58 * 7)  # many small blocks: same stream, same answer
    assert stats.bootstrap_t_ci(x, n_boot=3000, seed=5) == pytest.approx(a, rel=1e-12)


def test_bootstrap_t_rows_are_independent_samples():
    x = np.random.default_rng(3).normal(size=(4, 9))
    x[2, 5] = math.nan
    low, high = stats.bootstrap_t_ci_rows(x, n_boot=500, seed=1)
    for r in (0, 1, 3):
        assert (low[r], high[r]) == pytest.approx(stats.bootstrap_t_ci(x[r], n_boot=500, seed=1), rel=1e-12)
    assert math.isnan(low[2]) and math.isnan(high[2])


def test_bootstrap_t_degenerate_inputs():
    assert stats.bootstrap_t_ci(np.full(10, 0.25)) == (0.25, 0.25)  # no spread: the mean itself
    assert all(math.isnan(v) for v in stats.bootstrap_t_ci([0.1]))  # one window: no standard error


def test_paired_compare_records_method_and_few_windows():
    c = stats.paired_compare(BASE, PERT, NTOK, n_boot=500)
    assert c.ci_method == stats.CI_METHOD == "bootstrap-t" and c.n_windows >= stats.MIN_WINDOWS
    assert not c.few_windows and c.to_dict()["ci_method"] == "bootstrap-t"
    few = stats.paired_compare(BASE[:5], PERT[:5], NTOK[:5], n_boot=500)
    assert few.few_windows and few.to_dict()["few_windows"] is True
    assert stats.ci_method_label(None) == "percentile bootstrap"  # results stored before ci_method existed


def test_paired_compare_ci_covers_95_percent_at_8_windows():
    """Regression (audit issue 10, defect 2): the percentile bootstrap covered ≈ 89 % here; bootstrap-t ≈ 95 %.

    1,000 experiments of 8 windows with normal per-window ΔNLL (true mean 0.05 nats/token); binomial SE 0.7 %.
    """
    rng = np.random.default_rng(11)
    n = np.full(8, 100)
    covered = 0
    for i in range(1000):
        base = rng.uniform(250, 350, 8)
        pert = base + n * rng.normal(0.05, 0.2, 8)
        c = stats.paired_compare(base, pert, n, n_boot=1000, seed=i)
        covered += c.ci_low <= 0.05 <= c.ci_high
    assert 930 <= covered <= 970


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_perturbed_collapses_explicitly(bad):
    pert = PERT.copy()
    pert[3] = bad
    c = stats.paired_compare(BASE, pert, NTOK, n_boot=500)
    assert c.collapsed and c.n_nonfinite_perturbed == 1
    assert math.isnan(c.ci_low) and math.isnan(c.ci_high)
    assert math.isnan(c.p_wilcoxon) and math.isnan(c.p_ttest) and math.isnan(c.cohens_dz)
    if bad == float("inf"):
        assert c.mean_delta_nll == math.inf and c.ppl_perturbed == math.inf and c.delta_ppl == math.inf
    else:
        assert math.isnan(c.mean_delta_nll) and math.isnan(c.ppl_perturbed)
    assert c.to_dict()["collapsed"] is True


def test_collapse_threshold():
    huge = BASE + NTOK * 5.0  # +5 nats/token: PPL ≈ 15 · e^5 ≈ 2.2k
    assert stats.paired_compare(BASE, huge, NTOK, n_boot=200).collapsed
    assert not stats.paired_compare(BASE, huge, NTOK, n_boot=200, collapse_ppl=1e5).collapsed
    overflow = BASE + NTOK * 800.0  # exp overflows to inf: collapsed, not an exception
    c = stats.paired_compare(BASE, overflow, NTOK, n_boot=200)
    assert c.collapsed and c.ppl_perturbed == math.inf and math.isfinite(c.mean_delta_nll)


def test_aggregate_seeds_matches_t_interval():
    x = np.array([0.12, 0.18, 0.09, 0.15, 0.11])
    agg = stats.aggregate_seeds(x)
    low, high = sps.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sps.sem(x))
    assert (agg.n, agg.mean, agg.sd) == (5, pytest.approx(x.mean()), pytest.approx(x.std(ddof=1)))
    assert (agg.ci_low, agg.ci_high) == (pytest.approx(low), pytest.approx(high))
    one = stats.aggregate_seeds([0.2])
    assert one.mean == 0.2 and math.isnan(one.ci_low)
    bad = stats.aggregate_seeds([0.1, float("inf"), 0.3])
    assert bad.n_nonfinite == 1 and bad.mean == math.inf and math.isnan(bad.ci_high)


def test_aggregate_seeds_log_scale_is_exp_of_log_t_interval():
    """Regression (audit issue 10, defect 3): PPL 3 and 80 gave the linear CI [-448, 531]."""
    x = np.array([3.0, 80.0])
    agg = stats.aggregate_seeds(x, scale="log")
    logs = np.log(x)
    low, high = np.exp(sps.t.interval(0.95, 1, loc=logs.mean(), scale=sps.sem(logs)))
    assert (agg.ci_low, agg.ci_high) == (pytest.approx(low), pytest.approx(high))
    assert agg.mean == pytest.approx(sps.gmean(x)) and agg.ci_low > 0 and agg.scale == "log"
    assert agg.sd == pytest.approx(logs.std(ddof=1))
    three = stats.aggregate_seeds([24.0, 19.5, 31.2], scale="log")
    logs = np.log([24.0, 19.5, 31.2])
    ref = np.exp(sps.t.interval(0.95, 2, loc=logs.mean(), scale=sps.sem(logs)))
    assert (three.ci_low, three.ci_high) == (pytest.approx(ref[0]), pytest.approx(ref[1]))


def test_aggregate_seeds_log_scale_edge_cases():
    collapsed = stats.aggregate_seeds([12.0, math.inf], scale="log")
    assert collapsed.mean == math.inf and collapsed.n_nonfinite == 1 and math.isnan(collapsed.ci_low)
    assert stats.aggregate_seeds([12.0], scale="log").mean == pytest.approx(12.0)
    with pytest.raises(EsaError, match="positive"):
        stats.aggregate_seeds([12.0, 0.0], scale="log")
    with pytest.raises(EsaError, match="unknown scale"):
        stats.aggregate_seeds([12.0], scale="logit")
