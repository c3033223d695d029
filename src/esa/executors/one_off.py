"""A command's one-off study: run it into a results database, then read its runs back in expansion order.

Every measuring command (``esa baseline``, ``zeroshot``, ``sensitivity``, ``superweights``, ``perturb``,
``dose-response``, ``bitscan``) builds a :class:`esa.study.Study` from its flags and calls :func:`run_one_off`.
Rerunning the command on the same database resumes: completed runs are reused, never recomputed. Its files
(results JSON, tables, plots) are exports of the stored rows that :meth:`OneOff.rows` returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from esa.core.errors import EsaError
from esa.executors.core import EventFn, quiet, run_key
from esa.store import Reader, StoredRun, sha256_json
from esa.study import Study, expand


def log_path(db: Path) -> Path:
    """The progress log beside a results database: ``runs/x/esa.db`` → ``runs/x/esa.log``."""
    return Path(db).with_suffix(".log")


def fresh_database(db: Path) -> None:
    """Delete the database at ``db`` with its WAL files and its log, so a command starts over (``--overwrite``).
    Artifacts of the deleted rows stay on disk under ``artifacts/`` and are overwritten by run id."""
    for f in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm"), log_path(db)):
        f.unlink(missing_ok=True)


def check_out_dir(out_dir: Path, db: Path, owned: tuple[str, ...], overwrite: bool, command: str) -> None:
    """Refuse an ``--out-dir`` that ESA did not write: a non-empty directory is accepted when it holds the
    results database ``db`` (the command resumes there), or, with ``overwrite``, one of the ``owned`` files of an
    earlier run of ``command`` — never a directory of someone else's files."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise EsaError(f"--out-dir {out_dir} is a file; choose a directory")
    if not out_dir.is_dir() or not any(out_dir.iterdir()) or Path(db).is_file():
        return
    if not any((out_dir / f).exists() for f in owned):
        raise EsaError(f"refusing to write into {out_dir}: it holds no {command} results (no {Path(db).name}, none "
                       f"of {', '.join(owned)}); choose an empty or new --out-dir")
    if not overwrite:
        raise EsaError(f"{out_dir} holds {command} results without a results database (written by an older ESA); "
                       "pass --overwrite to replace them, or choose another --out-dir")


def _remove_new(db: Path, made: list[Path]) -> None:
    """Delete a database this command created and the folders it made, when no run completed in it."""
    import shutil

    fresh_database(db)
    if made and made[0].name == "artifacts":  # only an artifacts folder this call created (a failed run's)
        shutil.rmtree(made[0], ignore_errors=True)
    for d in made:  # innermost first
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


@dataclass(frozen=True)
class StoredResult:
    """One expanded run of the one-off study with its stored row and per-window arrays."""

    run: object  # the kind's run dataclass
    row: StoredRun
    arrays: dict[str, np.ndarray]
    documents: dict[str, dict]  # name → JSON document stored beside the row (RunContext.documents)


@dataclass(frozen=True)
class OneOff:
    """The outcome of :func:`run_one_off`: the study, its database and every completed run, in expansion order."""

    study: Study
    db: Path
    results: tuple[StoredResult, ...]

    def of(self, kind: str) -> list[StoredResult]:
        """The completed runs of ``kind``, in expansion order."""
        return [r for r in self.results if r.run.kind == kind]


def run_one_off(study: Study, db: Path, command: str, overwrite: bool = False,
                on_event: EventFn = quiet, source_path: str | None = None, leave_no_trace: bool = True) -> OneOff:
    """Run ``study`` into ``db`` (a fresh database with ``overwrite``) and read its runs back.

    A failed run or a model that cannot be loaded stops the command with one line naming it; the runs that did
    complete stay in the database and are reused by the next attempt. When none did in a database this call
    created, the database and the folders it made are removed (``leave_no_trace``; a study file's driver keeps
    the failed rows instead).
    """
    from esa.executors import run_study

    db = Path(db)
    made = [d for d in (db.parent / "artifacts", db.parent, *db.parent.parents) if not d.exists()]  # created here
    db.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        fresh_database(db)
    new = not db.exists()
    summary = run_study(study, db, "local", source_path, on_event)
    if not summary.ok:
        what, error = (summary.failed or summary.load_errors)[0]
        if leave_no_trace and new and not summary.completed:  # nothing worth keeping: leave no trace of the attempt
            _remove_new(db, made)
            raise EsaError(f"{command}: {what}: {error}")
        raise EsaError(f"{command}: {what}: {error} — the completed runs are kept in {db}")
    return OneOff(study, db, tuple(_read_back(study, db)))


def _read_back(study: Study, db: Path) -> list[StoredResult]:
    """The study's runs found by run id (so rows that an older config or kind version left in the same
    database are never picked up), each model's fingerprint taken from its stored rows."""
    with Reader(db) as reader:
        rows = {r.run_id: r for r in reader.runs(sha256_json(study.to_dict()), completed=True)}
        fingerprints = {canonical(r.config.get("model")): r.model for r in rows.values()}
        out = []
        for run in expand(study):
            fingerprint = fingerprints.get(canonical(run.model.identity()))  # as run.config() stores it
            rid = run_key(run, fingerprint) if fingerprint is not None else None
            if rid in rows:
                out.append(StoredResult(run, rows[rid], _arrays(reader, rid), reader.documents(rid)))
        return out


def canonical(spec: dict | None) -> str:
    return sha256_json(spec or {})


def _arrays(reader: Reader, rid: str) -> dict[str, np.ndarray]:
    """The run's per-window arrays; {} for a kind that stores none."""
    try:
        return reader.arrays(rid)
    except EsaError:
        return {}
