"""``esa demo``: the main job end to end on the embedded model and corpus, offline, in a few CPU minutes.

One study file (``studies/demo.yaml``: baselines, zero-shot accuracy on the shipped samples, super weights, a
magnitude ranking, the super weights and the top-10 |W| zeroed vs random_k and bottom_k, a dose-response and a
bit scan) run by the one engine into ``<out-dir>/study.db`` (SQLite, the single source of truth; a fresh
database with ``--overwrite``, else completed runs are reused), then one report — Markdown and a self-contained
HTML page — from it in ``<out-dir>/report/``.
"""

from __future__ import annotations

from pathlib import Path

from esa.core.errors import EsaError
from esa.tracking import add_track_args

DEMO_STUDY = Path(__file__).resolve().parents[3] / "studies" / "demo.yaml"  # in a source checkout


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the demo study (baseline → zero-shot → super weights → ranking → "
                                           "perturbation vs controls → dose-response → bit scan) and its report")
    p.add_argument("--out-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--overwrite", action="store_true", help="start from a fresh database (else resume)")
    p.add_argument("--study", type=Path, default=DEMO_STUDY, help="the study file (default: studies/demo.yaml)")
    add_track_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from functools import partial

    from esa.tracking import from_args

    run_demo_study(args.study, Path(args.out_dir), args.overwrite, track=partial(from_args, args))
    return 0


def run_demo_study(path: Path, out: Path, overwrite: bool, track=None) -> None:
    """``esa run FILE --db <out>/study.db`` then ``esa report`` on it; an earlier demo database is replaced
    only with ``overwrite`` (else completed runs are reused, as a study rerun does). ``track(on_event, db) ->
    on_event`` adds experiment tracking (``functools.partial(esa.tracking.from_args, args)``: ``--track``)."""
    from rich.console import Console

    from esa.commands.study import progress_printer
    from esa.executors.one_off import log_path, run_one_off
    from esa.report.study_report import write_study_report
    from esa.study import load_study

    if not Path(path).is_file():
        raise EsaError(f"demo study {path} not found; run esa demo from an ESA checkout or pass --study FILE")
    study, db = load_study(path), out / "study.db"
    on_event = progress_printer(Console(), log_path(db))
    on_event = track(on_event, db) if track else on_event
    print(f"[study] {path}: every run recorded in {db}")
    run_one_off(study, db, "demo study", overwrite, on_event, str(Path(path).resolve()), leave_no_trace=False)
    md, html = write_study_report(db, out / "report")
    print(f"report: {md.resolve()}")
    print(f"report (HTML): {html.resolve()}")
