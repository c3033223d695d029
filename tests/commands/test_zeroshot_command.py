"""`esa zeroshot` as a one-off study: its files equal the direct library computation, and a rerun resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esa.cli import main
from esa.evals.zeroshot import run_tasks
from esa.models import ModelSpec, load_model
from helpers.models import forbid_model_loading

FIX = Path(__file__).resolve().parents[1] / "evals" / "fixtures"
TASKS = ["piqa", "arc_easy"]


def _args(model, out):
    return ["zeroshot", "--model", str(model), "--tasks", *TASKS, "--task-data",
            *(f"{t}={FIX / f'{t}.jsonl'}" for t in TASKS), "--limit", "6", "--seed", "1", "--out-dir", str(out)]


@pytest.fixture(scope="module")
def command_out(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("zs")
    assert main(_args(tiny_llama_dir, out)) == 0
    return out


def test_files_equal_the_library_computation(command_out, tiny_llama_dir):
    """The old path — run_tasks on the loaded model — is the reference for every number and item."""
    lm = load_model(ModelSpec(str(tiny_llama_dir)))
    direct = run_tasks(lm.model, lm.tokenizer, TASKS, {t: str(FIX / f"{t}.jsonl") for t in TASKS}, 6, 1)
    doc = json.loads((command_out / "zeroshot.json").read_text())
    assert list(doc["tasks"]) == TASKS
    for ref in direct:
        got = doc["tasks"][ref.task]
        assert got["metrics"] == json.loads(json.dumps(ref.metrics))  # exactly: the same floats, stored and read
        assert got["config"] == ref.config
        items = [json.loads(line) for line in (command_out / got["items_file"]).read_text().splitlines()]
        assert items == [json.loads(json.dumps(item.__dict__)) for item in ref.items]
    assert doc["provenance"]["model"]["model_id"] and (command_out / "esa.db").is_file()


def test_rerun_resumes_without_loading_the_model(command_out, tiny_llama_dir, monkeypatch):
    before = (command_out / "zeroshot.json").read_text()
    forbid_model_loading(monkeypatch)
    assert main(_args(tiny_llama_dir, command_out)) == 0
    after = json.loads((command_out / "zeroshot.json").read_text())
    assert {t: v["metrics"] for t, v in after["tasks"].items()} == \
        {t: v["metrics"] for t, v in json.loads(before)["tasks"].items()}
