"""Paired statistics for "baseline vs perturbed on the same windows", and aggregation across seeds.

Inputs are the per-window *summed* NLLs (nats) of the unperturbed and the perturbed model on the same windows,
plus each window's scored-token count (as returned by :func:`esa.evals.perplexity.evaluate_windows`).

Definitions (W windows, window w with n_w scored tokens):

* per-window ΔNLL  ``d_w = (nll_pert_w - nll_base_w) / n_w`` — nats per token, so windows of different
  lengths are comparable; positive means the perturbation hurt.
* ``mean_delta_nll = mean_w d_w`` (each window weighs the same), with a seeded percentile-bootstrap CI
  (windows resampled with replacement, all resamples drawn as one index matrix).
* ``delta_nll_per_token = (Σ nll_pert - Σ nll_base) / Σ n_w`` = log(PPL_pert / PPL_base) (each token weighs
  the same); ``ppl = exp(Σ nll / Σ n)`` and ``delta_ppl = ppl_pert - ppl_base``.
* p-values: Wilcoxon signed-rank on ``d`` and the paired t-test (``scipy.stats.ttest_rel``) on per-token NLLs,
  both two-sided; effect size Cohen's ``d_z = mean(d) / sd(d)`` (ddof=1).
* ``collapsed``: any non-finite perturbed window loss, or perturbed PPL above ``collapse_ppl`` (default 1000).

Non-finite values are never dropped: they are counted, make the means ±inf/NaN, and every statistic that
would need them to be finite (CI, p-values, d_z) is NaN — explicitly, not an exception.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats as sps

from esa.errors import EsaError

DEFAULT_COLLAPSE_PPL = 1000.0
_BOOT_BLOCK = 4_000_000  # max elements of one resample-index block (bounds memory to ~32 MB of int64)


def _as_1d(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise EsaError(f"{name} is empty: a comparison needs at least one window.")
    return arr


def per_window_delta(baseline_nll, perturbed_nll, n_tokens) -> np.ndarray:
    """(W,) per-token ΔNLL of each window: (perturbed - baseline) / n_tokens."""
    base, pert = _as_1d(baseline_nll, "baseline_nll"), _as_1d(perturbed_nll, "perturbed_nll")
    n = _as_1d(n_tokens, "n_tokens")
    if not base.shape == pert.shape == n.shape:
        raise EsaError(f"baseline ({base.size}), perturbed ({pert.size}) and n_tokens ({n.size}) must be the "
                       "same windows; evaluate both models on one window selection.")
    if (n <= 0).any():
        raise EsaError(f"{int((n <= 0).sum())} windows have no scored tokens; drop them before comparing.")
    with np.errstate(invalid="ignore", over="ignore"):
        return (pert - base) / n


def perplexity(nll, n_tokens) -> float:
    """exp(Σ nll / Σ n_tokens); inf when that overflows or a loss is +inf, NaN when a loss is NaN."""
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.exp(np.sum(np.asarray(nll, dtype=np.float64)) / np.sum(n_tokens)))


def bootstrap_mean_ci(values, n_boot: int = 10_000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean of ``values`` (NaN, NaN when any value is non-finite).

    All ``n_boot`` resamples are one (n_boot, W) index matrix from ``np.random.default_rng(seed)``, drawn in
    row blocks so memory stays bounded; the same seed gives the same interval.
    """
    x = _as_1d(values, "values")
    if not np.isfinite(x).all():
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    rows = max(1, _BOOT_BLOCK // x.size)
    means = np.concatenate([x[rng.integers(0, x.size, size=(min(rows, n_boot - s), x.size))].mean(axis=1)
                            for s in range(0, n_boot, rows)])  # (n_boot,)
    alpha = 1.0 - level
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def cohens_dz(d) -> float:
    """mean(d) / sd(d, ddof=1): NaN for fewer than 2 values, non-finite values or 0/0; ±inf when sd is 0."""
    d = _as_1d(d, "d")
    if d.size < 2 or not np.isfinite(d).all():
        return math.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(d.mean()) / np.float64(d.std(ddof=1)))


def wilcoxon_p(d) -> float:
    """Two-sided Wilcoxon signed-rank p-value of ``d`` (zeros dropped, scipy default); NaN if undefined."""
    d = _as_1d(d, "d")
    if not np.isfinite(d).all() or not d.any():
        return math.nan
    with warnings.catch_warnings():  # degenerate inputs warn; the NaN scipy returns is the answer we keep
        warnings.simplefilter("ignore")
        try:
            return float(sps.wilcoxon(d).pvalue)
        except ValueError:
            return math.nan


def ttest_p(baseline, perturbed) -> float:
    """Two-sided paired t-test p-value (scipy.stats.ttest_rel); NaN for non-finite input or zero variance."""
    a, b = _as_1d(baseline, "baseline"), _as_1d(perturbed, "perturbed")
    if not (np.isfinite(a).all() and np.isfinite(b).all()) or a.size < 2:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(sps.ttest_rel(b, a).pvalue)


def _ordered(pvalues) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(p with NaN→1, ascending order, NaN mask). NaN p-values count as tests that found nothing."""
    p = np.asarray(pvalues, dtype=np.float64).reshape(-1)
    nan = np.isnan(p)
    filled = np.where(nan, 1.0, p)
    return filled, np.argsort(filled, kind="stable"), nan


def holm(pvalues) -> np.ndarray:
    """Holm step-down adjusted p-values: sorted p_(1) ≤ … ≤ p_(m), adj_(i) = max_{j≤i} min(1, (m-j+1)·p_(j)).

    NaN inputs stay NaN in the output but count in m (conservative: a failed test is still a test).
    """
    p, order, nan = _ordered(pvalues)
    m = p.size
    steps = (m - np.arange(m)) * p[order]  # (m - j + 1) · p_(j) with 1-based j
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(steps))
    adjusted[nan] = np.nan
    return adjusted


def benjamini_hochberg(pvalues) -> np.ndarray:
    """BH (FDR) adjusted p-values: adj_(i) = min_{j≥i} min(1, m/j · p_(j)). NaN handled as in :func:`holm`."""
    p, order, nan = _ordered(pvalues)
    m = p.size
    steps = m / np.arange(1, m + 1) * p[order]
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, np.minimum.accumulate(steps[::-1])[::-1])
    adjusted[nan] = np.nan
    return adjusted


@dataclass(frozen=True)
class PairedComparison:
    """Baseline vs perturbed on the same W windows (definitions in the module docstring)."""

    n_windows: int
    n_tokens: int
    mean_delta_nll: float  # nats/token, mean over windows; higher = more damage
    ci_low: float  # bootstrap CI of mean_delta_nll (NaN when any window is non-finite)
    ci_high: float
    delta_nll_per_token: float  # token-weighted, = log(ppl_perturbed / ppl_baseline)
    ppl_baseline: float
    ppl_perturbed: float
    delta_ppl: float  # ppl_perturbed - ppl_baseline
    p_wilcoxon: float
    p_ttest: float
    cohens_dz: float
    n_nonfinite_baseline: int
    n_nonfinite_perturbed: int
    collapsed: bool
    collapse_ppl: float
    ci_level: float
    n_boot: int
    seed: int
    delta_nll: np.ndarray = field(repr=False, compare=False)  # (W,) per-window ΔNLL, nats/token

    def to_dict(self, arrays: bool = False) -> dict:
        """Plain Python values (floats may be nan/inf); the per-window array only with ``arrays=True``."""
        out = asdict(self)
        out["delta_nll"] = self.delta_nll.tolist() if arrays else None
        if not arrays:
            del out["delta_nll"]
        return out


def paired_compare(baseline_nll, perturbed_nll, n_tokens, *, n_boot: int = 10_000, level: float = 0.95,
                   seed: int = 0, collapse_ppl: float = DEFAULT_COLLAPSE_PPL) -> PairedComparison:
    """Compare per-window summed NLLs of the same windows before and after a perturbation."""
    d = per_window_delta(baseline_nll, perturbed_nll, n_tokens)  # (W,)
    base, pert = np.asarray(baseline_nll, np.float64), np.asarray(perturbed_nll, np.float64)
    n = np.asarray(n_tokens, np.float64)
    ppl_b, ppl_p = perplexity(base, n), perplexity(pert, n)
    n_bad_p = int((~np.isfinite(pert)).sum())
    ci = bootstrap_mean_ci(d, n_boot, level, seed)
    with np.errstate(invalid="ignore", over="ignore"):
        return PairedComparison(
            n_windows=int(d.size), n_tokens=int(n.sum()), mean_delta_nll=float(np.mean(d)),
            ci_low=ci[0], ci_high=ci[1], delta_nll_per_token=float((pert.sum() - base.sum()) / n.sum()),
            ppl_baseline=ppl_b, ppl_perturbed=ppl_p, delta_ppl=float(ppl_p - ppl_b),
            p_wilcoxon=wilcoxon_p(d), p_ttest=ttest_p(base / n, pert / n), cohens_dz=cohens_dz(d),
            n_nonfinite_baseline=int((~np.isfinite(base)).sum()), n_nonfinite_perturbed=n_bad_p,
            collapsed=bool(n_bad_p > 0 or not ppl_p <= collapse_ppl), collapse_ppl=float(collapse_ppl),
            ci_level=float(level), n_boot=int(n_boot), seed=int(seed), delta_nll=d,
        )


@dataclass(frozen=True)
class SeedAggregate:
    """One metric over S seeds: mean ± t-based CI (t_{(1+level)/2, S-1} · sd / √S)."""

    n: int
    mean: float
    sd: float  # ddof=1; NaN for one seed
    ci_low: float
    ci_high: float
    level: float
    n_nonfinite: int  # seeds whose value was Inf/NaN (kept: they make mean non-finite and the CI NaN)


def aggregate_seeds(values, level: float = 0.95) -> SeedAggregate:
    """Mean and t-based CI of one metric across seeds; non-finite seeds are counted, never dropped."""
    x = _as_1d(values, "values")
    n_bad = int((~np.isfinite(x)).sum())
    with np.errstate(invalid="ignore", over="ignore"):
        mean = float(np.mean(x))
    if n_bad or x.size < 2:
        return SeedAggregate(int(x.size), mean, math.nan, math.nan, math.nan, float(level), n_bad)
    sd = float(x.std(ddof=1))
    half = float(sps.t.ppf((1 + level) / 2, x.size - 1)) * sd / math.sqrt(x.size)
    return SeedAggregate(int(x.size), mean, sd, mean - half, mean + half, float(level), n_bad)
