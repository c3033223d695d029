"""Scaling efficiency of one study split across N model replicas on Ray (esa.core.parallel), in one run.

The same study — a baseline (windows), a perturbation run with its controls (trials) and a bit scan (trials,
then the adaptive greedy search) of one model — is executed once per replica count in ``--replicas`` on a local
Ray cluster, each into a fresh database; every replica gets ``--num-cpus`` CPUs (one torch thread each on CPU:
``OMP_NUM_THREADS``) or ``--num-gpus`` GPUs. Printed per replica count N: the study's wall time (model loading
included, as a user waits for it), the summed run time (what data parallelism divides: from each committed
record's start to finish), the speed-up over N = 1 and the scaling efficiency = T(1) / (N · T(N)). Each
setting's stored arrays are compared with N = 1's: they must be identical (exit status 1 otherwise).

CPU (this machine, 2 cores: N = 1, 2):

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python bench/data_parallel.py --replicas 1 2

GPU node (N GPUs; a random-initialised model of a real shape from bench/make_random_model.py):

    .venv/bin/python bench/data_parallel.py --model /models/llama8b-random --dtype bf16 --replicas 1 2 4 8 \\
        --num-gpus 1 --num-cpus 4 --max-eval-tokens 1048576 --context-len 2048 --batch-tokens 65536
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np


def study(args) -> dict:
    """The benchmarked study: windows (baseline), trials (perturbation + controls) and a bit scan."""
    return {"name": "dp_bench", "models": [{"name": args.model, "dtype": args.dtype}],
            "datasets": [args.dataset], "context_lens": [args.context_len], "seeds": [0],
            "max_eval_tokens": args.max_eval_tokens, "batch_tokens": args.batch_tokens,
            "sensitivity": {"scorers": ["magnitude"], "k": 64},
            "perturbation": {"targets": [{"name": "top", "ranking": "magnitude", "k": 16}], "ops": [{"op": "zero"}],
                             "controls": ["random_k"], "trials": args.trials},
            "bitscan": {"targets": [{"name": "top", "ranking": "magnitude", "k": 8}], "top_n": args.top_n,
                        "bits": ["sign", "exponent_msb"], "max_flips": 2, "greedy_pool": 4}}


def run_time(db: Path) -> tuple[dict, dict]:
    """{kind: Σ over its runs of finished − started (seconds)}, and {run id: arrays}."""
    from esa.store import Store

    with Store(db) as store:
        frame = store.runs_frame("dp_bench")
        seconds: dict[str, float] = {}
        for kind, s, f in zip(frame["kind"], frame["started_at"], frame["finished_at"]):
            took = (datetime.fromisoformat(f) - datetime.fromisoformat(s)).total_seconds()
            seconds[kind] = seconds.get(kind, 0.0) + took
        return seconds, {rid: store.load_arrays(rid) for rid in frame["run_id"]}


def identical(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(set(a[r]) == set(b[r]) and all(
        np.array_equal(a[r][k], b[r][k], equal_nan=a[r][k].dtype.kind == "f") for k in a[r]) for r in a)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--dataset", default="python-docs")
    ap.add_argument("--context-len", type=int, default=256)
    ap.add_argument("--max-eval-tokens", type=int, default=8192)
    ap.add_argument("--batch-tokens", type=int, default=1024)
    ap.add_argument("--trials", type=int, default=4, help="control seeds of the perturbation run")
    ap.add_argument("--top-n", type=int, default=4, help="weights of the bit scan")
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--num-cpus", type=float, default=1.0)
    ap.add_argument("--num-gpus", type=float, default=0.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import ray

    from esa.executors import run_study
    from esa.study import parse_study

    env = {k: os.environ.get(k, "1") for k in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    ray.init(num_cpus=int(max(args.replicas) * args.num_cpus), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.replicas:
            db = Path(tmp) / f"n{n}.db"
            start = time.perf_counter()
            summary = run_study(parse_study(study(args)), db, executor="ray", replicas=n,
                                num_cpus=args.num_cpus, num_gpus=args.num_gpus)
            wall = time.perf_counter() - start
            if not summary.ok:
                print(f"N={n}: {summary}", file=sys.stderr)
                return 1
            per_kind, arrays = run_time(db)
            reference = reference or arrays
            rows.append({"replicas": n, "study_wall_s": wall, "run_seconds": sum(per_kind.values()),
                         "per_kind_seconds": per_kind, "identical_to_n1": identical(arrays, reference)})
    ray.shutdown()
    base = rows[0]
    print(f"{args.model} {args.dtype}, {args.max_eval_tokens} tokens at ctx {args.context_len}; "
          f"per replica {args.num_cpus:g} CPU / {args.num_gpus:g} GPU")
    print("| replicas | study wall s | Σ run s | speed-up (runs) | efficiency | identical to N=1 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        r["speedup"] = base["run_seconds"] / r["run_seconds"]
        r["efficiency"] = r["speedup"] * base["replicas"] / r["replicas"]
        print(f"| {r['replicas']} | {r['study_wall_s']:.1f} | {r['run_seconds']:.1f} | {r['speedup']:.2f}× "
              f"| {r['efficiency']:.2f} | {'yes' if r['identical_to_n1'] else 'NO'} |")
    for kind in base["per_kind_seconds"]:
        print(f"  {kind}: Σ run s " + " / ".join(f"{r['per_kind_seconds'][kind]:.1f}" for r in rows)
              + f" at replicas {' / '.join(str(r['replicas']) for r in rows)}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))
    return 0 if all(r["identical_to_n1"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
