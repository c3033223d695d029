"""A ranking file remembers the model it was computed on, and the perturbation protocols refuse another model's.

write_ranking stores the fingerprint (parquet metadata ``esa.model``; ``<stem>.meta.json`` beside the CSV);
``topk:<ranking>:<k>`` targets and ``--ranking`` (bottom_k) compare revision, n_params and model_type with the
loaded model. Rankings without a fingerprint (older files) are used with a warning.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from esa.core.errors import EsaError
from esa.models import Fingerprint
from esa.perturb.protocols import EvalConfig, PerturbConfig, perturb_experiment
from esa.perturb.targets import from_ranking
from esa.sensitivity.ranking import COLUMNS, meta_path, read_ranking, write_ranking
from esa.models.tiny import tiny_model
from helpers.models import tiny_loaded

DOWN = "model.layers.1.mlp.down_proj.weight"  # tiny Llama: (out 64, in 128)


@pytest.fixture(scope="module")
def lm(tokenizer):
    return tiny_loaded(tokenizer, seed=5)


@pytest.fixture(scope="module")
def table(lm):
    """A magnitude ranking (score = |W|) of one tensor, in the ranking-table format of esa sensitivity."""
    w = lm.model.get_parameter(DOWN).detach()
    rows, cols = np.unravel_index(np.arange(w.numel()), tuple(w.shape))
    return pd.DataFrame({"param": DOWN, "layer": pd.array([1] * w.numel(), dtype="Int64"), "role": "mlp_down",
                         "row": rows, "col": pd.array(cols, dtype="Int64"),
                         "score": w.abs().reshape(-1).numpy().astype(np.float64),
                         "weight": w.reshape(-1).numpy().astype(np.float64),
                         "rank": np.arange(1, w.numel() + 1)})[COLUMNS]


@pytest.fixture(scope="module")
def data(corpus):
    return EvalConfig(dataset=corpus, context_len=32, max_eval_tokens=31 * 4, seed=0, n_boot=200,
                      collapse_ppl=1e12)


def _no_attrs(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    out.attrs = {}
    return out


def _other(lm, **changes) -> dict:
    return {**lm.fingerprint.to_dict(), **changes}


def test_write_ranking_stores_fingerprint_in_parquet_and_sidecar(lm, table, tmp_path):
    fp = lm.fingerprint.to_dict()
    paths = write_ranking(table, tmp_path / "ranking", fp)
    assert [p.name for p in paths] == ["ranking.parquet", "ranking.csv", "ranking.meta.json"]
    assert json.loads(pq.read_schema(paths[0]).metadata[b"esa.model"]) == fp
    assert json.loads(paths[2].read_text()) == {"model": fp}
    for path in paths[:2]:
        back = read_ranking(path)
        assert back.attrs["model"] == fp
        pd.testing.assert_frame_equal(back, table, check_dtype=False)


def test_old_rankings_without_fingerprint_still_read(table, tmp_path):
    paths = write_ranking(table, tmp_path / "old")
    assert len(paths) == 2 and not meta_path(paths[1]).exists()
    for path in paths:
        back = read_ranking(path)
        assert back.attrs["model"] is None and len(back) == len(table)


@pytest.mark.parametrize("changes", [{"revision": "sha256:abc"}, {"n_params": 134_515_008},
                                     {"model_type": "gpt_neox"}])
@pytest.mark.parametrize("how", ["topk", "ranking"])
def test_ranking_of_another_model_is_refused(lm, table, data, tmp_path, changes, how):
    stored = _other(lm, model_id="smollm2-135m", **changes)
    path = write_ranking(table, tmp_path / "r", stored)[0 if how == "topk" else 1]
    cfg = (PerturbConfig(targets=f"topk:{path}:3", controls=(), data=data) if how == "topk" else
           PerturbConfig(targets=f"{DOWN}[0,0]", controls=("bottom_k",), ranking=str(path), data=data))
    with pytest.raises(EsaError) as err:
        perturb_experiment(lm, cfg)
    message = str(err.value)
    assert "\n" not in message and "smollm2-135m" in message and "tiny-llama" in message
    assert "not on the loaded model" in message


def test_matching_ranking_runs_and_dtype_may_differ(lm, table, data, tmp_path):
    """Same revision, size and type but another dtype (the same weights in bf16) → accepted, no warning."""
    path = write_ranking(table, tmp_path / "r", _other(lm, dtype="bf16"), floor=table)[0]
    cfg = PerturbConfig(targets=f"topk:{path}:3", controls=("random_k", "bottom_k"), control_seeds=(0,),
                        data=data)
    doc, _ = perturb_experiment(lm, cfg)
    assert doc["targets"]["kind"] == "topk" and doc["arms"][0]["n_elements"] == 3
    assert not any("fingerprint" in n for n in doc["notes"])


def test_ranking_without_fingerprint_warns_and_proceeds(lm, table, data, tmp_path, caplog):
    path = write_ranking(table, tmp_path / "r")[1]
    cfg = PerturbConfig(targets=f"topk:{path}:2", controls=(), data=data)
    with caplog.at_level(logging.WARNING, logger="esa.perturb.protocols.choose"):
        doc, _ = perturb_experiment(lm, cfg)
    assert any("carries no model fingerprint" in r.getMessage() for r in caplog.records)
    assert any("carries no model fingerprint" in n for n in doc["notes"])
    assert doc["arms"][0]["n_elements"] == 2


def test_from_ranking_checks_size_and_type_of_a_bare_module(lm, table, tmp_path):
    path = write_ranking(table, tmp_path / "r", _other(lm, n_params=lm.fingerprint.n_params + 1))[0]
    with pytest.raises(EsaError, match="rank this model"):
        from_ranking(lm.model, read_ranking(path), 3)
    same = write_ranking(table, tmp_path / "s", _other(lm, revision="another"))[0]
    assert from_ranking(lm.model, read_ranking(same), 3).n_elements == 3  # revision: checked by the protocols
    assert from_ranking(lm.model, _no_attrs(table), 3).n_elements == 3  # hand-made table: no fingerprint


def test_fingerprint_fields_are_the_ones_compared():
    """The compared keys exist in the Fingerprint written by load_model (a rename would silently pass)."""
    from esa.sensitivity.ranking import MATCH_KEYS

    fields = Fingerprint("m", "s", "r", 1, "fp32", "llama", None).to_dict()
    assert set(MATCH_KEYS) <= set(fields) and "dtype" not in MATCH_KEYS


def test_esa_sensitivity_ranking_fits_its_model_and_is_refused_by_another(tmp_path, tokenizer, corpus, data, smol):
    """End to end: `esa sensitivity` writes the fingerprint; the same model accepts it, SmolLM2 refuses it."""
    from esa.cli import main
    from esa.models import ModelSpec, load_model

    tiny_dir = tmp_path / "tiny"
    tiny_model("llama", seed=0).save_pretrained(tiny_dir)
    tokenizer.save_pretrained(tiny_dir)
    out = tmp_path / "sens"
    assert main(["--no-progress", "sensitivity", "--model", str(tiny_dir), "--calib-dataset", corpus,
                 "--max-samples", "2", "--context-len", "32", "--batch-size", "2", "--scorer", "grad_x_weight",
                 "--k", "20", "--seeds", "0", "--out-dir", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for name in ("ranking.parquet", "ranking.csv", "ranking_seed0.parquet", "ranking_seed0.csv"):
        assert read_ranking(out / name).attrs["model"] == manifest["model"], name
    assert "ranking.meta.json" in manifest["files"] and "ranking_seed0.meta.json" in manifest["files"]

    cfg = PerturbConfig(targets=f"topk:{out / 'ranking.parquet'}:3", controls=(), data=data)
    doc, _ = perturb_experiment(load_model(ModelSpec(str(tiny_dir), device="cpu")), cfg)
    assert doc["arms"][0]["n_elements"] == 3 and not any("fingerprint" in n for n in doc["notes"])
    with pytest.raises(EsaError, match=f"computed on {tiny_dir}.*loaded model smollm2-135m"):
        perturb_experiment(smol, cfg)
