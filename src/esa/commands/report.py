"""``esa report``: a study report (``report.md`` + PNGs and a self-contained ``report.html``) computed only from a
results database (:mod:`esa.report.study_report`).

The argument is the database itself (an SQLite file written by ``esa run``, or a path ending in
.db/.sqlite/.sqlite3), or an output directory of a command that keeps its database there (``esa baseline
--out-dir OUT`` writes ``OUT/esa.db``), or one model's run directory ``OUT/<model>/`` inside it.
"""

from __future__ import annotations

from pathlib import Path

from esa.core.errors import EsaError
from esa.report.study_report import is_sqlite_file, write_study_report

DB_SUFFIXES = (".db", ".sqlite", ".sqlite3")
DB_NAME = "esa.db"  # the database a one-off command writes into its --out-dir


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="write a study report (report.md + report.html) from a results "
                                             "database, or from an esa baseline --out-dir holding esa.db")
    p.add_argument("runs", nargs="+", type=Path, metavar="DB_OR_OUT_DIR",
                   help="a results database (study.db), or an output directory holding esa.db (esa baseline)")
    p.add_argument("--out", type=Path, default=None,
                   help="report directory (default: <db stem>-report next to the database)")
    p.add_argument("--study", default=None, help="only this study's runs (name or id)")
    p.set_defaults(func=run)


def _is_db(path: Path) -> bool:
    return is_sqlite_file(path) or (path.suffix in DB_SUFFIXES and not path.is_dir())


def database_of(path: Path) -> Path:
    """The results database that ``path`` names: itself, ``path/esa.db``, or — for a model's run directory
    ``OUT/<model>/`` of ``esa baseline`` — ``OUT/esa.db``."""
    if _is_db(path):
        return path
    if not path.is_dir():
        raise EsaError(f"{path} does not exist; pass a results database (.db) or an output directory holding "
                       f"{DB_NAME}")
    run_dir = (path / "results.json").is_file()
    for db in (path / DB_NAME, *([path.parent / DB_NAME] if run_dir else [])):
        if db.is_file():
            return db
    if run_dir or any(path.glob("*/results.json")):
        out = path.parent if run_dir else path
        raise EsaError(f"{path} holds run directories of an older `esa baseline` without a results database "
                       f"({DB_NAME}); rerun `esa baseline … --out-dir {out} --overwrite` (it writes {out / DB_NAME}), "
                       f"then `esa report {out}`")
    raise EsaError(f"{path} holds no results database ({DB_NAME}); pass a .db file or an output directory of "
                   "esa baseline")


def run(args) -> int:
    if len(args.runs) > 1:
        raise EsaError(f"pass one results database or output directory, not {len(args.runs)}: "
                       f"{' '.join(map(str, args.runs))}")
    db = database_of(args.runs[0])
    out = args.out or db.parent / f"{db.stem}-report"
    md, page = write_study_report(db, out, args.study)
    print(f"report: {md}\nreport: {page}")
    return 0
