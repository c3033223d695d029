"""The results database's writer: schema, run records, crash-safe commits, and claims on runs.

Layout, next to the database file ``<dir>/<name>.db``::

    <dir>/artifacts/<run_id>/per_window.npz     per-window arrays (nll, n_scored, n_correct, window_index)

Tables (schema version :data:`~esa.store.sqlite.SCHEMA_VERSION`, marked with SQLite's ``application_id`` =
"ESA1"):

* ``runs`` — one row per run: ``run_id`` (PK), ``kind``, ``config`` (resolved run config JSON), ``model``
  (fingerprint JSON), ``provenance`` JSON, ``metrics`` JSON, ``status`` (completed | failed), ``error``,
  ``started_at``/``finished_at`` (UTC ISO-8601), ``artifacts`` JSON (paths relative to the db directory).
* ``studies`` (a study's resolved spec) and ``study_runs`` (which runs belong to which study): a run is
  identified by content, so two studies sharing a cell share its row.
* ``models`` — fingerprints seen before, so a rerun of a finished study skips without loading weights.
* ``claims`` — which driver is computing which run, under a lease (:mod:`esa.store.claims`).
* view ``results`` — the headline numbers as plain columns, for ``pd.read_sql("select * from results", con)``.

Only a driver writes (this module); everything that reads — reports, exports, the scaling fits, the Python
API — goes through :class:`esa.store.reader.Reader`, read-only.

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
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from esa.core.errors import EsaError
from esa.core.files import _jsonable
from esa.store.claims import (CLAIMS_TABLE, LEASE_SECONDS, LeaseKeeper, _check_lease, _host_id, _live, _renew)
from esa.store.reader import read_arrays, read_frame
from esa.store.sqlite import APPLICATION_ID, SCHEMA_VERSION, _batches, _inspect, _transaction


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
""" + CLAIMS_TABLE

MIGRATIONS: dict[int, tuple[str, ...]] = {1: (CLAIMS_TABLE,)}


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
    documents: dict[str, dict] = field(default_factory=dict)  # saved as artifacts/<run_id>/<name>.json


def _write_text_atomic(path: Path, text: str) -> None:
    """Write a text file via a temp file that is fsync'ed and renamed (see :func:`_write_npz_atomic`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz via a temp file that is fsync'ed and renamed, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


BUSY_SECONDS = 60.0  # how long a driver waits for another one's lock before giving up


def _wal(con: sqlite3.Connection) -> None:
    """Switch to WAL, waiting for a driver that is creating the same new database at this moment: changing the
    journal mode needs an exclusive lock, and SQLite answers "locked" at once there instead of waiting out the
    busy timeout."""
    deadline = time.monotonic() + BUSY_SECONDS
    while True:
        try:
            con.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Store:
    """An open results database. Use as a context manager; drivers sharing one coordinate through claims."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        state = _inspect(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EsaError(f"cannot create the directory of --db {self.path} ({exc.strerror}); "
                           "choose a writable location") from exc
        self.con = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_SECONDS)
        _wal(self.con)
        self.con.execute("PRAGMA synchronous=FULL")
        self.con.execute("PRAGMA foreign_keys=ON")
        if state == "new" or self.con.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            self._create_or_migrate()

    def _create_or_migrate(self) -> None:
        """Create the tables of a new database or apply MIGRATIONS to an older one, in one transaction."""
        with self.transaction() as con:
            version = con.execute("PRAGMA user_version").fetchone()[0]  # again: another driver may have been first
            if version == 0:
                statements = [st for st in SCHEMA.split(";") if st.strip()]
                con.execute(f"PRAGMA application_id={APPLICATION_ID}")
            else:
                statements = [st for step in range(version, SCHEMA_VERSION) for st in MIGRATIONS[step]]
            for statement in statements:
                con.execute(statement)
            con.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # context manager -------------------------------------------------------------------------------
    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.con.close()

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT; rolled back on any exception."""
        return _transaction(self.con)

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
        done: set[str] = set()
        for part in _batches(list(run_ids)):
            rows = self.con.execute(f"SELECT run_id FROM runs WHERE status = 'completed' AND run_id IN "
                                    f"({','.join('?' * len(part))})", part)
            done.update(r[0] for r in rows)
        return done

    # claims: drivers sharing the database never compute a run twice --------------------------------
    def claim(self, run_id: str, holder: str, lease_seconds: float = LEASE_SECONDS) -> bool:
        """Take ``run_id`` for ``holder`` for ``lease_seconds``; False when it is completed or held by another.

        One BEGIN IMMEDIATE transaction, so of drivers racing for a run exactly one gets True. A stale claim
        (lease expired, or its process on this host exited) is taken over; claiming one's own claim renews it.
        """
        _check_lease(lease_seconds)
        with self.transaction() as con:
            if con.execute("SELECT 1 FROM runs WHERE run_id = ? AND status = 'completed'", (run_id,)).fetchone():
                return False
            row = con.execute("SELECT holder, host, pid, expires_at FROM claims WHERE run_id = ?",
                              (run_id,)).fetchone()
            if row and row[0] != holder and _live(*row[1:], time.time(), _host_id()):
                return False
            con.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?, ?)",
                        (run_id, holder, os.getpid(), _host_id(), time.time() + lease_seconds, utc_now()))
        return True

    def renew(self, run_id: str, holder: str, lease_seconds: float = LEASE_SECONDS) -> bool:
        """Extend ``holder``'s claim to now + ``lease_seconds``; False when the claim is no longer its own."""
        _check_lease(lease_seconds)
        return bool(_renew(self.con, [run_id], holder, lease_seconds))

    def release(self, run_id: str, holder: str) -> None:
        """Drop ``holder``'s claim on ``run_id`` (no-op when it holds none), e.g. when a run is abandoned."""
        with self.transaction() as con:
            con.execute("DELETE FROM claims WHERE run_id = ? AND holder = ?", (run_id, holder))

    def claimed_by_others(self, run_ids: Iterable[str], holder: str) -> set[str]:
        """The ``run_ids`` another driver holds a live claim on: for "n runs are computed by another driver"."""
        now, here, taken = time.time(), _host_id(), set()
        for part in _batches(list(run_ids)):
            rows = self.con.execute(f"SELECT run_id, host, pid, expires_at FROM claims WHERE holder <> ? AND "
                                    f"run_id IN ({','.join('?' * len(part))})", [holder, *part])
            taken.update(rid for rid, *claim in rows if _live(*claim, now, here))
        return taken

    @contextmanager
    def holding(self, run_id: str, holder: str, lease_seconds: float = LEASE_SECONDS) -> Iterator[LeaseKeeper]:
        """Keep ``holder``'s claim on ``run_id`` alive while the block runs, and release it when the block exits.

        The run must be claimed first::

            if store.claim(rid, holder):
                with store.holding(rid, holder) as lease:
                    rec = compute(rid)
                    if rid not in lease.lost:
                        store.commit_run(rec, holder)
        """
        if not self.renew(run_id, holder, lease_seconds):
            raise EsaError(f"{holder} holds no claim on run {run_id}; take it with Store.claim first")
        keeper = LeaseKeeper(self.path, holder, lease_seconds)
        keeper.add(run_id)
        try:
            with keeper:
                yield keeper
        finally:
            self.release(run_id, holder)

    def artifact_dir(self, run_id: str) -> Path:
        return self.path.parent / "artifacts" / run_id

    def commit_run(self, rec: RunRecord, holder: str | None = None) -> None:
        """Write the run's artifacts, then its row in one transaction. A completed row is never replaced.

        The same transaction drops the run's claim: every claim once the run is completed (it cannot be
        claimed again), else only ``holder``'s (all when None), so a failed run is free to be retried.
        """
        artifacts = {}
        if rec.arrays:
            path = self.artifact_dir(rec.run_id) / "per_window.npz"
            _write_npz_atomic(path, rec.arrays)
            artifacts["per_window"] = str(path.relative_to(self.path.parent))
        for name, doc in rec.documents.items():
            path = self.artifact_dir(rec.run_id) / f"{name}.json"
            _write_text_atomic(path, canonical_json(doc))
            artifacts[name] = str(path.relative_to(self.path.parent))
        row = (rec.run_id, rec.kind, canonical_json(rec.config), canonical_json(rec.model),
               canonical_json(rec.provenance), canonical_json(rec.metrics), rec.status, rec.error,
               rec.started_at, rec.finished_at, canonical_json(artifacts))
        with self.transaction() as con:
            con.execute("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(run_id) DO UPDATE "
                        "SET kind=excluded.kind, config=excluded.config, model=excluded.model, "
                        "provenance=excluded.provenance, metrics=excluded.metrics, status=excluded.status, "
                        "error=excluded.error, started_at=excluded.started_at, finished_at=excluded.finished_at, "
                        "artifacts=excluded.artifacts WHERE runs.status <> 'completed'", row)
            if holder is None or rec.status == "completed":
                con.execute("DELETE FROM claims WHERE run_id = ?", (rec.run_id,))
            else:
                con.execute("DELETE FROM claims WHERE run_id = ? AND holder = ?", (rec.run_id, holder))

    def load_arrays(self, run_id: str) -> dict[str, np.ndarray]:
        """The per-window arrays of a completed run."""
        return read_arrays(self.con, self.path.parent, run_id)

    def runs_frame(self, study: str | None = None) -> pd.DataFrame:
        """One row per run with config, fingerprint, metrics and provenance flattened into columns."""
        return read_frame(self.con, study)
