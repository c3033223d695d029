"""One run split across 2 Ray replicas of the embedded SmolLM2 (esa.core.parallel through the Ray executor):
the stored per-window, per-item and per-trial arrays equal a single process's bit for bit, and killing a replica
mid-run still ends with the same results and one row per run. ``make test-ray``."""

from pathlib import Path

import numpy as np
import pytest
import torch

from esa.executors import run_study
from esa.store import Store
from esa.study import parse_study

pytestmark = pytest.mark.ray
FIX = Path(__file__).resolve().parents[1] / "evals" / "fixtures"
PIQA = {"tasks": ["piqa"], "task_data": {"piqa": str(FIX / "piqa.jsonl")}}
STUDY = {"name": "dp", "models": ["smollm2-135m"], "datasets": ["python-docs"], "context_lens": [128], "seeds": [0],
         "max_eval_tokens": 1024, "batch_tokens": 256,
         "sensitivity": {"scorers": ["magnitude"], "k": 8},
         "zeroshot": {**PIQA, "limit": 12},
         "perturbation": {"targets": [{"name": "top", "ranking": "magnitude", "k": 4}], "ops": [{"op": "zero"}],
                          "controls": ["random_k"], "trials": 2, **PIQA, "task_limit": 6},
         "bitscan": {"targets": [{"name": "top", "ranking": "magnitude", "k": 2}], "top_n": 2,
                     "bits": ["sign", "exponent_msb"], "max_flips": 2, "greedy_pool": 2}}
KINDS = {"baseline", "sensitivity", "zeroshot", "perturbation", "bitscan"}


@pytest.fixture(scope="module")
def ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The study in this process on one thread (as each replica runs): {run id: (kind, arrays)}."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        db = tmp_path_factory.mktemp("single") / "s.db"
        assert run_study(parse_study(STUDY), db).ok
    finally:
        torch.set_num_threads(threads)
    return _stored(db)


def _stored(db) -> dict:
    with Store(db) as store:
        frame = store.runs_frame("dp")
        assert frame["run_id"].is_unique and set(frame["kind"]) == KINDS
        assert store.con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == len(frame)  # no duplicate rows
        return {rid: (kind, store.load_arrays(rid)) for rid, kind in zip(frame["run_id"], frame["kind"])}


def _assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for rid, (kind, arrays) in want.items():
        assert set(got[rid][1]) == set(arrays), kind
        for key, value in arrays.items():
            np.testing.assert_array_equal(got[rid][1][key], value, err_msg=f"{kind} {key}")


def test_two_replicas_store_what_one_process_stores(ray, single, tmp_path):
    db, events = tmp_path / "dp.db", []
    summary = run_study(parse_study(STUDY), db, executor="ray", replicas=2,
                        on_event=lambda kind, **info: events.append((kind, info.get("label"))))
    assert summary.ok and summary.completed == len(single), summary
    started, finished = ([label for kind, label in events if kind == k] for k in ("start", "run"))
    assert started == finished and len(started) == len(single)  # each run announced once, in order …
    assert all(events.index(("start", x)) < events.index(("run", x)) for x in started)  # … before it ends
    _assert_same(_stored(db), single)
    with Store(db) as store:
        frame = store.runs_frame("dp").set_index("run_id")
    shared = frame[frame["kind"] != "sensitivity"]
    assert (shared["provenance.data_parallel.replicas"] == 2).all()
    units, computed = shared["provenance.data_parallel.units"], shared["provenance.data_parallel.computed"]
    assert (units >= 2).all() and ((computed > 0) & (computed < units)).all()  # each replica did a share


def test_a_replica_killed_mid_run_leaves_the_same_results_and_no_duplicates(ray, single, tmp_path):
    db, actors, killed = tmp_path / "kill.db", [], []

    def on_event(kind, **info):
        if kind == "replicas":
            actors.extend(info["actors"])
        if kind == "run" and not killed:  # the next run is in flight on both replicas: kill one of them
            killed.append(info["label"])
            ray.kill(actors[1], no_restart=True)

    summary = run_study(parse_study(STUDY), db, executor="ray", replicas=2, on_event=on_event)
    assert killed and summary.ok and summary.completed == len(single), summary
    _assert_same(_stored(db), single)
    with Store(db) as store:
        frame = store.runs_frame("dp")
    assert frame["provenance.data_parallel.taken_over"].fillna(0).sum() > 0  # the survivor did the lost share
