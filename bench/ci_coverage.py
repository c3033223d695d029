"""Coverage of 95 % CIs of a mean at few windows: percentile bootstrap, BCa, Student t, bootstrap-t (ESA's).

Prints the Markdown table of README.md "Intervals": for each distribution of per-window ΔNLL and each window
count W, the share of ``--reps`` simulated experiments whose interval contains the true mean, and the median
interval width relative to the t-interval's. Vectorised over repetitions (one (R, W) sample matrix per cell).

    python bench/ci_coverage.py --reps 4000 --boot 2000     # ~1 CPU-minute
"""

from __future__ import annotations

import argparse

import numpy as np
from scipy import stats as sps

from esa.stats import bootstrap_t_ci_rows

LEVEL = 0.95
DISTS = {  # name -> (sampler(rng, shape), true mean)
    "normal(0.3, 1)": (lambda rng, shape: rng.normal(0.3, 1.0, shape), 0.3),
    "lognormal(0, 1) − e^0.5": (lambda rng, shape: rng.lognormal(0.0, 1.0, shape) - np.exp(0.5), 0.0),
}


def percentile_rows(x: np.ndarray, n_boot: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """The replaced method: quantiles of resample means, all rows sharing one (n_boot, W) index matrix."""
    w = x.shape[1]
    idx = rng.integers(0, w, (n_boot, w))
    counts = np.zeros((n_boot, w))
    np.add.at(counts, (np.arange(n_boot)[:, None], idx), 1.0)
    means = x @ counts.T / w  # (R, n_boot)
    return tuple(np.quantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2], axis=1))


def t_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return sps.t.interval(LEVEL, x.shape[1] - 1, loc=x.mean(1), scale=sps.sem(x, axis=1))


def bca_rows(x: np.ndarray, n_boot: int, rng) -> tuple[np.ndarray, np.ndarray]:
    res = sps.bootstrap((x,), np.mean, axis=-1, vectorized=True, n_resamples=n_boot, method="BCa",
                        confidence_level=LEVEL, batch=50, random_state=rng)
    return res.confidence_interval.low, res.confidence_interval.high


def cell(sample, mu: float, w: int, reps: int, n_boot: int, seed: int) -> dict[str, tuple[float, float]]:
    """{method: (coverage, median width / median t width)} for one distribution and W."""
    rng = np.random.default_rng(seed)
    x = sample(rng, (reps, w))  # (R, W)
    intervals = {"percentile": percentile_rows(x, n_boot, rng), "BCa": bca_rows(x, n_boot, rng),
                 "t": t_rows(x), "bootstrap-t": bootstrap_t_ci_rows(x, n_boot, LEVEL, seed)}
    t_width = np.median(intervals["t"][1] - intervals["t"][0])
    return {k: (float(np.mean((lo <= mu) & (mu <= hi))), float(np.median(hi - lo) / t_width))
            for k, (lo, hi) in intervals.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=4000)
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--windows", default="8,16,64")
    args = ap.parse_args()
    methods = ("percentile", "BCa", "t", "bootstrap-t")
    print(f"{args.reps} repetitions per cell, {args.boot} resamples; coverage (median width / t width)\n")
    print("| distribution | W | " + " | ".join(methods) + " |")
    print("|---|---|" + "---|" * len(methods))
    for i, (name, (sample, mu)) in enumerate(DISTS.items()):
        for w in map(int, args.windows.split(",")):
            res = cell(sample, mu, w, args.reps, args.boot, seed=1000 * i + w)
            print(f"| {name} | {w} | " + " | ".join(f"{res[m][0]:.3f} ({res[m][1]:.2f})" for m in methods) + " |")


if __name__ == "__main__":
    main()
