"""``esa report``: reports computed only from stored results.

* ``esa report study.db [--study NAME] --out DIR`` — a results database (an SQLite file written by
  ``esa run``): ``report.md`` + PNGs and a self-contained ``report.html`` (:mod:`esa.report.study_report`).
* ``esa report RUNDIR… --out DIR`` — run directories of ``esa baseline``: ``baseline_report.md`` + PNG.

The two are told apart by the argument: an SQLite file (or a path ending in .db/.sqlite/.sqlite3) is a
results database, anything else a run directory.
"""

from __future__ import annotations

from pathlib import Path

from esa.errors import EsaError
from esa.report.baseline_report import write_baseline_report
from esa.report.study_report import is_sqlite_file, write_study_report

DB_SUFFIXES = (".db", ".sqlite", ".sqlite3")


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="write a study report (report.md + report.html) from a results "
                                             "database, or baseline_report.md from run directories")
    p.add_argument("runs", nargs="+", type=Path, metavar="DB_OR_RUNDIR",
                   help="a results database (study.db) or run directories (or parents holding several)")
    p.add_argument("--out", type=Path, default=None,
                   help="report directory (default: <db stem>-report next to the database, or runs/report)")
    p.add_argument("--study", default=None, help="only this study's runs (database reports; name or id)")
    p.set_defaults(func=run)


def _is_db(path: Path) -> bool:
    return is_sqlite_file(path) or (path.suffix in DB_SUFFIXES and not path.is_dir())


def run(args) -> int:
    dbs = [p for p in args.runs if _is_db(p)]
    if dbs and len(args.runs) > 1:
        raise EsaError(f"pass one results database ({dbs[0]}) or run directories, not both or several databases")
    if dbs:
        out = args.out or dbs[0].parent / f"{dbs[0].stem}-report"
        md, page = write_study_report(dbs[0], out, args.study)
        print(f"report: {md}\nreport: {page}")
        return 0
    if args.study is not None:
        raise EsaError("--study applies to a results database; run directories hold no studies")
    path = write_baseline_report(args.runs, args.out or Path("runs/report"))
    print(f"report: {path}")
    return 0
