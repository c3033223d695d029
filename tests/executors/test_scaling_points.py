"""scaling_point runs through run_study: a 2-model ladder (the embedded SmolLM2-135M and a tiny random Llama
saved with the SmolLM2 tokenizer) with tiny budgets. The stored rows must be what esa.scaling.fits.measure_model
returns for the same model and protocol, the per-window arrays must be stored, and a rerun must skip."""

import json

import numpy as np
import pytest

from esa import kinds
from esa.executors import run_study
from esa.store import Store, canonical_json
from esa.study import expand, parse_study

pytestmark = pytest.mark.model  # the ladder runs the embedded SmolLM2

SCALING = {"control_seeds": [0], "calib_samples": 2, "n_boot": 200}  # 254 tokens = 2 windows of 128


@pytest.fixture(scope="module")
def ladder(tmp_path_factory, tiny_llama_dir):
    """(study, db) of the 2-model ladder, executed once."""
    path = tmp_path_factory.mktemp("ladder")
    study = parse_study({"name": "ladder", "models": ["smollm2-135m", str(tiny_llama_dir)],
                         "datasets": ["python-docs"], "context_lens": [128], "seeds": [0], "max_eval_tokens": 254,
                         "batch_tokens": 4096, "scaling": SCALING})
    summary = run_study(study, path / "s.db")
    assert summary.ok and summary.completed == summary.total == 4, summary  # 2 baselines + 2 scaling points
    return study, path / "s.db"


def _stored(db) -> dict[str, tuple[str, dict, list]]:
    """model name → (run id, metrics, artifacts) of the completed scaling points."""
    with Store(db) as store:
        rows = store.con.execute("SELECT run_id, config, metrics, artifacts FROM runs WHERE kind = 'scaling_point' "
                                 "AND status = 'completed'").fetchall()
    return {json.loads(c)["model"]["name"]: (rid, json.loads(m), json.loads(a)) for rid, c, m, a in rows}


def _without(d: dict, *keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def test_the_runner_is_registered():
    from esa.kinds.scaling_point import execute as execute_scaling_point

    assert kinds.get("scaling_point").execute is execute_scaling_point


def test_stored_rows_equal_the_direct_per_model_measurement(ladder, smol):
    from esa.models import load_model
    from esa.scaling.fits import measure_model

    study, db = ladder
    stored = _stored(db)
    points = [r for r in expand(study) if r.kind == "scaling_point"]
    assert set(stored) == {p.model.name for p in points}
    for point in points:
        lm = smol if point.model.name == "smollm2-135m" else load_model(point.model)
        row, doc, arrays = measure_model(lm, point.scaling_config())
        rid, metrics, artifacts = stored[point.model.name]
        assert canonical_json(_without(metrics, "perturbation", "wall_seconds")) == \
            canonical_json(_without(row, "wall_seconds"))
        with Store(db) as store:
            saved = store.load_arrays(rid)
        assert set(saved) == set(arrays) and "baseline_nll" in saved
        for key in arrays:
            np.testing.assert_array_equal(saved[key], arrays[key], err_msg=key)
        assert artifacts["per_window"].endswith("per_window.npz")
        if doc is None:
            assert metrics["perturbation"] is None and metrics["sw_delta_nll"] is None
        else:
            assert canonical_json(metrics["perturbation"]["comparisons"]) == canonical_json(doc["comparisons"])
            assert metrics["perturbation"]["targets"] == json.loads(canonical_json(doc["targets"]))


def test_the_ladder_has_a_real_super_weight_point_and_a_random_one(ladder):
    stored = _stored(ladder[1])
    smol = stored["smollm2-135m"][1]
    tiny = next(m for name, (_, m, _) in stored.items() if name != "smollm2-135m")
    assert smol["sw_count"] > 0 and smol["sw_delta_nll"] > smol["random_delta_nll"]
    assert "target_nll" in _arrays(ladder[1], stored["smollm2-135m"][0])
    assert tiny["n_layers"] == 2 and tiny["n_params"] < smol["n_params"]
    assert smol["bits_per_byte"] < tiny["bits_per_byte"]  # a random model is far worse


def _arrays(db, rid):
    with Store(db) as store:
        return store.load_arrays(rid)


def test_a_rerun_skips_every_completed_point(ladder):
    study, db = ladder
    before = _stored(db)
    summary = run_study(study, db)
    assert summary.ok and summary.completed == 0 and summary.skipped == summary.total == 4
    assert {k: v[0] for k, v in _stored(db).items()} == {k: v[0] for k, v in before.items()}


def test_a_point_whose_model_cannot_run_it_is_recorded_as_failed(ladder, tmp_path):
    tiny = ladder[0].models[1].name
    too_long = parse_study({"name": "too-long", "models": [tiny], "datasets": ["python-docs"],
                            "context_lens": [128], "max_eval_tokens": 254, "batch_tokens": 4096,
                            "scaling": {**SCALING, "context_len": 10**6}})
    summary = run_study(too_long, tmp_path / "f.db")
    (label, error), = summary.failed
    assert "scaling point" in label and "exceeds" in error
