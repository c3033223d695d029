"""Results database: SQLite (WAL mode; drivers that share it claim runs) plus per-run artifact files.

Layout, next to the database file ``<dir>/<name>.db``::

    <dir>/artifacts/<run_id>/per_window.npz     per-window arrays (nll, n_scored, n_correct, window_index)

Tables (schema version :data:`SCHEMA_VERSION`, marked with SQLite's ``application_id`` = "ESA1"):

* ``runs`` — one row per run: ``run_id`` (PK), ``kind``, ``config`` (resolved run config JSON), ``model``
  (fingerprint JSON), ``provenance`` JSON, ``metrics`` JSON, ``status`` (completed | failed), ``error``,
  ``started_at``/``finished_at`` (UTC ISO-8601), ``artifacts`` JSON (paths relative to the db directory).
* ``studies`` (a study's resolved spec) and ``study_runs`` (which runs belong to which study): a run is
  identified by content, so two studies sharing a cell share its row.
* ``models`` — fingerprints seen before, so a rerun of a finished study skips without loading weights.
* ``claims`` — which driver is computing which run, under a lease (schema 2; see below).
* view ``results`` — the headline numbers as plain columns, for ``pd.read_sql("select * from results", con)``.

Drivers sharing a database never compute a run twice (issue 11, item 7): a driver takes a run with
:meth:`Store.claim` (one ``BEGIN IMMEDIATE`` transaction, so of two racers exactly one wins), keeps the lease
alive with :meth:`Store.holding` or a :class:`LeaseKeeper` while it computes, and :meth:`Store.commit_run`
drops the claim in the transaction that inserts the row. A claim dies with its holder: at once when the
holder's process on this host has exited (``os.kill(pid, 0)``), after ``expires_at`` otherwise. WAL needs
shared memory, so every driver of one database runs on one host; the lease covers a hung holder, a reused
pid is bounded by it, and a holder in another PID namespace (a container) is never probed.

Crash safety: a run's artifact files are written (temp file + fsync + rename) *before* its row is inserted,
in one transaction; a crash at any point leaves either no row (the run is redone) or a complete row. JSON
stores non-finite numbers as the strings "nan"/"inf" (as results.json does).

A file that is not an ESA database — random bytes, a corrupt file, another application's SQLite
database — is refused with a clear message and never written to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from esa.errors import EsaError
from esa.runs import _jsonable

APPLICATION_ID = 0x45534131  # "ESA1" — PRAGMA application_id of every ESA results database
SCHEMA_VERSION = 2  # PRAGMA user_version; bump with an entry in MIGRATIONS when the tables change
SQLITE_MAGIC = b"SQLite format 3\x00"
LEASE_SECONDS = 120.0  # default claim lease; a LeaseKeeper renews it every third of that

log = logging.getLogger(__name__)

CLAIMS_TABLE = """
CREATE TABLE IF NOT EXISTS claims (
    run_id TEXT PRIMARY KEY,        -- no foreign key: a run is claimed before its row exists
    holder TEXT NOT NULL,           -- new_holder() of the driver: "<hostname>:<pid>:<8 hex>"
    pid INTEGER NOT NULL,           -- the claiming process, probed with os.kill(pid, 0) from the same host
    host TEXT NOT NULL,             -- _host_id(): hostname and PID namespace, where that pid names a process
    expires_at REAL NOT NULL,       -- Unix seconds, after which the claim lapses unless renewed
    claimed_at TEXT NOT NULL        -- UTC ISO-8601
)"""

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

# user_version N -> N + 1, applied in order in one transaction on open. Version 2 (claims) is additive, but
# it is a version all the same: an ESA that knows only version 1 ignores claims and would recompute what a
# newer driver holds, so it is told to upgrade (the "newer ESA" refusal) instead of running beside one.
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


@contextmanager
def _transaction(con: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE … COMMIT on an autocommit connection; rolled back on any exception."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _batches(ids: list[str], size: int = 500) -> Iterator[list[str]]:
    """Slices of ``ids`` that stay under SQLite's bound-parameter limit."""
    for i in range(0, len(ids), size):
        yield ids[i:i + size]


# ------------------------------------------------------------------------------------------ claims
def new_holder() -> str:
    """A driver's claim identity, ``"<hostname>:<pid>:<8 hex>"``; the hex tells two drivers of one process apart."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _host_id() -> str:
    """Where a pid names one process: the hostname and, on Linux, the PID namespace (containers share hostnames)."""
    try:
        return f"{socket.gethostname()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return socket.gethostname()


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # there os.kill(pid, 0) sends CTRL_C_EVENT instead of probing; rely on the lease
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _live(host: str, pid: int, expires_at: float, now: float, here: str) -> bool:
    """A claim is live until its lease expires, and no longer than its process when that runs on this host."""
    return expires_at > now and (host != here or _pid_alive(pid))


def _check_lease(lease_seconds: float) -> None:
    if not lease_seconds > 0:
        raise EsaError(f"lease_seconds must be a positive number of seconds, not {lease_seconds!r}; "
                       f"the default is {LEASE_SECONDS}")


def _renew(con: sqlite3.Connection, run_ids: list[str], holder: str, lease_seconds: float) -> set[str]:
    """Extend ``holder``'s claims on ``run_ids`` to now + lease; returns the ids it still holds."""
    expires_at = time.time() + lease_seconds
    with _transaction(con):
        return {rid for rid in run_ids if con.execute("UPDATE claims SET expires_at = ? WHERE run_id = ? AND "
                                                      "holder = ?", (expires_at, rid, holder)).rowcount}


class LeaseKeeper:
    """Renews a driver's claims every ``lease_seconds / 3`` from a daemon thread while their runs execute.

    The thread opens its own connection (an SQLite connection belongs to the thread that made it). A claim
    that is no longer ours — our lease lapsed (a suspended machine, a database locked for longer than the
    lease) and another driver took the run — is dropped and listed in :attr:`lost`; the executor may abandon
    that run (committing it anyway is safe: a completed row is never replaced). Use as a context manager::

        with LeaseKeeper(db, holder) as keeper:
            keeper.add(rid)   # after store.claim(rid, holder) returned True
            ...               # compute, commit_run(rec, holder)
            keeper.discard(rid)
    """

    def __init__(self, db: str | Path, holder: str, lease_seconds: float = LEASE_SECONDS) -> None:
        _check_lease(lease_seconds)
        self.db, self.holder, self.lease_seconds = Path(db), holder, lease_seconds
        self.lost: set[str] = set()
        self._held: set[str] = set()
        self._lock = threading.Lock()  # guards _held and lost, shared with the renewing thread
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, run_id: str) -> None:
        with self._lock:
            self._held.add(run_id)

    def discard(self, run_id: str) -> None:
        with self._lock:
            self._held.discard(run_id)

    def held(self) -> set[str]:
        """The run ids whose claims this keeper is renewing now."""
        with self._lock:
            return set(self._held)

    def __enter__(self) -> LeaseKeeper:
        self._thread = threading.Thread(target=self._renew_until_stopped, name=f"esa-lease-{self.holder}",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _renew_until_stopped(self) -> None:
        every = self.lease_seconds / 3
        con = sqlite3.connect(self.db, isolation_level=None, timeout=every)
        try:
            while not self._stop.wait(every):
                with self._lock:
                    ids = sorted(self._held)
                if not ids:
                    continue
                try:
                    kept = _renew(con, ids, self.holder, self.lease_seconds)
                except sqlite3.OperationalError as exc:  # locked past the timeout: two ticks of slack remain
                    log.warning("could not renew %d claim(s) of %s in %s (%s); retrying", len(ids), self.holder,
                                self.db, exc)
                    continue
                with self._lock:
                    gone = (set(ids) - kept) & self._held  # not what was discarded meanwhile
                    self._held -= gone
                    self.lost |= gone
        finally:
            con.close()


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
        self.con = sqlite3.connect(self.path, isolation_level=None, timeout=60)
        self.con.execute("PRAGMA journal_mode=WAL")
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
