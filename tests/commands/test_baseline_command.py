"""`esa baseline` as a one-off study: its files carry the numbers the pre-engine command computed
(tests/golden/baseline_command.json), a rerun resumes, --overwrite starts a fresh database, bad input is one line."""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from esa.cli import main
from helpers.models import forbid_model_loading

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((ROOT / "tests" / "golden" / "baseline_command.json").read_text())
TIMING = {"tokens_per_second", "forward_seconds"}  # wall-clock numbers: not golden


def _argv(key: str, out: Path, **paths: Path) -> list[str]:
    """The golden command line with its placeholders (TINY0, TINY1, CORPUS, OUT/…) replaced."""
    subs = {"OUT/out_smol": str(out), "OUT/out_tiny": str(out), **{k: str(v) for k, v in paths.items()}}
    argv = []
    for a in GOLDEN["argv"][key]:
        for placeholder, value in subs.items():
            a = a.replace(placeholder, value)
        argv.append(a.replace("tests/evals/", str(ROOT / "tests" / "evals") + "/"))
    return argv


def _summary(run_dir: Path, corpus: str | None = None) -> dict:
    """What the golden file keeps of a run directory (see its "about"); the path ``corpus`` written CORPUS."""
    text = (run_dir / "results.json").read_text()
    res = json.loads(text.replace(json.dumps(corpus)[1:-1], "CORPUS") if corpus else text)
    entries = []
    for e in res["entries"]:
        a = np.load(run_dir / e["per_window_file"])
        entries.append({
            "context_len": e["context_len"], "seed": e["seed"], "long_context": e["long_context"],
            "method": e["method"], "stride": e["stride"], "bos": e["bos"], "seed_invariant": e["seed_invariant"],
            "windows_available": e["windows_available"],
            "metrics": {k: v for k, v in e["metrics"].items() if k not in TIMING},
            "sanity": e["sanity"], "warnings": e["warnings"],
            "nll_sum": float(a["nll"].sum()), "n_scored_sum": int(a["n_scored"].sum()),
            "n_correct_sum": int(a["n_correct"].sum()), "window_index": a["window_index"].tolist()})
    zs = {t: {"metrics": z["metrics"], "config": {k: v for k, v in z["config"].items() if k != "source"},
              "correct": [json.loads(line)["correct"] for line in (run_dir / z["items_file"]).read_text().splitlines()]}
          for t, z in res["zeroshot"].items()}
    return {"n_params": res["model"]["n_params"], "entries": entries, "aggregates": res["aggregates"],
            "zeroshot": zs, "warnings": res["warnings"]}


def assert_matches(got, want, where: str = "") -> None:
    """Equal structure; floats to rtol 1e-6 (NaN equals NaN), everything else exactly."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), (where, sorted(got), sorted(want))
        for k in want:
            assert_matches(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (where, got, want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_matches(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool):
        assert isinstance(got, (int, float)), (where, got)
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-6), (where, got, want)
    else:
        assert got == want and type(got) is type(want), (where, got, want)


def _runs(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return sorted(con.execute("SELECT run_id, kind, status, started_at FROM runs").fetchall())


# ------------------------------------------------------------------------- tiny random models (unit tier)
@pytest.fixture(scope="module")
def tiny_pair(tiny_llama_dir, tmp_path_factory):
    """The session's tiny Llama (seed 0) and a second one (seed 1), both with the SmolLM2 tokenizer."""
    from transformers import AutoTokenizer

    from esa.models.tiny import tiny_model

    second = tmp_path_factory.mktemp("tiny1")
    tiny_model("llama", seed=1).save_pretrained(second)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(second)
    return tiny_llama_dir, second


@pytest.fixture(scope="module")
def tiny_out(tiny_pair, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline_tiny")
    argv = _argv("tiny", out, TINY0=tiny_pair[0], TINY1=tiny_pair[1], CORPUS=Path(corpus))
    assert main(["--no-progress", *argv]) == 0
    return out, argv


def test_two_models_equal_the_golden_values(tiny_out, tiny_pair, corpus):
    out, _ = tiny_out
    for role, model in zip(("tiny0", "tiny1"), tiny_pair):
        run_dir = out / model.name
        assert_matches(_summary(run_dir, corpus), GOLDEN["tiny"][role], role)
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["config"]["model"]["name"] == str(model)  # each model's own spec
        assert manifest["model"]["revision"].startswith("content-sha256:")
        assert {"git_sha", "libraries", "device", "esa_version"} <= set(manifest["provenance"])
        assert json.loads((run_dir / "results.json").read_text())["schema"] == "esa.baseline.v1"
    kinds = [k for _, k, status, _ in _runs(out / "esa.db") if status == "completed"]
    assert sorted(set(kinds)) == ["baseline", "long_context", "zeroshot"] and len(kinds) == 16


def test_rerun_resumes_without_computing(tiny_out, tiny_pair, monkeypatch, capsys):
    out, argv = tiny_out
    before = _runs(out / "esa.db")
    results = {m.name: json.loads((out / m.name / "results.json").read_text()) for m in tiny_pair}
    forbid_model_loading(monkeypatch)
    capsys.readouterr()
    assert main(["--no-progress", *argv]) == 0
    assert " ".join(capsys.readouterr().out.split()).count("all 8 run(s) already completed — not loaded") == 2
    assert _runs(out / "esa.db") == before  # no run added, none recomputed (same started_at)
    for name, doc in results.items():  # exported again from the same rows: the same numbers
        assert json.loads((out / name / "results.json").read_text()) == doc


def test_overwrite_starts_a_fresh_database(tiny_llama_dir, corpus, tmp_path):
    out = tmp_path / "o"
    argv = ["--no-progress", "baseline", "--model", str(tiny_llama_dir), "--datasets", corpus, "--context-lens", "32",
            "--seeds", "0", "--max-eval-tokens", "64", "--batch-tokens", "512", "--out-dir", str(out)]
    assert main(argv) == 0
    first = _runs(out / "esa.db")
    assert main(argv) == 0 and _runs(out / "esa.db") == first
    assert main([*argv, "--overwrite"]) == 0
    fresh = _runs(out / "esa.db")
    assert [r[:3] for r in fresh] == [r[:3] for r in first] and fresh[0][3] > first[0][3]  # same run, recomputed


def test_attention_flag_loads_that_kernel_and_records_it(tiny_llama_dir, corpus, tmp_path, capsys):
    """--attention eager: the same numbers as the default SDPA run (to float rounding), a run of its own (the
    kernel is in its config) and the kernel in its provenance; a kernel not installed is one line, no run."""
    base = ["--no-progress", "baseline", "--model", str(tiny_llama_dir), "--datasets", corpus, "--context-lens", "32",
            "--seeds", "0", "--max-eval-tokens", "64", "--batch-tokens", "512"]
    docs = {}
    for kernel in ("auto", "eager"):
        out = tmp_path / kernel
        assert main([*base, "--out-dir", str(out), "--attention", kernel]) == 0
        manifest = json.loads((out / tiny_llama_dir.name / "manifest.json").read_text())
        assert manifest["provenance"]["attention"] == {"auto": "sdpa", "eager": "eager"}[kernel]
        assert manifest["config"]["model"]["attention"] == kernel
        docs[kernel] = json.loads((out / tiny_llama_dir.name / "results.json").read_text())
    sdpa, eager = (d["entries"][0]["metrics"] for d in docs.values())
    assert eager["nll_per_token"] == pytest.approx(sdpa["nll_per_token"], rel=1e-6)
    assert eager["scored_tokens"] == sdpa["scored_tokens"] > 0
    assert _runs(tmp_path / "auto" / "esa.db")[0][0] != _runs(tmp_path / "eager" / "esa.db")[0][0]
    capsys.readouterr()
    assert main([*base, "--out-dir", str(tmp_path / "flash"), "--attention", "flash_attention_2"]) != 0
    err = capsys.readouterr().err
    assert "attention 'flash_attention_2'" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, fragment", [
    (["--baseline", "smok"], "unknown profile 'smok'. Did you mean 'smoke'?"),
    (["--eval-suites", "piqaa"], "unknown task 'piqaa'. Did you mean 'piqa'?"),
    (["--eval-suites", "piqa", "--task-data", "arc_e=x.jsonl"], "--task-data names arc_easy, which is not in"),
])
def test_bad_input_is_one_line_before_any_model_loads(argv, fragment, tmp_path, capsys, monkeypatch):
    forbid_model_loading(monkeypatch)
    base = ["--no-progress", "baseline", "--datasets", "python-docs", "--out-dir", str(tmp_path / "o")]
    assert main([*base, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_an_older_run_directory_without_a_database_is_refused(tmp_path, capsys):
    (tmp_path / "smollm2-135m").mkdir()
    (tmp_path / "smollm2-135m" / "results.json").write_text("{}")
    assert main(["--no-progress", "baseline", "--out-dir", str(tmp_path)]) == 2
    assert "without a results database" in capsys.readouterr().err


# --------------------------------------------------------------------------- the embedded model (model tier)
@pytest.mark.model
def test_embedded_model_equals_the_golden_values(tmp_path):
    out = tmp_path / "smol"
    assert main(["--no-progress", *_argv("smol", out)]) == 0
    assert_matches(_summary(out / "smollm2-135m"), GOLDEN["smol"], "smol")
