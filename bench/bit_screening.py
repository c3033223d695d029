"""Predicted-first bit-flip screening on the embedded SmolLM2-135M: does the prediction find the worst flips
with far fewer measured trials than measuring everything? And what does the whole-model map cost?

1. Curvature (g and the ``fisher`` diagonal) on the run's calibration windows — disjoint from the evaluation
   windows (refused otherwise) — then the whole-model map over every bit of every matrix weight (106 M × 32 =
   3.4 G flips). Printed: both times and their ratio (the map vs the gradient passes that feed it).
2. A pool (esa.predict.verify.verification_pool): the map's top ``--top`` taylor and large and first ``--top``/4
   nonfinite flips, plus ``--random`` uniformly random flips (tensor ∝ size, element, bit). Every flip is
   measured (the exhaustive baseline, one prefix-cached trial each), so the truly worst are known.
3. Calibration on the pool: Spearman/Kendall per regime, recall@10.
4. Screening (esa.predict.verify.screen_pool), on the whole pool and on its taylor-only part: the first ``--calib``
   random flips are measured first to set the bound (counted in the cost), then flips in predicted order until
   the stop rule; reported: trials measured, the ratio to exhaustive, and whether any of the 10 worst was missed.

CPU, one thread: ~0.8 s per trial on 2 × 128-token evaluation windows (4 calibration windows), so the
default pool (~1200 flips) takes ~20 minutes.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bit_screening.py [--random 1000] [--top 100] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

from esa.models import ModelSpec, load_model
from esa.perturb import TargetSet
from esa.perturb.protocols.common import EvalConfig, build_cache, make_bench
from esa.predict.plots import heatmap_png, scatter_png
from esa.predict.taylor import curvature
from esa.predict.verify import calibration, check_disjoint, measure, screen_pool, verification_pool
from esa.predict.vmap import vulnerability_map
from esa.sensitivity.calibration import batches_from_ids
from esa.sensitivity.scorers import select_params


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--random", type=int, default=1000)
    ap.add_argument("--top", type=int, default=100)
    ap.add_argument("--calib", type=int, default=30, help="random flips measured first to set the bound's floor")
    ap.add_argument("--map-only", action="store_true", help="stop after timing the curvature and the map")
    ap.add_argument("--pool-csv", type=Path, default=None,
                    help="replay calibration and screening on a pool this script measured before (its .csv)")
    ap.add_argument("--tau", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bit_screening.json"))
    args = ap.parse_args()
    if args.pool_csv is not None:
        pool = pd.read_csv(args.pool_csv)
        for key, part in (("screen_all", pool), ("screen_taylor", pool[pool.regime == "taylor"])):
            print(key, json.dumps(screen_pool(part, args.calib)))
        print(json.dumps({"all": calibration(pool), "random": calibration(pool[pool.source == "random"])}, indent=1))
        return
    torch.manual_seed(0)
    lm = load_model(ModelSpec("smollm2-135m"))
    bench = make_bench(lm, EvalConfig("python-docs", 128, 127 * 2, 0, 4096, n_boot=200))  # default 4 calib windows
    check_disjoint(bench)
    params = select_params(lm.model)
    t0 = time.perf_counter()
    curv = curvature(lm.model, params, list(batches_from_ids(bench.calib, 4)), "fisher")
    t_grad = time.perf_counter() - t0
    vm = vulnerability_map(lm.model, curv, k=max(args.top, 50), tau=args.tau)
    t_map = vm.info["seconds"]
    print(f"curvature (g + fisher, {curv.n_tokens} calibration tokens): {t_grad:.1f} s; map over "
          f"{vm.info['n_flips']:,} flips: {t_map:.1f} s; map / gradient passes = {t_map / t_grad:.2f}")
    if args.map_only:
        return
    pool = verification_pool(lm.model, curv, vm.top, args.top, args.random, args.tau, seed=7)
    build_cache(bench, [TargetSet({p: torch.tensor([int(f)])}) for p, f in zip(pool.param, pool.flat)])
    t0 = time.perf_counter()
    pool["measured"] = measure(bench, pool)
    t_measure = time.perf_counter() - t0
    print(f"pool: {len(pool)} flips ({pool.source.value_counts().to_dict()}), regimes "
          f"{pool.regime.value_counts().to_dict()}; exhaustive measurement {t_measure:.0f} s")
    cal = calibration(pool)
    print(json.dumps(cal, indent=1))
    result = {"t_grad": t_grad, "t_map": t_map, "map_info": vm.info, "calibration": cal,
              "screen_all": screen_pool(pool, args.calib),
              "screen_taylor": screen_pool(pool[pool.regime == "taylor"], args.calib),
              "calibration_random_only": calibration(pool[pool.source == "random"]),
              "top_measured": pool.sort_values("measured", ascending=False).head(15).to_dict("records")}
    for key in ("screen_all", "screen_taylor"):
        print(key, json.dumps(result[key]))
    args.out.write_text(json.dumps(result, indent=1, default=str))
    pool.to_csv(args.out.with_suffix(".csv"), index=False)
    vm.summary.to_csv(args.out.with_suffix(".summary.csv"), index=False)
    args.out.with_suffix(".heatmap.png").write_bytes(heatmap_png(vm.summary, "SmolLM2-135M: predicted bit-flip damage"))
    args.out.with_suffix(".scatter.png").write_bytes(scatter_png(pool, "SmolLM2-135M: predicted vs measured"))
    print(f"→ {args.out}")


if __name__ == "__main__":
    main()
