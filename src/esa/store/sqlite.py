"""SQLite helpers shared by the store's writer, its claims and its reader."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from esa.core.errors import EsaError

APPLICATION_ID = 0x45534131  # "ESA1" — PRAGMA application_id of every ESA results database
SCHEMA_VERSION = 2  # PRAGMA user_version; bump with an entry in esa.store.db.MIGRATIONS when the tables change
SQLITE_MAGIC = b"SQLite format 3\x00"


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
