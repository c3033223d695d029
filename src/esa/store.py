"""Results database: SQLite (WAL mode, one writer — the driver) plus per-run artifact files.

Layout, next to the database file ``<dir>/<name>.db``::

    <dir>/artifacts/<run_id>/per_window.npz     per-window arrays (nll, n_scored, n_correct, window_index)

Tables (schema version :data:`SCHEMA_VERSION`, marked with SQLite's ``application_id`` = "ESA1"):

* ``runs`` — one row per run: ``run_id`` (PK), ``kind``, ``config`` (resolved run config JSON), ``model``
  (fingerprint JSON), ``provenance`` JSON, ``metrics`` JSON, ``status`` (completed | failed), ``error``,
  ``started_at``/``finished_at`` (UTC ISO-8601), ``artifacts`` JSON (paths relative to the db directory).
* ``studies`` (a study's resolved spec) and ``study_runs`` (which runs belong to which study): a run is
  identified by content, so two studies sharing a cell share its row.
* ``models`` — fingerprints seen before, so a rerun of a finished study skips without loading weights.
* view ``results`` — the headline numbers as plain columns, for ``pd.read_sql("select * from results", con)``.

Crash safety: a run's artifact files are written (temp file + fsync + rename) *before* its row is inserted,
in one transaction; a crash at any point leaves either no row (the run is redone) or a complete row. JSON
stores non-finite numbers as the strings "nan"/"inf" (as results.json does).

A file that is not an ESA database — random bytes, a corrupt file, another application's SQLite
database — is refused with a clear message and never written to.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from esa.errors import EsaError
from esa.runs import _jsonable

APPLICATION_ID = 0x45534131  # "ESA1" — PRAGMA application_id of every ESA results database
SCHEMA_VERSION = 1  # PRAGMA user_version; bump with a migration when the tables change
SQLITE_MAGIC = b"SQLite format 3\x00"

SCHEMA = """
CREATE TABLE studies (
    study_id TEXT PRIMARY KEY,      -- sha256 of the study's canonical JSON
    name TEXT NOT NULL,
    spec TEXT NOT NULL,             -- resolved study JSON
    source_path TEXT,
    created_at TEXT NOT NULL
);
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY,        -- sha256 of canonical JSON {config, model identity}
    kind TEXT NOT NULL,
    config TEXT NOT NULL,
    model TEXT NOT NULL,
    provenance TEXT NOT NULL,
    metrics TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('completed', 'failed')),
    error TEXT,
    started_at TEXT NOT NULL,
    finished_at TEXT NOT NULL,
    artifacts TEXT NOT NULL
);
CREATE TABLE study_runs (
    study_id TEXT NOT NULL REFERENCES studies(study_id),
    run_id TEXT NOT NULL,
    PRIMARY KEY (study_id, run_id)
);
CREATE TABLE models (
    model_key TEXT PRIMARY KEY,     -- sha256 of the ModelSpec + its content-addressed source
    fingerprint TEXT NOT NULL,
    recorded_at TEXT NOT NULL
);
CREATE VIEW results AS SELECT
    run_id, kind, status,
    json_extract(config, '$.model.name') AS model, json_extract(config, '$.model.dtype') AS dtype,
    json_extract(config, '$.dataset') AS dataset, json_extract(config, '$.context_len') AS context_len,
    json_extract(config, '$.seed') AS seed, json_extract(config, '$.method') AS method,
    json_extract(metrics, '$.perplexity') AS perplexity, json_extract(metrics, '$.token_accuracy') AS token_accuracy,
    json_extract(metrics, '$.bits_per_byte') AS bits_per_byte,
    json_extract(metrics, '$.scored_tokens') AS scored_tokens,
    json_extract(metrics, '$.n_nonfinite_windows') AS n_nonfinite_windows,
    json_extract(metrics, '$.seed_invariant') AS seed_invariant,
    json_extract(metrics, '$.tokens_per_second') AS tokens_per_second,
    json_extract(model, '$.revision') AS model_revision, started_at, finished_at
FROM runs;
"""


def canonical_json(obj) -> str:
    """Deterministic JSON: sorted keys, no spaces, non-finite floats as strings."""
    return json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_json(obj) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class RunRecord:
    """Everything stored for one run (the executor fills it; the store persists it)."""

    run_id: str
    kind: str
    config: dict
    model: dict  # fingerprint
    provenance: dict
    metrics: dict
    status: str  # completed | failed
    started_at: str
    finished_at: str
    error: str | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # saved as artifacts/<run_id>/per_window.npz


# ------------------------------------------------------------------------------------- opening safely
def _refuse(path: Path, why: str) -> EsaError:
    return EsaError(f"{path} {why}; ESA refuses to write to it. Give --db a new file name or an ESA "
                    "results database")


def _inspect(path: Path) -> str:
    """'new' for a missing/empty file or an empty SQLite db, 'esa' for ours; raise for anything else."""
    if not path.exists() or path.stat().st_size == 0:
        return "new"
    with open(path, "rb") as fh:
        head = fh.read(len(SQLITE_MAGIC))
    if head != SQLITE_MAGIC:
        raise _refuse(path, f"is not an SQLite database (it starts with {head[:8]!r})")
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            app_id = con.execute("PRAGMA application_id").fetchone()[0]
            version = con.execute("PRAGMA user_version").fetchone()[0]
            tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise _refuse(path, f"is a corrupt or unreadable SQLite file ({exc})") from exc
    if app_id == APPLICATION_ID:
        if version > SCHEMA_VERSION:
            raise EsaError(f"{path} was written by a newer ESA (schema {version} > {SCHEMA_VERSION}); "
                           "upgrade ESA to read it")
        return "esa"
    if app_id == 0 and not tables:
        return "new"
    raise _refuse(path, f"is an SQLite database of another application (application_id={app_id:#x}, "
                        f"tables: {', '.join(tables) or 'none'})")


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz via a temp file that is fsync'ed and renamed, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class Store:
    """An open results database. Use as a context manager; only one process should write (the driver)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        state = _inspect(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EsaError(f"cannot create the directory of --db {self.path} ({exc.strerror}); "
                           "choose a writable location") from exc
        self.con = sqlite3.connect(self.path, isolation_level=None, timeout=60)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("PRAGMA synchronous=FULL")
        self.con.execute("PRAGMA foreign_keys=ON")
        if state == "new":
            with self.transaction():
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        self.con.execute(statement)
                self.con.execute(f"PRAGMA application_id={APPLICATION_ID}")
                self.con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # context manager -------------------------------------------------------------------------------
    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.con.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT; rolled back on any exception."""
        self.con.execute("BEGIN IMMEDIATE")
        try:
            yield self.con
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

    # studies and models ----------------------------------------------------------------------------
    def record_study(self, name: str, spec: dict, source_path: str | None = None) -> str:
        study_id = sha256_json(spec)
        with self.transaction() as con:
            con.execute("INSERT OR IGNORE INTO studies VALUES (?, ?, ?, ?, ?)",
                        (study_id, name, canonical_json(spec), source_path, utc_now()))
        return study_id

    def link_runs(self, study_id: str, run_ids: Iterable[str]) -> None:
        with self.transaction() as con:
            con.executemany("INSERT OR IGNORE INTO study_runs VALUES (?, ?)", [(study_id, r) for r in run_ids])

    def remember_model(self, model_key: str, fingerprint: dict) -> None:
        with self.transaction() as con:
            con.execute("INSERT OR REPLACE INTO models VALUES (?, ?, ?)",
                        (model_key, canonical_json(fingerprint), utc_now()))

    def known_model(self, model_key: str) -> dict | None:
        row = self.con.execute("SELECT fingerprint FROM models WHERE model_key = ?", (model_key,)).fetchone()
        return json.loads(row[0]) if row else None

    # runs ------------------------------------------------------------------------------------------
    def completed(self, run_ids: Iterable[str]) -> set[str]:
        ids = list(run_ids)
        done: set[str] = set()
        for i in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
            part = ids[i:i + 500]
            rows = self.con.execute(f"SELECT run_id FROM runs WHERE status = 'completed' AND run_id IN "
                                    f"({','.join('?' * len(part))})", part)
            done.update(r[0] for r in rows)
        return done

    def artifact_dir(self, run_id: str) -> Path:
        return self.path.parent / "artifacts" / run_id

    def commit_run(self, rec: RunRecord) -> None:
        """Write the run's artifacts, then its row in one transaction. A completed row is never replaced."""
        artifacts = {}
        if rec.arrays:
            path = self.artifact_dir(rec.run_id) / "per_window.npz"
            _write_npz_atomic(path, rec.arrays)
            artifacts["per_window"] = str(path.relative_to(self.path.parent))
        row = (rec.run_id, rec.kind, canonical_json(rec.config), canonical_json(rec.model),
               canonical_json(rec.provenance), canonical_json(rec.metrics), rec.status, rec.error,
               rec.started_at, rec.finished_at, canonical_json(artifacts))
        with self.transaction() as con:
            con.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(run_id) DO UPDATE "
                        "SET kind=excluded.kind, config=excluded.config, model=excluded.model, "
                        "provenance=excluded.provenance, metrics=excluded.metrics, status=excluded.status, "
                        "error=excluded.error, started_at=excluded.started_at, finished_at=excluded.finished_at, "
                        "artifacts=excluded.artifacts WHERE runs.status <> 'completed'", row)

    def load_arrays(self, run_id: str) -> dict[str, np.ndarray]:
        """The per-window arrays of a completed run."""
        row = self.con.execute("SELECT artifacts FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None or "per_window" not in json.loads(row[0]):
            raise EsaError(f"run {run_id} has no per-window artifacts in {self.path}")
        with np.load(self.path.parent / json.loads(row[0])["per_window"]) as z:
            return {k: z[k] for k in z.files}

    def runs_frame(self, study: str | None = None) -> pd.DataFrame:
        """One row per run with config, fingerprint, metrics and provenance flattened into columns."""
        query = "SELECT r.* FROM runs r"
        params: tuple = ()
        if study is not None:
            query += (" WHERE r.run_id IN (SELECT sr.run_id FROM study_runs sr JOIN studies s "
                      "ON s.study_id = sr.study_id WHERE s.name = ? OR s.study_id = ?)")
            params = (study, study)
        rows = pd.read_sql(query + " ORDER BY r.started_at", self.con, params=params)
        return flatten_runs(rows)


def flatten_runs(rows: pd.DataFrame) -> pd.DataFrame:
    """Expand the JSON columns: ``config.*``, ``model.*``, ``provenance.*`` and the metrics unprefixed."""
    parts = [rows[["run_id", "kind", "status", "error", "started_at", "finished_at"]].reset_index(drop=True)]
    for col, prefix in (("config", "config."), ("model", "model."), ("metrics", ""),
                        ("provenance", "provenance."), ("artifacts", "artifacts.")):
        flat = pd.json_normalize([json.loads(v) for v in rows[col]], sep=".")
        flat = flat.map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
        parts.append(flat.add_prefix(prefix))
    return pd.concat(parts, axis=1)


EXPORT_FORMATS = ("csv", "parquet")


def export(db: str | Path, out: str | Path, fmt: str | None = None, study: str | None = None) -> int:
    """Write the runs of ``db`` (optionally one study's) as CSV or Parquet; returns the row count."""
    db, out = Path(db), Path(out)
    if not db.is_file():
        raise EsaError(f"results database {db} does not exist; run `esa run STUDY.yaml --db {db}` first")
    fmt = fmt or out.suffix.lstrip(".")
    if fmt not in EXPORT_FORMATS:
        raise EsaError(f"unknown export format {fmt!r}; use --format csv or parquet")
    if _inspect(db) != "esa":
        raise EsaError(f"{db} holds no ESA results yet; run a study into it first")
    with Store(db) as store:
        frame = store.runs_frame(study)
    if study is not None and frame.empty:
        raise EsaError(f"no runs of study {study!r} in {db}; check the name (`esa results {db}` lists them)")
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        frame.to_csv(out, index=False)
    else:
        frame.to_parquet(out, index=False)
    return len(frame)


def study_names(db: str | Path) -> list[tuple[str, int]]:
    """(study name, number of linked runs) for every study recorded in ``db``."""
    with Store(db) as store:
        return [(r[0], r[1]) for r in store.con.execute(
            "SELECT s.name, COUNT(sr.run_id) FROM studies s LEFT JOIN study_runs sr ON s.study_id = sr.study_id "
            "GROUP BY s.study_id ORDER BY s.created_at")]
