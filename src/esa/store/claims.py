"""Claims: which driver is computing which run, under a lease that dies with its holder.

Drivers sharing a database never compute a run twice (issue 11, item 7): a driver takes a run with
:meth:`esa.store.Store.claim` (one ``BEGIN IMMEDIATE`` transaction, so of two racers exactly one wins), keeps the
lease alive with :meth:`~esa.store.Store.holding` or a :class:`LeaseKeeper` while it computes, and
:meth:`~esa.store.Store.commit_run` drops the claim in the transaction that inserts the row. A claim dies with
its holder: at once when the holder's process on this host has exited (``os.kill(pid, 0)``), after
``expires_at`` otherwise. WAL needs shared memory, so every driver of one database runs on one host; the lease
covers a hung holder, a reused pid is bounded by it, and a holder in another PID namespace (a container) is
never probed.
"""

from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from pathlib import Path

from esa.core.errors import EsaError
from esa.store.sqlite import _transaction

log = logging.getLogger(__name__)

LEASE_SECONDS = 120.0  # default claim lease; a LeaseKeeper renews it every third of that


CLAIMS_TABLE = """
CREATE TABLE IF NOT EXISTS claims (
    run_id TEXT PRIMARY KEY,        -- no foreign key: a run is claimed before its row exists
    holder TEXT NOT NULL,           -- new_holder() of the driver: "<hostname>:<pid>:<8 hex>"
    pid INTEGER NOT NULL,           -- the claiming process, probed with os.kill(pid, 0) from the same host
    host TEXT NOT NULL,             -- _host_id(): hostname and PID namespace, where that pid names a process
    expires_at REAL NOT NULL,       -- Unix seconds, after which the claim lapses unless renewed
    claimed_at TEXT NOT NULL        -- UTC ISO-8601
)"""


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
