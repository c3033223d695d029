"""`esa zeroshot` also writes lm-evaluation-harness 0.4's layout: results_<date>.json and samples_<task>_<date>.jsonl
hold the very numbers of ESA's own zeroshot.json and per-item files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from esa.cli import main
from esa.evals.lmeval_format import date_id, samples, sanitize_model_name, task_export
from esa.evals.zeroshot import ItemScore, TaskResult
from helpers.models import forbid_model_loading

FIX = Path(__file__).resolve().parent / "fixtures"
TASKS = ["piqa", "lambada_openai"]
LIMIT = 6


def _args(model, out):
    return ["zeroshot", "--model", str(model), "--tasks", *TASKS, "--task-data",
            *(f"{t}={FIX / f'{t}.jsonl'}" for t in TASKS), "--limit", str(LIMIT), "--out-dir", str(out)]


@pytest.fixture(scope="module")
def out(tiny_llama_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("lmeval")
    assert main(_args(tiny_llama_dir, path)) == 0
    return path


def _files(out: Path) -> tuple[dict, dict, dict[str, list[dict]]]:
    """(zeroshot.json, the lm-eval results document, {task: sample lines}) as zeroshot.json points to them."""
    own = json.loads((out / "zeroshot.json").read_text())
    results = json.loads((out / own["lm_eval"]["results"]).read_text())
    samples = {t: [json.loads(line) for line in (out / p).read_text().splitlines()]
               for t, p in own["lm_eval"]["samples"].items()}
    return own, results, samples


def _items(out: Path, own: dict, task: str) -> list[dict]:
    return [json.loads(line) for line in (out / own["tasks"][task]["items_file"]).read_text().splitlines()]


def test_results_document_has_lm_eval_layout_and_esa_numbers(out):
    own, doc, samples = _files(out)
    assert {"results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config",
            "task_hashes", "model_name"} <= set(doc)
    assert list(doc["results"]) == TASKS
    for task in TASKS:
        metrics, res = own["tasks"][task]["metrics"], doc["results"][task]
        assert res["alias"] == task
        assert res["acc,none"] == metrics["acc"] == pytest.approx(sum(s["acc"] for s in samples[task]) / LIMIT)
        assert res["acc_stderr,none"] == metrics["acc_stderr"]
        assert doc["n-shot"][task] == 0 and doc["n-samples"][task] == {"original": 22, "effective": LIMIT}
        cfg = doc["configs"][task]
        assert cfg["task"] == task and cfg["num_fewshot"] == 0 and cfg["dataset_path"]
        assert [m["metric"] for m in cfg["metric_list"]] == list(doc["higher_is_better"][task])
    piqa, lambada = doc["results"]["piqa"], doc["results"]["lambada_openai"]
    assert piqa["acc_norm,none"] == own["tasks"]["piqa"]["metrics"]["acc_norm"]
    assert "acc_norm_stderr,none" in piqa and "perplexity,none" not in piqa
    assert lambada["perplexity,none"] == own["tasks"]["lambada_openai"]["metrics"]["perplexity"]
    assert doc["configs"]["piqa"]["output_type"] == "multiple_choice"
    assert doc["configs"]["lambada_openai"]["output_type"] == "loglikelihood"
    assert doc["higher_is_better"]["lambada_openai"] == {"acc": True, "perplexity": False}
    assert doc["versions"] == {"lambada_openai": 1.0, "piqa": 1.0}
    cfg = doc["config"]
    assert cfg["limit"] == LIMIT and cfg["random_seed"] == 0 and cfg["model_dtype"] == "torch.float32"
    assert cfg["model_args"].startswith(f"pretrained={doc['model_name']},dtype=fp32")


def test_samples_hold_every_item_with_esa_loglikelihoods(out):
    own, _, samples = _files(out)
    rows = {t: [json.loads(line) for line in (FIX / f"{t}.jsonl").read_text().splitlines()] for t in TASKS}
    for task in TASKS:
        items = _items(out, own, task)
        assert len(samples[task]) == len(items) == LIMIT
        for s, item in zip(samples[task], items):
            assert s["doc_id"] == item["item_id"] and s["doc"] == rows[task][s["doc_id"]]
            lls = [float(r[0][0]) for r in s["resps"]]
            assert lls == item["loglikelihoods"]  # bit for bit: str(float) round-trips
            assert [float(r[0]) for r in s["filtered_resps"]] == lls
            assert [r[0][1] == "True" for r in s["resps"]] == item["is_greedy"]
            assert len(s["arguments"]) == len(lls) and s["filter"] == "none"
            assert s["acc"] == float(item["correct"]) and set(s["metrics"]) <= set(s)
    piqa = samples["piqa"][0]
    assert piqa["target"] == str(piqa["doc"]["label"]) and piqa["acc_norm"] in (0.0, 1.0)
    assert piqa["arguments"]["gen_args_1"] == {"arg_0": f"Question: {piqa['doc']['goal']}\nAnswer:",
                                               "arg_1": " " + piqa["doc"]["sol2"]}
    lam = samples["lambada_openai"][0]
    assert lam["target"] == lam["arguments"]["gen_args_0"]["arg_1"] == " " + lam["doc"]["text"].split(" ")[-1]
    assert lam["perplexity"] == float(lam["resps"][0][0][0])


def test_file_names_follow_lm_eval_and_a_rerun_rewrites_the_same_files(out, tiny_llama_dir, monkeypatch):
    own, _, _ = _files(out)
    folder = (out / own["lm_eval"]["results"]).parent
    assert folder.parent.name == "lm-eval" and folder.name == sanitize_model_name(str(tiny_llama_dir))
    stamp = Path(own["lm_eval"]["results"]).stem.removeprefix("results_")
    for task, rel in own["lm_eval"]["samples"].items():
        name = Path(rel).name  # lm-eval's readers: task between the first and the last "_", date after the last
        assert name[name.find("_") + 1:name.rfind("_")] == task and name[name.rfind("_") + 1:] == f"{stamp}.jsonl"
    before = sorted(p.name for p in folder.iterdir())
    forbid_model_loading(monkeypatch)
    assert main(_args(tiny_llama_dir, out)) == 0  # resumes: same stored rows, same names, no stale files
    assert sorted(p.name for p in folder.iterdir()) == before


def test_names_and_dates_match_lm_eval():
    assert sanitize_model_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB__SmolLM2-135M"
    assert sanitize_model_name("/data/models/llama") == "models__llama"
    assert date_id("2025-01-02T03:04:05.678+00:00") == "2025-01-02T03-04-05.678000"


def test_changed_rows_leave_doc_and_arguments_empty_but_keep_the_scores():
    item = ItemScore(100, (-1.5, -2.5), (False, False), 0, True, True)  # no row 100 in the 22-row file
    result = TaskResult("piqa", {"acc": 1.0, "acc_norm": 1.0}, [item], {"n": 1, "n_total": 22})
    export = task_export(result, str(FIX / "piqa.jsonl"), None, 0)
    assert export.items is None and export.docs is None
    (line,) = samples(export)
    assert line["doc"] == {} and line["arguments"] == {} and line["target"] == "0"
    assert [float(r[0]) for r in line["filtered_resps"]] == [-1.5, -2.5] and not math.isnan(line["acc"])
