"""Acceptance test: `esa run` SIGKILLed at random points, then rerun, gives exactly an uninterrupted run's db.

A small study (a tiny random Llama saved with the SmolLM2 tokenizer, a small text corpus, 2 contexts × 3
seeds) runs in a subprocess that is killed with SIGKILL after a seeded random number of committed runs plus
a seeded random delay — so kills land while a model loads, while a run computes, while its artifact is
written, or between the artifact and its row. The rerun must leave exactly the expected rows, none twice,
with per-window arrays and metrics identical to an uninterrupted run.
"""

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import yaml

from esa.executors import run_study
from esa.store import Store
from esa.study import expand, load_study

DETERMINISTIC = ("perplexity", "nll_per_token", "token_accuracy", "bits_per_byte", "word_perplexity",
                 "scored_tokens", "scored_bytes", "scored_words", "n_windows", "n_nonfinite_windows",
                 "seed_invariant", "windows_available", "config.dataset", "config.context_len", "config.seed")
N_RUNS = 6
FINISHED = re.compile(r"\[\d+/\d+\] ")  # a progress line (timestamped off a terminal)


@pytest.fixture(scope="module")
def study_file(make_study_dir, python_docs):
    root = make_study_dir("crash", "\n\n".join(python_docs.documents[:40]))
    spec = {"name": "crash", "models": ["./model"], "datasets": ["./corpus.txt"], "context_lens": [32, 64],
            "seeds": [0, 1, 2], "max_eval_tokens": 1024, "batch_tokens": 256}
    (root / "crash.yaml").write_text(yaml.safe_dump(spec))
    assert len(expand(load_study(root / "crash.yaml"))) == N_RUNS
    return root / "crash.yaml"


@pytest.fixture(scope="module")
def reference(study_file, tmp_path_factory):
    """The uninterrupted run: {run_id: (deterministic metrics, per-window arrays)}."""
    db = tmp_path_factory.mktemp("reference") / "ref.db"
    assert run_study(load_study(study_file), db).completed == N_RUNS
    return _snapshot(db)


def _snapshot(db) -> dict:
    with Store(db) as store:
        frame = store.runs_frame("crash").set_index("run_id")
        return {rid: ({k: frame.loc[rid, k] for k in DETERMINISTIC}, store.load_arrays(rid))
                for rid in frame.index}


def _count_rows(db) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        return con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] if "runs" in tables else 0


def _run_and_kill(study_file, db, rng) -> None:
    """Start `esa run` in a subprocess; SIGKILL it after k committed runs plus a random delay."""
    wait_for = int(rng.integers(0, N_RUNS))  # committed runs to see before the delay starts
    delay = float(rng.uniform(0.0, 0.8))
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONUNBUFFERED": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    code = "import sys; from esa.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "--no-progress", "run", str(study_file), "--db", str(db)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = threading.Event()
    count = [0]

    def reader():
        for line in proc.stdout:
            if "run(s) to do" in line and wait_for == 0:
                seen.set()
            if FINISHED.search(line) and not line.rstrip().endswith("…"):  # "[i/n] <run>: <result>", not a start
                count[0] += 1
                if count[0] >= wait_for:
                    seen.set()
        seen.set()  # the process ended

    threading.Thread(target=reader, daemon=True).start()
    seen.wait(timeout=120)
    time.sleep(delay)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.parametrize("seed, kills", [(0, 1), (1, 2)])
def test_sigkill_then_rerun_equals_uninterrupted(study_file, reference, tmp_path, seed, kills):
    rng = np.random.default_rng(seed)
    db = tmp_path / "crash.db"
    for _ in range(kills):
        _run_and_kill(study_file, db, rng)
    before = _count_rows(db)
    summary = run_study(load_study(study_file), db)
    assert summary.ok and summary.completed == N_RUNS - before and summary.skipped == before

    with Store(db) as store:
        con = store.con
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("SELECT COUNT(*), COUNT(DISTINCT run_id) FROM runs").fetchone() == (N_RUNS, N_RUNS)
        assert con.execute("SELECT COUNT(*) FROM runs WHERE status = 'completed'").fetchone()[0] == N_RUNS
        assert con.execute("SELECT COUNT(*) FROM study_runs").fetchone()[0] == N_RUNS
        assert con.execute("SELECT COUNT(*) FROM studies").fetchone()[0] == 1
    got = _snapshot(db)
    assert set(got) == set(reference)
    for rid, (metrics, arrays) in reference.items():
        assert got[rid][0] == metrics
        assert set(got[rid][1]) == set(arrays)
        for key, value in arrays.items():
            np.testing.assert_array_equal(got[rid][1][key], value)
    finished = {p.name for p in (db.parent / "artifacts").iterdir() if (p / "per_window.npz").is_file()}
    assert finished == set(reference)


def test_the_kills_interrupt_real_work(study_file, tmp_path):
    """Guard against a vacuous acceptance test: a kill after the first commit leaves a partial database."""
    db = tmp_path / "partial.db"

    class FirstCommit:
        def integers(self, lo, hi):
            return 1

        def uniform(self, lo, hi):
            return 0.0

    _run_and_kill(study_file, db, FirstCommit())
    assert 1 <= _count_rows(db) < N_RUNS
