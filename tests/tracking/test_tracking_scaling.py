"""``esa scaling --track mlflow`` on a fresh --out-dir (tracking tier: make test-tracking, offline): the MLflow
store lands beside the ladder's database only once the out-dir is accepted, so the ladder runs, logs each of its
runs, and a rerun resumes in the same directory."""

from __future__ import annotations

import pytest

mlflow = pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient  # noqa: E402

from esa.cli import main  # noqa: E402

pytestmark = pytest.mark.tracking


def test_scaling_track_mlflow_on_a_fresh_out_dir(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "ladder"
    argv = ["scaling", "--models", str(tiny_llama_dir), "--max-eval-tokens", "254", "--calib-samples", "2",
            "--control-seeds", "0", "--n-boot", "200", "--device", "cpu", "--out-dir", str(out), "--track", "mlflow"]
    assert main(argv) == 0, capsys.readouterr().err
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("esa").experiment_id])
    assert sorted(r.data.tags["esa_kind"] for r in runs) == ["baseline", "scaling_point"]
    assert main([*argv, "--overwrite"]) == 0  # the store beside the database does not make the directory foreign
