"""One vulnerability study of one model: curvature → whole-model map → measured verification → calibration.

Steps (each in its module): the evaluation windows and the disjoint calibration windows of
:func:`esa.perturb.protocols.common.make_bench` (an overlap is refused); g and the diagonal h on the calibration
windows (:func:`esa.predict.taylor.curvature`); every single-bit flip of every selected matrix weight
(:func:`esa.predict.vmap.vulnerability_map`); a verification pool — the map's worst flips per regime and
uniformly random ones — measured with prefix-cached trials (:mod:`esa.predict.verify`); Spearman/Kendall per
regime and recall@n, on the whole pool and on its random part alone; and the screening replayed on the pool:
how many trials predicted-first measurement needs to find its n worst flips, and whether it missed one.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from esa.core.errors import EsaError
from esa.perturb.protocols.common import EvalConfig, build_cache, make_bench
from esa.perturb.targets import TargetSet
from esa.predict.taylor import DEFAULT_TAU, ESTIMATORS, curvature
from esa.predict.verify import calibration, check_disjoint, measure, screen_pool, verification_pool
from esa.predict.vmap import vulnerability_map
from esa.sensitivity.calibration import batches_from_ids
from esa.sensitivity.scorers import select_params

GRID_COLUMNS = ("n", "n_taylor", "n_large", "n_nonfinite")


@dataclass(frozen=True)
class VulnerabilityConfig:
    data: EvalConfig  # evaluation windows (and, through calib_samples, the calibration windows)
    params: tuple[str, ...] = ("*",)  # fnmatch globs of the weights mapped (matrix weights; embeddings excluded)
    estimator: str = "fisher"  # diagonal h: grad_squared | fisher | hutchinson
    probes: int = 8  # Hutchinson probes per calibration batch
    tau: float = DEFAULT_TAU  # regime rule: r > tau is "large" (esa.predict.taylor)
    top_k: int = 100  # flips kept per regime by the map
    verify_top: int = 20  # measured from the top of the taylor and large lists (nonfinite: verify_top // 4)
    verify_random: int = 100  # uniformly random flips measured: the calibration sample
    screen_n: int = 10  # screening looks for this many worst flips


def check_config(cfg: VulnerabilityConfig) -> None:
    if cfg.estimator not in ESTIMATORS:
        raise EsaError(f"estimator {cfg.estimator!r} is not one of {', '.join(ESTIMATORS)}")
    for name in ("top_k", "verify_top", "verify_random", "screen_n", "probes"):
        if getattr(cfg, name) < 1:
            raise EsaError(f"{name} must be ≥ 1, got {getattr(cfg, name)}")
    if cfg.verify_top > cfg.top_k:
        raise EsaError(f"verify_top {cfg.verify_top} exceeds top_k {cfg.top_k}: the map keeps only top_k per regime")
    if not cfg.tau > 0:
        raise EsaError(f"tau must be > 0, got {cfg.tau}")


def layer_grid(summary: pd.DataFrame) -> pd.DataFrame:
    """The map's (tensor, bit) summary aggregated per (decoder layer, bit): counts summed, worst prediction."""
    frame = summary.assign(layer=summary["layer"].fillna(-1).astype(int))
    grid = frame.groupby(["layer", "bit"], as_index=False).agg(
        **{c: (c, "sum") for c in GRID_COLUMNS}, max_predicted=("max_predicted", "max"),
        max_ratio=("max_ratio", "max"))
    return grid


def vulnerability_experiment(lm, cfg: VulnerabilityConfig) -> tuple[dict, dict[str, np.ndarray]]:
    """The study of the module docstring; (document, per-flip arrays of the verification pool)."""
    start = time.perf_counter()
    check_config(cfg)
    bench = make_bench(lm, cfg.data)
    check_disjoint(bench)
    params = select_params(lm.model, cfg.params)
    t0 = time.perf_counter()
    curv = curvature(lm.model, params, list(batches_from_ids(bench.calib, 4)), cfg.estimator, cfg.probes,
                     cfg.data.seed)
    grad_seconds = time.perf_counter() - t0
    vm = vulnerability_map(lm.model, curv, k=cfg.top_k, tau=cfg.tau)
    pool = verification_pool(lm.model, curv, vm.top, cfg.verify_top, cfg.verify_random, cfg.tau, cfg.data.seed)
    build_cache(bench, [TargetSet({p: torch.tensor([int(f)])}) for p, f in zip(pool.param, pool.flat)])
    t0 = time.perf_counter()
    pool["measured"] = measure(bench, pool)
    measure_seconds = time.perf_counter() - t0
    doc = {"schema": "esa.vulnerability/1", "config": asdict(cfg), "data": bench.info,
           "map": {**vm.info, "gradient_seconds": grad_seconds, "map_over_gradient": vm.info["seconds"] / grad_seconds,
                   "n_params": len(params), "n_weights": int(sum(p.numel() for p in params.values()))},
           "baseline": {"nll_per_token": float(bench.cache.baseline.nll.sum() / bench.n_tokens.sum())},
           "grid": layer_grid(vm.summary).to_dict("records"),
           "top": {r: t.head(10).to_dict("records") for r, t in vm.top.items()},
           "pool": pool.to_dict("records"), "measure_seconds": measure_seconds,
           "calibration": calibration(pool, cfg.screen_n),
           "calibration_random": calibration(pool[pool.source == "random"], cfg.screen_n),
           "screening": screen_pool(pool, max(1, cfg.verify_random // 2), cfg.screen_n),  # half sets the bound
           "summary": vm.summary.to_dict("records"), "notes": bench.notes,
           "wall_seconds": time.perf_counter() - start}
    arrays = {"pool_flat": pool["flat"].to_numpy(np.int64), "pool_bit": pool["bit"].to_numpy(np.int64),
              "pool_second": pool["second"].to_numpy(float), "pool_ratio": pool["ratio"].to_numpy(float),
              "pool_measured": pool["measured"].to_numpy(float), "nll": bench.cache.baseline.nll}
    return doc, arrays
