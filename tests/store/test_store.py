"""Results database: refusal of foreign files, atomic run commits, run ids, resume, export and executors."""

import hashlib
import json
import os
import sqlite3
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from esa.cli import main
from esa.core.errors import EsaError
from esa.executors import run_id, run_study
from esa.store import APPLICATION_ID, SCHEMA_VERSION, RunRecord, Store, export
from esa.study import parse_study
from helpers.models import forbid_model_loading

DETERMINISTIC = ("perplexity", "nll_per_token", "token_accuracy", "bits_per_byte", "scored_tokens",
                 "scored_bytes", "n_windows", "n_nonfinite_windows", "seed_invariant")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _record(rid="r1", status="completed", ppl=3.0, **kw) -> RunRecord:
    arrays = {"nll": np.array([1.0, 2.0]), "n_scored": np.array([3, 4])} if status == "completed" else {}
    return RunRecord(rid, "baseline", {"seed": 0}, {"model_id": "m"}, {"git_sha": "x"},
                     {"perplexity": ppl} if status == "completed" else {}, status, "t0", "t1",
                     error=None if status == "completed" else "boom", arrays=arrays, **kw)


# -------------------------------------------------------------------------------------- foreign files
def test_new_database_is_marked_and_in_wal_mode(tmp_path):
    with Store(tmp_path / "r.db") as store:
        assert store.con.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert store.con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert store.con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with Store(tmp_path / "r.db"):  # reopening our own database is fine
        pass


def test_random_bytes_file_is_refused_and_untouched(tmp_path):
    path = tmp_path / "r.db"
    path.write_bytes(np.random.default_rng(0).bytes(8192))
    before = _sha(path)
    with pytest.raises(EsaError, match="is not an SQLite database.*refuses"):
        Store(path)
    assert _sha(path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["r.db"]


def test_other_applications_sqlite_db_is_refused_and_untouched(tmp_path):
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    con.execute("INSERT INTO customers VALUES (1, 'ada')")
    con.commit()
    con.close()
    before = _sha(path)
    with pytest.raises(EsaError, match="another application.*customers"):
        Store(path)
    assert _sha(path) == before
    assert main(["results", str(path), "--out", str(tmp_path / "x.csv")]) == 2
    assert _sha(path) == before


def test_corrupt_sqlite_and_newer_schema_are_refused(tmp_path):
    corrupt = tmp_path / "c.db"
    corrupt.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    with pytest.raises(EsaError, match="corrupt or unreadable"):
        Store(corrupt)
    newer = tmp_path / "n.db"
    Store(newer).close()
    con = sqlite3.connect(newer)
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(EsaError, match="newer ESA"):
        Store(newer)


# ----------------------------------------------------------------------------------------- commits
def test_commit_writes_artifact_then_row_and_never_replaces_completed(tmp_path):
    with Store(tmp_path / "r.db") as store:
        store.commit_run(_record(ppl=3.0))
        store.commit_run(_record(ppl=99.0))  # a second commit of a completed run changes nothing
        (metrics,) = store.con.execute("SELECT metrics FROM runs").fetchone()
        assert json.loads(metrics)["perplexity"] == 3.0
        np.testing.assert_array_equal(store.load_arrays("r1")["nll"], [1.0, 2.0])
        assert (tmp_path / "artifacts" / "r1" / "per_window.npz").is_file()


def test_documents_are_stored_beside_the_row_and_read_back(tmp_path):
    """A run's JSON documents (RunContext.documents) land in artifacts/<id>/<name>.json, non-finite as strings."""
    from esa.store import Reader

    doc = {"schema": "esa.perturb/1", "rows": [{"x": float("inf")}], "nested": {"b": 1, "a": [1, 2]}}
    with Store(tmp_path / "r.db") as store:
        store.commit_run(_record(documents={"protocol": doc}))
        store.commit_run(_record("r2"))
    assert (tmp_path / "artifacts" / "r1" / "protocol.json").is_file()
    with Reader(tmp_path / "r.db") as reader:
        assert reader.documents("r1") == {"protocol": {**doc, "rows": [{"x": "inf"}]}}
        assert reader.documents("r2") == {} and reader.documents("missing") == {}


def test_failed_run_is_retried_and_replaced(tmp_path):
    with Store(tmp_path / "r.db") as store:
        store.commit_run(_record(status="failed"))
        assert store.completed(["r1"]) == set()
        store.commit_run(_record(ppl=5.0))
        assert store.completed(["r1"]) == {"r1"}
        assert store.con.execute("SELECT COUNT(*), MAX(status) FROM runs").fetchone() == (1, "completed")


def test_crash_between_artifact_and_row_leaves_no_row(tmp_path, monkeypatch):
    store = Store(tmp_path / "r.db")

    def die(*a, **k):
        raise KeyboardInterrupt  # stands in for SIGKILL after the artifact is on disk

    monkeypatch.setattr(store, "transaction", die)
    with pytest.raises(KeyboardInterrupt):
        store.commit_run(_record())
    store.close()
    assert (tmp_path / "artifacts" / "r1" / "per_window.npz").is_file()
    with Store(tmp_path / "r.db") as fresh:
        assert fresh.completed(["r1"]) == set()  # the run will be redone; its artifact is rewritten atomically
        fresh.commit_run(_record())
        assert fresh.completed(["r1"]) == {"r1"}


def test_run_id_is_content_addressed():
    fp = {"model_id": "m", "source": "/a/b", "revision": "sha256:1", "n_params": 1, "dtype": "fp32",
          "model_type": "llama", "max_positions": 512}
    cfg = {"kind": "baseline", "seed": 0, "context_len": 64}
    assert run_id(cfg, fp) == run_id(dict(reversed(list(cfg.items()))), fp)  # key order is irrelevant
    assert run_id(cfg, fp) == run_id(cfg, {**fp, "source": "/elsewhere"})  # where the files live is irrelevant
    assert run_id(cfg, fp) != run_id({**cfg, "seed": 1}, fp)
    assert run_id(cfg, fp) != run_id(cfg, {**fp, "revision": "sha256:2"})


# ------------------------------------------------------------------------------- a real small study
@pytest.fixture(scope="module")
def tiny_dir(make_study_dir, python_docs):
    """The tiny Llama and a corpus of 12 python-docs documents next to it."""
    return make_study_dir("tiny", "\n\n".join(python_docs.documents[:12]))


def _study(tiny_dir, **changes):
    return parse_study({"name": "tiny", "models": [str(tiny_dir / "model")],
                        "datasets": [str(tiny_dir / "corpus.txt")], "context_lens": [32, 64], "seeds": [0, 1],
                        "max_eval_tokens": 256, "batch_tokens": 512, **changes})


@pytest.fixture(scope="module")
def tiny_db(tiny_dir, tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "tiny.db"
    summary = run_study(_study(tiny_dir), db)
    assert summary.ok and summary.completed == 4 and summary.skipped == 0
    return db


def test_study_rows_artifacts_and_headline_numbers(tiny_db):
    with Store(tiny_db) as store:
        frame = store.runs_frame("tiny")
        assert len(frame) == 4 and set(frame["status"]) == {"completed"}
        assert sorted(zip(frame["config.context_len"], frame["config.seed"])) == [(32, 0), (32, 1), (64, 0),
                                                                                  (64, 1)]
        for rid, ppl, tokens in zip(frame["run_id"], frame["perplexity"], frame["scored_tokens"]):
            arrays = store.load_arrays(rid)
            assert np.exp(arrays["nll"].sum() / arrays["n_scored"].sum()) == pytest.approx(ppl)
            assert arrays["n_scored"].sum() == tokens <= 256
        assert frame["provenance.git_sha"].notna().all()
        assert frame["model.revision"].str.startswith("content-sha256:").all()


def test_store_matches_esa_baseline_per_window(tiny_db, tiny_dir, tmp_path):
    model = tiny_dir / "model"
    assert main(["--no-progress", "baseline", "--model", str(model), "--datasets", str(tiny_dir / "corpus.txt"),
                 "--context-lens", "32", "--seeds", "1", "--max-eval-tokens", "256", "--batch-tokens", "512",
                 "--out-dir", str(tmp_path)]) == 0
    run_dir = tmp_path / model.name
    entry = json.loads((run_dir / "results.json").read_text())["entries"][0]
    reference = np.load(run_dir / entry["per_window_file"])
    with Store(tiny_db) as store:
        frame = store.runs_frame()
        rid = frame.loc[(frame["config.context_len"] == 32) & (frame["config.seed"] == 1), "run_id"].item()
        stored = store.load_arrays(rid)
    for key in ("nll", "n_scored", "n_correct", "window_index"):
        np.testing.assert_array_equal(stored[key], reference[key])


def test_rerun_skips_completed_runs_without_loading(tiny_db, tiny_dir, monkeypatch):
    forbid_model_loading(monkeypatch, "a completed study must not load its model again")
    summary = run_study(_study(tiny_dir), tiny_db)
    assert summary.skipped == 4 and summary.completed == 0 and summary.ok


def test_new_cells_run_and_shared_cells_are_reused(tiny_db, tiny_dir):
    summary = run_study(_study(tiny_dir, name="tiny-more", seeds=[1, 2]), tiny_db)
    assert summary.completed == 2 and summary.skipped == 2  # seed 1 cells come from study "tiny"
    with Store(tiny_db) as store:
        assert store.con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 6
        assert len(store.runs_frame("tiny-more")) == 4 and len(store.runs_frame("tiny")) == 4


def test_failed_runs_are_recorded_and_retried(tiny_dir, tmp_path):
    study = _study(tiny_dir, context_lens=[32, 4096], seeds=[0])  # the tiny model has 512 positions
    summary = run_study(study, tmp_path / "f.db")
    assert summary.completed == 1 and len(summary.failed) == 1 and "exceeds" in summary.failed[0][1]
    with Store(tmp_path / "f.db") as store:
        assert sorted(store.runs_frame()["status"]) == ["completed", "failed"]
    again = run_study(study, tmp_path / "f.db")
    assert again.skipped == 1 and len(again.failed) == 1


def test_export_csv_parquet_and_read_sql(tiny_db, tmp_path):
    assert export(tiny_db, tmp_path / "r.csv", study="tiny") == 4
    assert main(["results", str(tiny_db), "--study", "tiny", "--format", "parquet",
                 "--out", str(tmp_path / "r.parquet")]) == 0
    csv, pq = pd.read_csv(tmp_path / "r.csv"), pd.read_parquet(tmp_path / "r.parquet")
    assert len(csv) == len(pq) == 4 and {"run_id", "perplexity", "config.dataset", "model.revision"} <= set(pq)
    np.testing.assert_allclose(sorted(csv["perplexity"]), sorted(pq["perplexity"]))
    with sqlite3.connect(tiny_db) as con:
        view = pd.read_sql("SELECT * FROM results ORDER BY perplexity", con)
    view = view[view["run_id"].isin(pq["run_id"])]
    np.testing.assert_allclose(view["perplexity"], sorted(pq["perplexity"]))
    assert export(tiny_db, tmp_path / "all.csv") == len(pd.read_sql("SELECT run_id FROM runs",
                                                                     sqlite3.connect(tiny_db)))
    with pytest.raises(EsaError, match="no runs of study 'nope'"):
        export(tiny_db, tmp_path / "n.csv", study="nope")
    with pytest.raises(EsaError, match="unknown export format"):
        export(tiny_db, tmp_path / "n.xlsx")


def test_run_cli_end_to_end(tiny_dir, tmp_path, capsys):
    spec = _study(tiny_dir, name="cli", context_lens=[32], seeds=[3]).to_dict()
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(spec))))
    assert main(["run", str(tmp_path / "s.yaml"), "--db", str(tmp_path / "c.db")]) == 0
    out = capsys.readouterr().out
    assert "[1/1]" in out and "1 completed now" in out
    assert main(["run", str(tmp_path / "s.yaml"), "--db", str(tmp_path / "c.db")]) == 0
    assert "1 already done" in capsys.readouterr().out


def test_ray_executor_without_ray_says_how_to_install(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # make `import ray` fail even where Ray is installed
    with pytest.raises(EsaError, match=r"pip install 'esa\[cluster\]'"):
        run_study(_study(tiny_dir), tmp_path / "r.db", executor="ray")
    with pytest.raises(EsaError, match="Did you mean 'local'"):
        run_study(_study(tiny_dir), tmp_path / "r.db", executor="locl")


@pytest.mark.ray
def test_ray_executor_matches_local(tiny_dir, tiny_db, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                                       "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}})
    try:
        summary = run_study(_study(tiny_dir), tmp_path / "ray.db", executor="ray")
    finally:
        ray.shutdown()
    assert summary.ok and summary.completed == 4
    with Store(tiny_db) as a, Store(tmp_path / "ray.db") as b:
        local, remote = a.runs_frame("tiny").set_index("run_id"), b.runs_frame("tiny").set_index("run_id")
        assert set(local.index) == set(remote.index)
        for rid in local.index:
            for key in DETERMINISTIC:
                assert remote.loc[rid, key] == pytest.approx(local.loc[rid, key], rel=1e-6)
            np.testing.assert_allclose(b.load_arrays(rid)["nll"], a.load_arrays(rid)["nll"], rtol=1e-6)
