"""Run claims: drivers that share a results database never compute a run twice (issue 11, item 7).

Fast tier, no model: claim/renew/release semantics, takeover of a dead holder's and of an expired claim,
the schema 1 -> 2 migration, the lease keeper, and two real processes racing for the same 50 runs.
"""

import multiprocessing
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from esa.core.errors import EsaError
from esa.store import SCHEMA_VERSION, LeaseKeeper, RunRecord, Store, new_holder, utc_now
from esa.store.claims import _host_id

A, B = "host:1:aaaaaaaa", "host:2:bbbbbbbb"  # two holders in this one process


def _record(rid: str, status: str = "completed") -> RunRecord:
    return RunRecord(rid, "baseline", {"seed": 0}, {"model_id": "m"}, {"git_sha": "x"},
                     {"perplexity": 3.0} if status == "completed" else {}, status, utc_now(), utc_now(),
                     error=None if status == "completed" else "boom")


def _put_claim(store: Store, rid: str, holder: str, pid: int, host: str, expires_in: float) -> None:
    """A claim as another process (or host) would have written it."""
    store.con.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?, ?)",
                      (rid, holder, pid, host, time.time() + expires_in, utc_now()))


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "r.db") as s:
        yield s


# ------------------------------------------------------------------------------------------ semantics
def test_claim_renew_release(store):
    assert store.claim("r1", A, 60)
    assert not store.claim("r1", B, 60)  # A is alive (this process) and its lease runs
    assert store.claim("r1", A, 60)  # claiming one's own claim renews it
    assert store.claimed_by_others(["r1", "r2"], B) == {"r1"} and store.claimed_by_others(["r1"], A) == set()
    assert store.renew("r1", A, 60) and not store.renew("r1", B, 60)
    store.release("r1", B)  # not B's to release
    assert not store.claim("r1", B, 60)
    store.release("r1", A)
    assert store.claim("r1", B, 60) and not store.renew("r1", A, 60)
    with pytest.raises(EsaError, match="lease_seconds must be a positive"):
        store.claim("r2", A, 0)


def test_new_holder_names_host_and_process():
    host, pid, tag = new_holder().split(":")
    assert host and int(pid) == os.getpid() and len(tag) == 8 and new_holder() != new_holder()


def test_commit_drops_the_claim_and_a_completed_run_cannot_be_claimed(store):
    assert store.claim("r1", A, 60)
    store.commit_run(_record("r1"), A)
    assert store.con.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0
    assert not store.claim("r1", B, 60) and not store.claim("r1", A, 60)


def test_failed_run_drops_only_its_holders_claim_and_can_be_retried(store):
    assert store.claim("r1", A, 60)
    store.commit_run(_record("r1", "failed"), B)  # B's late failure must not free A's claim
    assert not store.claim("r1", B, 60)
    store.commit_run(_record("r1", "failed"), A)
    assert store.claim("r1", B, 60)  # a failed run is retried by whoever claims it next


def test_claim_of_a_dead_process_is_taken_over_at_once(store):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid names no process now
    _put_claim(store, "r1", "host:dead:00000000", child.pid, _host_id(), expires_in=3600)
    assert store.claimed_by_others(["r1"], B) == set()
    assert store.claim("r1", B, 60)


def test_claim_from_another_host_lives_until_its_lease_expires(store):
    _put_claim(store, "r1", "elsewhere:1:00000000", 2**22 + 1, "elsewhere/pid:[1]", expires_in=3600)
    assert not store.claim("r1", B, 60)  # its pid cannot be probed from here; only the lease can free it
    _put_claim(store, "r2", "elsewhere:1:00000000", 2**22 + 1, "elsewhere/pid:[1]", expires_in=-1)
    assert store.claim("r2", B, 60)


def test_expired_lease_is_taken_over(store):
    assert store.claim("r1", A, 0.05)
    time.sleep(0.1)
    assert store.claimed_by_others(["r1"], B) == set()
    assert store.claim("r1", B, 60) and not store.renew("r1", A, 60)


# ------------------------------------------------------------------------------------------ schema
def test_schema_1_database_gets_the_claims_table(tmp_path):
    path = tmp_path / "old.db"
    with Store(path) as s:
        s.commit_run(_record("r1"))
    con = sqlite3.connect(path)  # make it what ESA with schema 1 wrote: no claims table
    con.execute("DROP TABLE claims")
    con.execute("PRAGMA user_version=1")
    con.close()
    with Store(path) as s:
        assert s.con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        assert s.completed(["r1"]) == {"r1"} and not s.claim("r1", A, 60) and s.claim("r2", A, 60)


# ------------------------------------------------------------------------------------------ leases
def test_holding_keeps_a_short_lease_alive_then_releases(store):
    assert store.claim("r1", A, 0.6)
    with store.holding("r1", A, 0.6) as lease:
        time.sleep(1.5)  # 2.5 leases: only the renewals every 0.2 s keep it
        assert not store.claim("r1", B, 60) and lease.lost == set()
    assert store.claim("r1", B, 60)  # released on exit
    with pytest.raises(EsaError, match="holds no claim"):
        with store.holding("r2", A, 60):
            pass


def test_keeper_reports_a_claim_taken_over(store):
    assert store.claim("r1", A, 0.3)
    with LeaseKeeper(store.path, A, 0.3) as keeper:
        keeper.add("r1")
        _put_claim(store, "r1", B, os.getpid(), _host_id(), expires_in=60)  # as if A's lease had lapsed
        deadline = time.time() + 5
        while "r1" not in keeper.lost and time.time() < deadline:
            time.sleep(0.02)
    assert keeper.lost == {"r1"}
    assert store.con.execute("SELECT holder FROM claims").fetchall() == [(B,)]  # B's claim is not touched


# ------------------------------------------------------------------------------------------ two drivers
N_RUNS = 50


def _driver(db: str, log: str, ready) -> None:
    """One `esa run` in miniature: claim each pending run, "compute" it for 10 ms, commit it."""
    holder = new_holder()
    with Store(db) as store, open(log, "a") as out:
        ready.wait()  # both drivers have imported and opened the database: race from here
        for i in range(N_RUNS):
            rid = f"run{i:02d}"
            if store.claim(rid, holder, 30):
                time.sleep(0.01)
                out.write(f"{rid}\n")
                out.flush()
                store.commit_run(_record(rid), holder)


def test_two_concurrent_drivers_execute_every_run_exactly_once(tmp_path):
    db = tmp_path / "shared.db"  # created by whichever driver opens it first
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(2, timeout=60)
    logs = [tmp_path / f"driver{i}.log" for i in range(2)]
    procs = [ctx.Process(target=_driver, args=(str(db), str(log), ready)) for log in logs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    executed = [log.read_text().split() for log in logs]
    everything = sorted(executed[0] + executed[1])
    assert everything == [f"run{i:02d}" for i in range(N_RUNS)]  # each run once overall: no duplicates
    assert all(executed), f"one driver ran nothing, so nothing raced: {[len(e) for e in executed]}"
    with Store(db) as store:
        assert store.completed(everything) == set(everything)
        assert store.con.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0
