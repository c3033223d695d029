"""``esa demo``: the main job end to end on the embedded model and corpus, offline, in a few CPU minutes."""

from __future__ import annotations

from pathlib import Path

from esa.baseline import BaselineConfig, run_baseline
from esa.models import ModelSpec
from esa.report.baseline_report import write_baseline_report

DEMO_BASELINE = BaselineConfig(ModelSpec("smollm2-135m"), "smoke", ("python-docs",), (128, 512), (0, 1, 2),
                               max_eval_tokens=2048, batch_tokens=4096)


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="baseline → report on the embedded SmolLM2 and python-docs (offline)")
    p.add_argument("--out-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo's results")
    p.set_defaults(func=run)


def run(args) -> int:
    out = Path(args.out_dir)
    print("[1/2] baseline: smollm2-135m on python-docs, ctx 128 and 512, seeds 0 1 2 (2,048 tokens each)")
    run_dirs = run_baseline(DEMO_BASELINE, ["smollm2-135m"], out / "baseline", args.overwrite)
    print("[2/2] report")
    report = write_baseline_report(run_dirs, out / "report")
    print(f"report: {report.resolve()}")
    return 0
