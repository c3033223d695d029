"""``esa demo``: the main job end to end on the embedded model and corpus, offline, in a few CPU minutes."""

from __future__ import annotations

from pathlib import Path

from esa.baseline import BaselineConfig, run_baseline
from esa.models import ModelSpec
from esa.report.baseline_report import write_baseline_report
from esa.sensitivity.superweights import SuperWeightRun, run_superweights

MODEL = ModelSpec("smollm2-135m")
DEMO_BASELINE = BaselineConfig(MODEL, "smoke", ("python-docs",), (128, 512), (0, 1, 2),
                               max_eval_tokens=2048, batch_tokens=4096)
DEMO_SUPERWEIGHTS = SuperWeightRun("python-docs", context_len=128, max_samples=4, seed=0, iterations=2)


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="baseline → super weights → report on the embedded SmolLM2 (offline)")
    p.add_argument("--out-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo's results")
    p.set_defaults(func=run)


def run(args) -> int:
    out = Path(args.out_dir)
    print("[1/3] baseline: smollm2-135m on python-docs, ctx 128 and 512, seeds 0 1 2 (2,048 tokens each)")
    run_dirs = run_baseline(DEMO_BASELINE, [MODEL.name], out / "baseline", args.overwrite)
    print("[2/3] super weights: one forward pass over 4 windows of 128 tokens, 2 search rounds")
    sw_report, _, sw_json, sw_png = run_superweights(MODEL, DEMO_SUPERWEIGHTS, out / "superweights", args.overwrite)
    for w in sw_report.candidates:
        print(f"      candidate {w.param_name}[{w.row},{w.col}] weight={w.weight:+.3f} "
              f"|y|={w.output_activation:,.0f} (round {w.iteration})")
    print("[3/3] report")
    report = write_baseline_report(run_dirs, out / "report")
    print(f"super weights: {sw_json.resolve()} and {sw_png.resolve()}")
    print(f"report: {report.resolve()}")
    return 0
