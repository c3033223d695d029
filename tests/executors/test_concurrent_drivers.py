"""Two drivers on one database compute every run exactly once between them (issue 11, item 7)."""

from __future__ import annotations

import multiprocessing as mp

from esa.store import Store
from esa.study import parse_study


def _study(d):
    return parse_study({"name": "two", "models": [str(d / "model")], "datasets": [str(d / "corpus.txt")],
                        "context_lens": [16, 32], "seeds": [0, 1, 2], "max_eval_tokens": 120, "batch_tokens": 256})


def _drive(d, db, start, out) -> None:
    from esa.executors import run_study

    start.wait()
    summary = run_study(_study(d), db)
    out.put((summary.completed, summary.skipped, len(summary.elsewhere), len(summary.failed)))


def test_two_concurrent_drivers_split_the_runs(make_study_dir, tmp_path):
    d, db = make_study_dir("two_drivers"), tmp_path / "two.db"
    total = len(_study(d).context_lens) * 3
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_drive, args=(d, db, start, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs)
    computed = sum(r[0] for r in results)
    assert computed == total, results  # never twice: each run computed by exactly one driver
    assert all(r[3] == 0 for r in results)
    with Store(db) as store:
        frame = store.runs_frame("two")
        assert len(frame) == total and (frame["status"] == "completed").all()
        assert store.con.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0  # every claim released
