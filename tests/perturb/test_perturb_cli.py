"""`esa perturb`, `esa dose-response` and `esa bitscan` end to end on a tiny model directory; bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from esa.cli import main
from esa.store import Reader

DOWN = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_dir):
    return tiny_llama_dir


def _args(command, tiny_dir, corpus, out, *extra):
    return ["--no-progress", command, "--model", str(tiny_dir), "--dataset", corpus, "--context-len", "32",
            "--max-eval-tokens", "186", "--n-boot", "300", "--collapse-ppl", "1e12", "--out-dir", str(out), *extra]


def test_perturb_cli_writes_results_resumes_and_overwrites(tmp_path, tiny_dir, corpus, capsys):
    argv = _args("perturb", tiny_dir, corpus, tmp_path / "run", "--targets", f"rows:{DOWN}:2", "--op",
                 "scale:factor=4", "--controls", "random_k", "--control-seeds", "0", "1")
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "target vs baseline" in out and "target vs random_k" in out and "separation" in out
    doc = json.loads((tmp_path / "run" / "perturb.json").read_text())
    assert doc["schema"] == "esa.perturb/1" and doc["config"]["control_seeds"] == [0, 1]
    assert doc["config"]["data"]["context_len"] == 32 and doc["data"]["n_windows"] == 6
    assert [a["n_elements"] for a in doc["arms"]] == [128, 128]
    assert doc["model"]["model_type"] == "llama" and doc["provenance"]["libraries"]["torch"]
    arrays = np.load(tmp_path / "run" / "perturb.npz")
    assert arrays["random_k_nll_per_seed"].shape == (2, 6)
    assert (tmp_path / "run" / "perturb.png").stat().st_size > 0

    assert main(argv) == 0  # a rerun resumes from the database: nothing is computed again, same numbers
    assert "all 1 run(s) already completed" in capsys.readouterr().out
    again = json.loads((tmp_path / "run" / "perturb.json").read_text())
    assert again["comparisons"] == doc["comparisons"] and again["run_id"] == doc["run_id"]
    assert main([*argv, "--overwrite", "--op", "zero"]) == 0  # a fresh database
    assert json.loads((tmp_path / "run" / "perturb.json").read_text())["config"]["op"] == "zero"
    with Reader(tmp_path / "run" / "esa.db") as reader:
        assert [r.config["op"] for r in reader.runs()] == ["zero"]


def test_dose_response_and_bitscan_cli(tmp_path, tiny_dir, corpus, capsys):
    assert main(_args("dose-response", tiny_dir, corpus, tmp_path / "dose", "--targets", f"cols:{DOWN}:0",
                      "--op", "scale", "--values", "0", "1", "2", "--control-seeds", "0")) == 0
    doc = json.loads((tmp_path / "dose" / "dose_response.json").read_text())
    assert [r["value"] for r in doc["rows"]] == [0, 1, 2] and doc["rows"][1]["target"]["mean_delta_nll"] == 0.0
    assert (tmp_path / "dose" / "dose_response.png").stat().st_size > 0
    assert "target @ factor=2" in capsys.readouterr().out

    assert main(_args("bitscan", tiny_dir, corpus, tmp_path / "bits", "--targets", f"{DOWN}[1,2];{DOWN}[3,4]",
                      "--top-n", "2", "--bits", "sign", "30", "--max-flips", "1")) == 0
    doc = json.loads((tmp_path / "bits" / "bitscan.json").read_text())
    assert len(doc["cells"]) == 4 and [b["position"] for b in doc["bits"]] == [31, 30]
    assert np.load(tmp_path / "bits" / "bitscan.npz")["grid_mean_delta_nll"].shape == (2, 2)
    printed = capsys.readouterr().out
    assert "single-flip" in printed and "no collapse within 1" in printed


@pytest.mark.parametrize("command, extra, message", [
    ("perturb", ["--op", "zerro"], "unknown perturbation op 'zerro'"),
    ("perturb", ["--controls", "random_k,top_k"], "unknown control 'top_k'"),
    ("perturb", ["--controls", "bottom_k"], "control bottom_k needs a ranking"),
    ("perturb", ["--targets", "superweigths", "--controls", "random_k"], "Did you mean 'superweights'"),
    ("perturb", ["--targets", "model.layers.7.mlp.down_proj.weight[0,0]", "--controls", "random_k"],
     "has no parameter"),
    ("dose-response", ["--op", "sign_flip"], "no dose parameter"),
    ("dose-response", ["--op", "gauss_noise:sigmaa=1", "--values", "0.1"], "parameter of op 'gauss_noise'"),
    ("bitscan", ["--bits", "exponent_top"], "cannot read bit 'exponent_top'"),
    ("bitscan", ["--top-n", "0"], "top_n must be ≥ 1, got 0"),
])
def test_cli_bad_input_is_one_line(tmp_path, tiny_dir, corpus, capsys, command, extra, message):
    targets = [] if "--targets" in extra else ["--targets", f"{DOWN}[0,0]"]
    assert main(_args(command, tiny_dir, corpus, tmp_path / "x", *targets, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("esa: error:") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_cli_refuses_to_replace_a_foreign_directory(tmp_path, tiny_dir, corpus, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    argv = _args("perturb", tiny_dir, corpus, tmp_path / "mine", "--targets", f"{DOWN}[0,0]", "--controls",
                 "random_k", "--overwrite")
    assert main(argv) == 2
    assert "holds no esa perturb results" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
