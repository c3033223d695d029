"""Study sensitivity and perturbation sections: expansion, dependencies, run ids, execution and resume."""

import json

import numpy as np
import pytest

from esa.core.errors import EsaError
from esa import kinds
from esa.executors import plan, resolved_config, run_key, run_study
from esa.perturb.ops import make_op, parse_op
from esa.sensitivity.ranking import floor_path, read_ranking
from esa.store import Store
from esa.study import expand, parse_study
from esa.kinds.perturbation import op_spec
from helpers.models import forbid_model_loading

SECTIONS = {
    "sensitivity": {"scorers": ["magnitude", "grad_x_weight"], "k": 16, "calibration_tokens": 64},
    "perturbation": {"targets": [{"name": "top", "ranking": "grad_x_weight", "k": 4},
                                 {"name": "low", "ranking": "magnitude", "k": 4, "bottom": True},
                                 {"name": "row", "spec": "rows:*.mlp.down_proj.weight:0"}],
                     "ops": [{"op": "scale", "grid": {"factor": 10.0}}],
                     "controls": ["random_k", "bottom_k"], "trials": 2},
}
FP = {"model_id": "m", "revision": "sha256:1", "source": "/here"}


@pytest.fixture(scope="module")
def tiny_dir(tiny_study_dir):
    return tiny_study_dir


def _study(tiny_dir, **changes):
    return parse_study({"name": "sections", "models": [str(tiny_dir / "model")],
                        "datasets": [str(tiny_dir / "corpus.txt")], "context_lens": [32], "seeds": [0],
                        "max_eval_tokens": 128, "batch_tokens": 1024, **SECTIONS, **changes})


def _pure(**changes):
    return parse_study({"name": "p", "models": ["smollm2-135m"], "datasets": ["python-docs"], "context_lens": [64],
                        "seeds": [0, 1], "max_eval_tokens": 256, **SECTIONS, **changes})


@pytest.fixture(scope="module")
def sections_db(tiny_dir, tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "s.db"
    summary = run_study(_study(tiny_dir), db)
    assert summary.ok and summary.completed == summary.total == 7, summary
    return db


# ------------------------------------------------------------------------------------------ expansion (no model)
def test_expansion_order_seeds_directions_and_controls():
    runs = expand(_pure())
    kinds = [r.kind for r in runs]
    assert kinds == sorted(kinds, key=["baseline", "sensitivity", "perturbation"].index)  # dependencies first
    sens = [(r.scorer, r.bottom, r.seed) for r in runs if r.kind == "sensitivity"]
    # every scorer's top ranking; magnitude needs no data: one seed; a bottom ranking only because a bottom
    # target depends on it (added by the engine after the section's own runs; bottom_k uses the floor table)
    assert sens == [("magnitude", False, 0), ("grad_x_weight", False, 0), ("grad_x_weight", False, 1),
                    ("magnitude", True, 0)]
    pert = {(r.target, r.seed): r for r in runs if r.kind == "perturbation"}
    assert len(pert) == 6
    top1 = pert[("top", 1)]
    assert top1.controls == ("random_k", "bottom_k") and top1.control_seeds == (0, 1)
    assert (top1.ranking_run.seed, top1.ranking_run.bottom) == (1, False)
    assert top1.dependencies() == {"ranking": top1.ranking_run}
    low1 = pert[("low", 1)]
    assert low1.controls == ("random_k",) and low1.ranking_run.bottom and low1.ranking_run.seed == 0
    assert pert[("row", 0)].controls == ("random_k",) and not pert[("row", 0)].dependencies()
    assert all(r.dependencies()[k] in runs for r in pert.values() for k in r.dependencies())


def test_perturbation_run_id_includes_its_dependency():
    base = next(r for r in expand(_pure()) if r.kind == "perturbation" and r.target == "top")
    other = next(r for r in expand(_pure(sensitivity={**SECTIONS["sensitivity"], "calibration_tokens": 128}))
                 if r.kind == "perturbation" and r.target == "top" and r.seed == base.seed)
    assert base.config() == other.config()  # the run's own settings are identical …
    cfg = resolved_config(base, FP)
    assert cfg["depends_on"]["ranking"] == run_key(base.ranking_run, FP)
    assert run_key(base, FP) != run_key(other, FP)  # … but its ranking is not, so neither is its id


@pytest.mark.parametrize("name, point", [("scale", {"factor": 0.5}), ("zero", {}), ("bit_flip", {"bit": "sign"}),
                                         ("gauss_noise", {"sigma": 0.01, "relative_to": "tensor_std"}),
                                         ("random_bit_flip", {"prob": 0.01, "bits": [23, 30]})])
def test_op_spec_round_trips_through_parse_op(name, point):
    assert parse_op(op_spec(name, point)) == make_op(name, **point)


@pytest.mark.parametrize("change, wanted", [
    ({"sensitivity": None}, "needs a sensitivity: section"),
    ({"perturbation": {**SECTIONS["perturbation"], "targets": [{"name": "t", "ranking": "magnitude", "k": 17}]}},
     "1 ≤ k ≤ sensitivity.k"),
    ({"sensitivity": {**SECTIONS["sensitivity"], "mode": "per_tensor"}}, "Did you mean 'per_layer'"),
    ({"perturbation": {**SECTIONS["perturbation"], "targets": [{"name": "a", "spec": "tensor:x"}] * 2}},
     "duplicate target names"),
])
def test_section_mistakes_are_refused(change, wanted):
    with pytest.raises(EsaError, match=wanted):
        _pure(**change)


def test_plan_counts_backward_and_trial_passes():
    study = _pure(models=["pythia-70m"])
    rows = plan(study, measure=False)
    sens = next(r for r in rows if r.run.kind == "sensitivity")
    pert = next(r for r in rows if r.run.kind == "perturbation" and r.run.target == "row")
    assert sens.run.scorer == "magnitude" and sens.tokens == 0 and sens.seconds == 0  # reads no data
    grad = next(r for r in rows if r.run.kind == "sensitivity" and r.run.scorer == "grad_x_weight")
    assert grad.tokens == grad.run.max_samples * 63 and grad.passes > 1 and grad.seconds > 0
    top = next(r for r in rows if r.run.kind == "perturbation" and r.run.target == "top")
    assert top.tokens == 256 and top.passes == 1 + 1 + 2 + 1  # baseline, target, 2 random_k draws, bottom_k
    assert pert.passes == 1 + 1 + 2  # a glob target gets no bottom_k control
    assert top.seconds == pytest.approx(pert.seconds * top.passes / pert.passes)


# ---------------------------------------------------------------------------------------- execution (tiny model)
def test_rows_artifacts_and_dependencies(sections_db, tiny_dir):
    with Store(sections_db) as store:
        frame = store.runs_frame("sections").set_index("run_id")
        assert (frame["status"] == "completed").all()
        assert frame["kind"].value_counts().to_dict() == {"sensitivity": 3, "perturbation": 3, "baseline": 1}
        for rid, row in frame[frame["kind"] == "sensitivity"].iterrows():
            table = read_ranking(sections_db.parent / row["ranking_file"])
            assert len(table) == 16 and row["topk_rows"] == 16
            assert np.isfinite(float(row["perplexity"])) == (row["config.scorer"] != "magnitude")  # no data: NaN
            assert table.attrs["model"]["model_id"] == row["model.model_id"]  # the ranking names its model
            arrays = store.load_arrays(rid)
            assert np.array_equal(arrays["score"], table["score"].to_numpy())
            assert list(arrays["param"]) == list(table["param"])
            order = np.sort(table["score"].to_numpy())
            assert np.array_equal(table["score"].to_numpy(), order if row["config.bottom"] else order[::-1])
            floor_file = floor_path(sections_db.parent / row["ranking_file"])
            assert floor_file.is_file() != bool(row["config.bottom"])  # top rankings keep a per-tensor floor
            if floor_file.is_file():  # as many of each tensor's lowest scores as it has in the top k
                floor = read_ranking(floor_file)
                assert floor["param"].value_counts().to_dict() == table["param"].value_counts().to_dict()
                for name, part in floor.groupby("param"):
                    assert part["score"].max() <= table.loc[table["param"] == name, "score"].min()
        pert = frame[frame["kind"] == "perturbation"]
        for rid, row in pert.iterrows():
            deps = [v for k, v in row.items() if k.startswith("config.depends_on.") and isinstance(v, str)]
            assert all(d in frame.index and frame.loc[d, "kind"] == "sensitivity" for d in deps)
            arrays = store.load_arrays(rid)
            assert {"baseline_nll", "target_nll", "random_k_nll", "delta__target_vs_baseline"} <= set(arrays)
            assert row["perplexity"] == pytest.approx(row["comparisons.target vs baseline.ppl_perturbed"])
        top = pert[pert["config.target"] == "top"].iloc[0]
        assert "comparisons.target vs random_k.p_wilcoxon_holm" in top.index
        assert "bottom_k" in str(top["arms"]) and "/tmp" not in str(top["arms"])
        arms = {a["name"]: a for a in json.loads(top["arms"])}
        assert arms["bottom_k"]["tensors"] == arms["target"]["tensors"]  # matched per tensor in count
        assert "fingerprint" not in str(top["notes"])  # the protocol could check the ranking's model


def test_rerun_skips_everything_without_loading(sections_db, tiny_dir, monkeypatch):
    forbid_model_loading(monkeypatch)
    summary = run_study(_study(tiny_dir), sections_db)
    assert summary.skipped == summary.total == 7 and summary.completed == 0


def test_perturbation_equals_perturb_experiment(sections_db, tiny_dir):
    from esa.kinds.perturbation import perturb_config
    from esa.models import ModelSpec, load_model
    from esa.perturb.protocols import perturb_experiment

    lm = load_model(ModelSpec(str(tiny_dir / "model")))
    fp = lm.fingerprint.to_dict()
    run = next(r for r in expand(_study(tiny_dir)) if r.kind == "perturbation" and r.target == "top")
    with Store(sections_db) as store:
        rid = run_key(run, fp)
        deps = resolved_config(run, fp)["depends_on"]
        ranking_file = str(store.artifact_dir(deps["ranking"]) / "ranking.parquet")
        stored = store.load_arrays(rid)
        metrics = store.runs_frame("sections").set_index("run_id").loc[rid]
    doc, arrays = perturb_experiment(lm, perturb_config(run, ranking_file))
    assert set(arrays) == set(stored)
    for key, value in arrays.items():
        np.testing.assert_array_equal(value, stored[key], err_msg=key)
    for c in doc["comparisons"]:
        for stat in ("mean_delta_nll", "ci_low", "ci_high", "p_wilcoxon", "p_ttest_bh", "ppl_ratio"):
            assert metrics[f"comparisons.{c['name']}.{stat}"] == pytest.approx(c[stat], nan_ok=True), (c["name"], stat)


def test_dependency_from_an_earlier_invocation_and_failed_dependency(tiny_dir, tmp_path):
    db = tmp_path / "r.db"
    first = run_study(_study(tiny_dir, name="sens-only", perturbation=None, sensitivity={
        **SECTIONS["sensitivity"], "scorers": ["grad_x_weight"]}), db)
    assert first.ok and first.completed == 2  # baseline + the top ranking (no bottom needed yet)
    top_only = {**SECTIONS["perturbation"], "targets": SECTIONS["perturbation"]["targets"][:1],
                "controls": ["random_k"]}
    second = run_study(_study(tiny_dir, name="pert", perturbation=top_only,
                              sensitivity={**SECTIONS["sensitivity"], "scorers": ["grad_x_weight"]}), db)
    assert second.ok and (second.skipped, second.completed) == (2, 1)  # the ranking came from the store
    # a sensitivity run that fails (context beyond the tiny model's 512 positions) fails its perturbations too
    third = run_study(_study(tiny_dir, name="bad", perturbation=top_only, sensitivity={
        **SECTIONS["sensitivity"], "scorers": ["grad_x_weight"], "context_len": 4096}), db)
    errors = dict(third.failed)
    assert len(errors) == 2
    assert any("has not completed" in e for e in errors.values())
    assert any("exceeds" in e for e in errors.values())


def test_runner_registry_covers_every_run_kind():
    assert {r.kind for r in expand(_pure())} <= set(kinds.names())


def test_cli_plan_and_run_show_section_runs(tiny_dir, tmp_path, capsys):
    import yaml

    from esa.cli import main

    data = {"name": "cli", "models": [str(tiny_dir / "model")], "datasets": [str(tiny_dir / "corpus.txt")],
            "context_lens": [32], "seeds": [0], "max_eval_tokens": 64, "batch_tokens": 1024,
            "sensitivity": {"scorers": ["magnitude"], "k": 8},
            "perturbation": {"targets": [{"name": "top", "ranking": "magnitude", "k": 2}], "ops": [{"op": "zero"}]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    assert main(["plan", str(tmp_path / "s.yaml"), "--no-measure"]) == 0
    out = capsys.readouterr().out
    assert "3 run(s)" in out and "sensitivity" in out and "perturbation" in out and "not executed" not in out
    assert main(["run", str(tmp_path / "s.yaml"), "--db", str(tmp_path / "r.db")]) == 0
    out = capsys.readouterr().out
    assert "3 completed now" in out and "sensitivity magnitude top-8" in out and "perturb top zero" in out


def test_summary_line_per_kind(sections_db):
    from esa.executors import summary_line
    from esa.store import RunRecord

    with Store(sections_db) as store:
        rows = store.con.execute("SELECT kind, metrics FROM runs").fetchall()
    import json

    lines = {kind: summary_line(RunRecord("r", kind, {}, {}, {}, json.loads(m), "completed", "a", "b"))
             for kind, m in rows}
    assert lines["baseline"].startswith("ppl ") and "weights in" in lines["sensitivity"]
    assert lines["perturbation"].startswith("ΔNLL ") and "→" in lines["perturbation"]
    assert summary_line(RunRecord("r", "perturbation", {}, {}, {}, {}, "failed", "a", "b", "boom")) == "FAILED: boom"
