"""Dose-response and bit-scan runs through esa.executors.run_study on a tiny random Llama."""

import numpy as np
import pytest
import torch

from esa.executors import load_dependencies, resolved_config, run_key, run_study, summary_line
from esa.store import RunRecord, Store
from esa.study import expand, parse_study
from helpers.models import forbid_model_loading

SECTIONS = {
    "sensitivity": {"scorers": ["magnitude"], "k": 8},
    "dose_response": {"targets": [{"name": "top", "ranking": "magnitude"},
                                  {"name": "row", "spec": "rows:*.mlp.down_proj.weight:0"}],
                      "ks": [1, 4], "ops": [{"op": "scale", "values": [0.0, 1000.0]}], "trials": 2,
                      "collapse_ppl": 1e6},
    "bitscan": {"targets": [{"name": "top", "ranking": "magnitude"}], "top_n": 2, "bits": ["sign", "exponent_msb"],
                "max_flips": 2, "greedy_pool": 2, "collapse_ppl": 1e6},  # the random model's PPL is ≈ 5e4
}


@pytest.fixture(scope="module")
def tiny_dir(tiny_study_dir):
    return tiny_study_dir


def causal_study(tiny_dir, **changes):
    return parse_study({"name": "causal", "models": [str(tiny_dir / "model")],
                        "datasets": [str(tiny_dir / "corpus.txt")], "context_lens": [32], "seeds": [0],
                        "max_eval_tokens": 128, "batch_tokens": 1024, **SECTIONS, **changes})


@pytest.fixture(scope="module")
def causal_db(tiny_dir, tmp_path_factory):
    db = tmp_path_factory.mktemp("db") / "c.db"
    summary = run_study(causal_study(tiny_dir), db)
    assert summary.ok and summary.completed == summary.total == 1 + 1 + 3 + 1, summary
    return db


def _rows(db):
    with Store(db) as store:
        return store.runs_frame("causal").set_index("run_id")


def test_rows_and_artifacts(causal_db):
    frame = _rows(causal_db)
    assert frame["kind"].value_counts().to_dict() == {"dose_response": 3, "baseline": 1, "sensitivity": 1,
                                                      "bitscan": 1}
    with Store(causal_db) as store:
        for rid, row in frame[frame["kind"] == "dose_response"].iterrows():
            deps = [v for k, v in row.items() if k.startswith("config.depends_on.") and isinstance(v, str)]
            assert all(frame.loc[d, "kind"] == "sensitivity" for d in deps)
            assert len(deps) == (row["config.target"] == "top")
            arrays = store.load_arrays(rid)
            assert {"baseline_nll", "target_nll__0", "random_k_nll__1", "delta__target_factor_1000_0"} <= set(arrays)
            assert arrays["random_k_nll__0"].shape == (2, len(arrays["baseline_nll"]))  # (S, W)
            assert "/tmp" not in str(row["notes"]) and "esa-causal" not in str(row.to_dict())
        bits = frame[frame["kind"] == "bitscan"].iloc[0]
        arrays = store.load_arrays(bits.name)
        assert arrays["grid_mean_delta_nll"].shape == (2, 2) and arrays["flip_nll"].shape[0] == 4


def test_rerun_skips_everything_without_loading(causal_db, tiny_dir, monkeypatch):
    forbid_model_loading(monkeypatch)
    summary = run_study(causal_study(tiny_dir), causal_db)
    assert summary.skipped == summary.total == 6 and summary.completed == 0


def test_rows_equal_a_direct_protocol_call_and_weights_are_restored(causal_db, tiny_dir):
    from esa.kinds.bitscan import bitscan_config
    from esa.kinds.dose_response import dose_config
    from esa.models import ModelSpec, load_model
    from esa.perturb.protocols import bitscan_experiment, dose_experiment
    from esa.core.files import as_float

    lm = load_model(ModelSpec(str(tiny_dir / "model")))
    fp = lm.fingerprint.to_dict()
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    frame = _rows(causal_db)
    runs = [r for r in expand(causal_study(tiny_dir)) if r.kind in ("dose_response", "bitscan")]
    with Store(causal_db) as store:
        for run in runs:
            rid = run_key(run, fp)
            deps = resolved_config(run, fp).get("depends_on", {})
            ranking = str(store.artifact_dir(deps["ranking"]) / "ranking.parquet") if deps else None
            experiment, config = ((dose_experiment, dose_config) if run.kind == "dose_response"
                                  else (bitscan_experiment, bitscan_config))
            doc, arrays = experiment(lm, config(run, ranking))
            stored = store.load_arrays(rid)
            assert set(arrays) == set(stored)
            for key, value in arrays.items():
                np.testing.assert_array_equal(value, stored[key], err_msg=key)
            comps = ([r[a] for r in doc["rows"] for a in ("target", "random_k")] if run.kind == "dose_response"
                     else [{**c, "name": c["label"]} for c in doc["cells"]])
            assert len(comps) == (2 * 2 if run.kind == "dose_response" else 4)
            stats = ("mean_delta_nll", "ci_low", "ci_high", "ppl_perturbed", "collapsed") + \
                (("p_wilcoxon_holm", "p_ttest_bh", "ppl_ratio") if run.kind == "dose_response" else ())
            for c in comps:
                for stat in stats:
                    got = frame.loc[rid, f"comparisons.{c['name']}.{stat}"]
                    assert as_float(got) == pytest.approx(as_float(c[stat]), nan_ok=True), (run.label(), stat)
    for name, p in lm.model.named_parameters():
        assert torch.equal(p, before[name]), name  # bit-exact restore of every weight
    bits = frame[frame["kind"] == "bitscan"].iloc[0]
    collapsed = [k for k, v in bits.items() if k.endswith(".collapsed") and v is True]
    assert collapsed and bits["greedy.collapsed"]  # an exponent flip collapses the random model …
    assert any(np.isnan(as_float(bits[k.replace(".collapsed", ".ppl_perturbed")])) or
               as_float(bits[k.replace(".collapsed", ".ppl_perturbed")]) > 1e6 for k in collapsed)  # … and shows


def test_runners_restore_weights_and_summaries(causal_db, tiny_dir):
    """The study runners themselves (with rankings read back from the store) leave every weight unchanged."""
    from esa import kinds
    from esa.executors import RunContext
    from esa.models import ModelSpec, load_model

    lm = load_model(ModelSpec(str(tiny_dir / "model")))
    fp = lm.fingerprint.to_dict()
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    runs = [r for r in expand(causal_study(tiny_dir)) if r.kind in ("dose_response", "bitscan")][-2:]
    ctx = RunContext()
    with Store(causal_db) as store:
        ctx.rankings.update(load_dependencies(store, runs, fp, {}))
    for run in runs:
        ctx.depends_on = resolved_config(run, fp).get("depends_on", {})  # what the executor sets before a run
        metrics, _ = kinds.get(run.kind).execute(lm, run, ctx)
        line = summary_line(RunRecord("r", run.kind, {}, {}, {}, metrics, "completed", "a", "b"))
        assert ("largest target ΔNLL" in line) if run.kind == "dose_response" else ("worst single flip" in line)
    for name, p in lm.model.named_parameters():
        assert torch.equal(p, before[name]), name
