"""Simulated coverage of the mean-ΔNLL interval (audit issue 10, defect 2; table in README.md "Intervals").

Each cell draws R experiments of W per-window ΔNLL values at once, an (R, W) matrix, and counts how many of the
R 95 % intervals contain the true mean. With R = 2,000 the binomial standard error at 95 % is 0.5 %; the bounds
are the measured coverage (bench/ci_coverage.py, 4,000 repetitions) minus ~2 standard errors. The percentile
bootstrap that bootstrap-t replaced is re-implemented here to show why it went.
"""

import numpy as np
import pytest

from esa.stats import bootstrap_t_ci_rows

REPS, BOOT = 2000, 1000


def _normal(rng, shape):
    return rng.normal(0.3, 1.0, shape), 0.3


def _lognormal(rng, shape):
    """lognormal(0, 1) shifted by its mean e^0.5, so the true mean is 0: strongly right-skewed (skewness 6.2)."""
    return rng.lognormal(0.0, 1.0, shape) - np.exp(0.5), 0.0


def _percentile_rows(x, n_boot, rng):
    """The replaced method, by hand: 2.5/97.5 % quantiles of the means of n_boot resamples of each row."""
    w = x.shape[1]
    idx = rng.integers(0, w, (n_boot, w))  # (B, W), shared by all rows
    means = np.stack([x[:, i].mean(axis=1) for i in idx], axis=1)  # (R, B)
    return np.quantile(means, 0.025, axis=1), np.quantile(means, 0.975, axis=1)


def _coverage(low, high, mu) -> float:
    return float(np.mean((low <= mu) & (mu <= high)))


@pytest.mark.parametrize("w", [8, 16, 64])
def test_bootstrap_t_covers_95_percent_on_normal_differences(w):
    x, mu = _normal(np.random.default_rng(w), (REPS, w))
    assert 0.93 <= _coverage(*bootstrap_t_ci_rows(x, BOOT, 0.95, seed=w), mu) <= 0.97


@pytest.mark.parametrize(("w", "floor"), [(8, 0.88), (16, 0.89), (64, 0.90)])
def test_bootstrap_t_coverage_floor_on_skewed_differences(w, floor):
    """Measured 0.90 / 0.91 / 0.92 at W = 8 / 16 / 64: short of 95 %, as every method tried (README)."""
    x, mu = _lognormal(np.random.default_rng(100 + w), (REPS, w))
    assert floor <= _coverage(*bootstrap_t_ci_rows(x, BOOT, 0.95, seed=w), mu) <= 0.96


def test_percentile_bootstrap_undercovers_at_8_windows():
    """Why it was replaced: ≈ 0.89 on normal and ≈ 0.78 on lognormal differences at W = 8 (asserted < 0.91 and
    < 0.85 to leave room for Monte-Carlo error), while bootstrap-t on the same samples clears both."""
    rng = np.random.default_rng(8)
    for draw, ceiling in ((_normal, 0.91), (_lognormal, 0.85)):
        x, mu = draw(rng, (REPS, 8))
        assert _coverage(*_percentile_rows(x, BOOT, rng), mu) < ceiling
        assert _coverage(*bootstrap_t_ci_rows(x, BOOT, 0.95, seed=8), mu) > ceiling
