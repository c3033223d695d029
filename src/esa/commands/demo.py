"""``esa demo``: the main job end to end on the embedded model and corpus, offline, in a few CPU minutes.

baseline → super weights → sensitivity ranking (grad_x_weight global top-k, two calibration seeds) → super
weights vs size-matched random and bottom-k controls (paired statistics) → dose-response → reports. Each step
writes its own directory under ``--out-dir``. With ``--study FILE`` (``make demo``: ``studies/demo.yaml``) the
same machinery then runs as a study: every run into ``<out-dir>/study.db`` (SQLite, the study's single source of
truth; a fresh database, since ``--overwrite`` replaces the demo), then ``esa report``'s Markdown + HTML page from
it in ``<out-dir>/study_report/``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from esa.baseline import BaselineConfig, run_baseline
from esa.errors import EsaError
from esa.commands.sensitivity import SensitivityConfig, run_sensitivity
from esa.models import ModelSpec
from esa.perturb.protocols import DoseConfig, EvalConfig, PerturbConfig, run_dose_response, run_perturb
from esa.report.baseline_report import write_baseline_report
from esa.report.demo_report import write_demo_report
from esa.sensitivity.superweight_run import SuperWeightRun, run_superweights

MODEL = ModelSpec("smollm2-135m")
DEMO_BASELINE = BaselineConfig(MODEL, "smoke", ("python-docs",), (128, 512), (0, 1, 2),
                               max_eval_tokens=2048, batch_tokens=4096)
DEMO_SUPERWEIGHTS = SuperWeightRun("python-docs", context_len=128, max_samples=4, seed=0, iterations=2)
# Same library call as `esa sensitivity --scorer grad_x_weight --max-samples 4 --context-len 128 --batch-size 4
# --seeds 0 1 --k 100`: two seeds so the report can show how much the top-k depends on the calibration windows.
DEMO_SENSITIVITY = SensitivityConfig(
    MODEL.name, MODEL.dtype, MODEL.device, "grad_x_weight", "python-docs", max_samples=4, context_len=128,
    batch_size=4, seeds=(0, 1), params=("*",), include_embeddings=False, include_norms=False, include_biases=False,
    k=100, mode="global", bottom=False, probes=8, hist_sample=200_000, out_dir="sensitivity")  # out_dir: replaced
DEMO_EVAL = EvalConfig("python-docs", context_len=128, max_eval_tokens=2048, seed=0, n_boot=10_000)
DEMO_PERTURB = PerturbConfig("superweights", "zero", ("random_k", "bottom_k"), control_seeds=(0, 1, 2), data=DEMO_EVAL)
DEMO_DOSE = DoseConfig("superweights", "scale", values=(0.0, 0.5, 1.0, 2.0), control_seeds=(0,),
                       data=EvalConfig("python-docs", context_len=128, max_eval_tokens=1024, seed=0, n_boot=2_000))


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="baseline → super weights → sensitivity → perturbation vs controls → "
                                           "reports (offline)")
    p.add_argument("--out-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo's results")
    p.add_argument("--study", type=Path, help="then run this study file into <out-dir>/study.db and report it "
                                              "(make demo: studies/demo.yaml)")
    p.set_defaults(func=run)


def run(args) -> int:
    out = Path(args.out_dir)
    print("[1/6] baseline: smollm2-135m on python-docs, ctx 128 and 512, seeds 0 1 2 (2,048 tokens each)")
    run_dirs = run_baseline(DEMO_BASELINE, [MODEL.name], out / "baseline", args.overwrite)
    print("[2/6] super weights: one forward pass over 4 windows of 128 tokens, 2 search rounds")
    sw_report, _, _, _ = run_superweights(MODEL, DEMO_SUPERWEIGHTS, out / "superweights", args.overwrite)
    for w in sw_report.candidates:
        print(f"      candidate {w.param_name}[{w.row},{w.col}] weight={w.weight:+.3f} "
              f"|y|={w.output_activation:,.0f} (round {w.iteration})")
    print("[3/6] sensitivity: grad_x_weight on 4 windows of 128 tokens, global top-100, calibration seeds 0 1")
    sens_dir = out / "sensitivity"
    stab = run_sensitivity(replace(DEMO_SENSITIVITY, out_dir=str(sens_dir)), args.overwrite)
    for row in stab["per_seed"]:
        t = row["tail"]
        print(f"      seed {row['seed']}: top-1% share {t['top_1pct_share']:.3f}, gini {t['gini']:.3f}")
    print(f"      top-100 Jaccard across seeds: {stab['jaccard_mean']:.3f}")
    print("[4/6] perturbation: zero the super weights vs size-matched random_k (3 seeds) and bottom_k")
    perturb_dir = run_perturb(MODEL, DEMO_PERTURB, out / "perturb", args.overwrite)
    print("[5/6] dose-response: scale the super weights by 0, 0.5, 1, 2 (target vs random_k)")
    dose_dir = run_dose_response(MODEL, DEMO_DOSE, out / "dose_response", args.overwrite)
    print("[6/6] reports")
    baseline_report = write_baseline_report(run_dirs, out / "report")
    report = write_demo_report(out / "report", baseline_report, out / "superweights", sens_dir, perturb_dir,
                               dose_dir)
    print(f"baseline report: {baseline_report.resolve()}")
    print(f"report: {report.resolve()}")
    if args.study is not None:
        run_demo_study(args.study, out, args.overwrite)
    return 0


def run_demo_study(path: Path, out: Path, overwrite: bool) -> None:
    """``esa run FILE --db <out>/study.db`` then ``esa report`` on it; an earlier demo database is replaced
    only with ``overwrite`` (else completed runs are reused, as a study rerun does)."""
    from rich.console import Console

    from esa.commands.study import progress_printer
    from esa.executors import run_study
    from esa.report.study_report import write_study_report
    from esa.study import load_study

    study, db = load_study(path), out / "study.db"
    if overwrite:
        for f in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            f.unlink(missing_ok=True)
    print(f"[study] {path}: every run recorded in {db}")
    summary = run_study(study, db, "local", str(path.resolve()), progress_printer(Console()))
    if not summary.ok:
        what, error = (summary.failed or summary.load_errors)[0]
        raise EsaError(f"demo study: {what}: {error} — the completed runs are kept in {db}")
    md, html = write_study_report(db, out / "study_report")
    print(f"study report: {md.resolve()}")
    print(f"study report (HTML): {html.resolve()}")
