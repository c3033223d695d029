"""Run kind ``zeroshot``: its section, expansion, execution (identical to ``esa zeroshot``), summary and report."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from esa.core.errors import EsaError
from esa.evals.zeroshot import run_tasks
from esa.kinds import get
from esa.kinds.base import RunContext
from esa.kinds.zeroshot import KIND, ZeroShotRun, ZeroShotSection
from esa.models import ModelSpec, load_model
from esa.report.html import Table, to_markdown
from esa.report.study_report import Run, fnum
from esa.core.schema import parse_section
from esa.study import parse_study

FIX = Path(__file__).resolve().parents[1] / "evals" / "fixtures"  # the tasks' offline items (≥ 20 each)


def _section(**data) -> ZeroShotSection:
    return parse_section(KIND.schema, data, "study.zeroshot")


def _study(tiny_llama_dir, **sections):
    """A parsed study of two models; ``sections`` are raw YAML mappings the engine hands to their kinds."""
    return parse_study({"name": "zs", "models": ["smollm2-135m", str(tiny_llama_dir)], "datasets": ["python-docs"],
                        "context_lens": [128], "seeds": [0, 1], "batch_tokens": 2048, **sections})


@pytest.fixture(scope="module")
def tiny_lm(tiny_llama_dir):
    return load_model(ModelSpec(str(tiny_llama_dir)))


def _run(task, limit=6, seed=3, budget=1024) -> ZeroShotRun:
    return ZeroShotRun(ModelSpec("tiny-llama"), task, str(FIX / f"{task}.jsonl"), limit, seed, budget)


# ---------------------------------------------------------------------------------------------- section
def test_registered_under_its_section_key():
    assert get("zeroshot") is KIND and KIND.section == "zeroshot" and KIND.version == 1 and KIND.depends_on == ()


def test_section_parses_with_defaults():
    s = _section(tasks=["piqa", "arc_easy"], task_data={"piqa": "piqa.jsonl"}, limit=200)
    assert s == ZeroShotSection(("piqa", "arc_easy"), {"piqa": "piqa.jsonl"}, 200, (), None)


def test_section_refuses_an_unknown_key():
    with pytest.raises(EsaError, match=r"study\.zeroshot: unknown key 'num_fewshot'.*Valid keys: limit, seeds"):
        _section(tasks=["piqa"], num_fewshot=5)


def test_section_type_errors_name_the_path():
    with pytest.raises(EsaError, match=r"study\.zeroshot\.limit: expected int or null, got str"):
        _section(tasks=["piqa"], limit="200")


@pytest.mark.parametrize("data, message", [
    ({"tasks": ["piqaa"]}, r"study\.zeroshot\.tasks\[0\]: unknown task 'piqaa'\. Did you mean 'piqa'\?"),
    ({"tasks": []}, r"study\.zeroshot\.tasks: list at least one task"),
    ({"tasks": ["piqa", "piqa"]}, r"listed twice"),
    ({"tasks": ["piqa"], "task_data": {"arc_easy": "a.jsonl"}}, r"task_data\.arc_easy: not one of the section"),
    ({"tasks": ["piqa"], "limit": 0}, r"study\.zeroshot\.limit: ≥ 1"),
    ({"tasks": ["piqa"], "seeds": [1, 1]}, r"study\.zeroshot\.seeds: distinct seeds"),
    ({"tasks": ["piqa"], "token_budget": 0}, r"token_budget must be ≥ 1"),
])
def test_check_names_the_key_and_the_fix(data, message):
    with pytest.raises(EsaError, match=message):
        KIND.check(_section(**data), None, "study.zeroshot")


def test_check_accepts_a_hub_task_without_data():
    KIND.check(_section(tasks=["piqa", "hellaswag"], task_data={"piqa": "p.jsonl"}), None, "study.zeroshot")


# -------------------------------------------------------------------------------------------- expansion
def test_expand_model_task_seed_model_major(tiny_llama_dir):
    s = {"tasks": ["piqa", "arc_easy"], "task_data": {"piqa": "/d/piqa.jsonl"}, "limit": 50}
    runs = KIND.expand(_study(tiny_llama_dir, zeroshot=s))
    assert [(r.model.name, r.task, r.seed) for r in runs] == [
        (m, t, seed) for m in ("smollm2-135m", str(tiny_llama_dir)) for t in ("piqa", "arc_easy") for seed in (0, 1)]
    assert {r.task: r.task_data for r in runs} == {"piqa": "/d/piqa.jsonl", "arc_easy": None}
    assert {(r.limit, r.token_budget) for r in runs} == {(50, 2048)}  # the budget defaults to batch_tokens
    config = runs[0].config()
    assert config["model"]["name"] == "smollm2-135m" and {k: v for k, v in config.items() if k != "model"} == {
        "kind": "zeroshot", "task": "piqa", "task_data": "/d/piqa.jsonl", "limit": 50, "seed": 0,
        "token_budget": 2048}
    assert runs[0].dependencies() == {} and "piqa" in runs[0].label()


def test_expand_scores_every_item_once_without_a_limit(tiny_llama_dir):
    s = {"tasks": ["piqa"], "seeds": [5, 6], "token_budget": 512}
    runs = KIND.expand(_study(tiny_llama_dir, zeroshot=s))
    assert [(r.seed, r.limit, r.token_budget) for r in runs] == [(5, None, 512)] * 2  # one per model


def test_expand_without_the_section_is_empty(tiny_llama_dir):
    assert KIND.expand(_study(tiny_llama_dir)) == []


# -------------------------------------------------------------------------------------------- execution
@pytest.mark.parametrize("task", ["piqa", "arc_easy", "lambada_openai"])
def test_execute_stores_what_esa_zeroshot_computes(tiny_lm, task):
    run = _run(task)
    metrics, arrays = KIND.execute(tiny_lm, run, RunContext())
    ref = run_tasks(tiny_lm.model, tiny_lm.tokenizer, [task], {task: run.task_data}, run.limit, run.seed,
                    run.token_budget)[0]  # the `esa zeroshot` code path, called independently
    assert {k: metrics[k] for k in ref.metrics} == ref.metrics
    assert metrics["task_config"] == ref.config and metrics["n_items"] == ref.config["n"] == 6
    assert metrics["seed_invariant"] is False and metrics["n_total"] == ref.config["n_total"] > 6
    assert arrays["item_index"].tolist() == [s.item_id for s in ref.items]
    assert arrays["gold"].tolist() == [s.gold for s in ref.items]
    n = arrays["n_choices"]
    assert n.tolist() == [len(s.loglikelihoods) for s in ref.items]
    ll = arrays["loglikelihoods"]  # (N, C), NaN beyond an item's options
    assert ll.shape == (6, n.max()) and np.isnan(ll).sum() == (n.max() - n).sum()
    for i, s in enumerate(ref.items):
        assert ll[i, : n[i]].tolist() == list(s.loglikelihoods)
        assert arrays["is_greedy"][i, : n[i]].tolist() == list(s.is_greedy)
    assert arrays["correct"].mean() == metrics["acc"]
    if "acc_norm" in metrics:
        assert arrays["correct_norm"].mean() == metrics["acc_norm"]
    else:
        assert "correct_norm" not in arrays and "perplexity" in metrics


def test_arc_pads_items_with_fewer_options(tiny_lm):
    _, arrays = KIND.execute(tiny_lm, _run("arc_easy", limit=None, seed=0), RunContext())
    assert len(set(arrays["n_choices"].tolist())) > 1  # the fixture mixes 3-, 4- and 5-option items


def test_a_limit_covering_the_split_is_seed_invariant(tiny_lm):
    metrics, arrays = KIND.execute(tiny_lm, _run("piqa", limit=10_000, seed=7), RunContext())
    assert metrics["seed_invariant"] is True and metrics["n_items"] == metrics["n_total"] == len(arrays["gold"])
    assert len(metrics["task_data_sha256"]) == 64


def test_a_hub_task_offline_fails_at_execution_with_the_study_remedy(tiny_lm):
    run = ZeroShotRun(ModelSpec("tiny"), "piqa", None, 5, 0, 1024)
    with pytest.raises(EsaError, match=r"neither reachable.*zeroshot: \{task_data: \{piqa: PATH\}\}"):
        KIND.execute(tiny_lm, run, RunContext())


def test_cost_estimates_forward_tokens_of_a_local_file():
    tokens, passes = KIND.cost(ZeroShotRun(ModelSpec("m"), "piqa", str(FIX / "piqa.jsonl"), 5, 0, 1024))
    more, _ = KIND.cost(ZeroShotRun(ModelSpec("m"), "piqa", str(FIX / "piqa.jsonl"), 10, 0, 1024))
    assert 0 < tokens < more and passes == 1.0
    assert KIND.cost(ZeroShotRun(ModelSpec("m"), "piqa", None, 5, 0, 1024)) == (None, 1.0)


# ------------------------------------------------------------------------------------- summary and report
def _stored(run: ZeroShotRun, metrics: dict, status="completed") -> Run:
    return Run("rid", "zeroshot", status, None, run.config(), {}, metrics, "2024-01-01T00:00:00")


def test_summary_line_has_the_accuracies_and_the_items(tiny_lm):
    run = _run("piqa")
    metrics, _ = KIND.execute(tiny_lm, run, RunContext())
    line = KIND.summary(SimpleNamespace(config=run.config(), metrics=metrics))
    assert line == (f"piqa acc {metrics['acc']:.3f} ± {metrics['acc_stderr']:.3f}, acc_norm "
                    f"{metrics['acc_norm']:.3f} ± {metrics['acc_norm_stderr']:.3f} (n=6 of {metrics['n_total']})")


def test_report_has_a_row_per_run_with_the_stored_numbers(tiny_lm):
    runs = [_run(t) for t in ("piqa", "lambada_openai")]
    stored = [_stored(r, KIND.execute(tiny_lm, r, RunContext())[0]) for r in runs]
    stored.append(_stored(runs[0], {}, status="failed"))
    blocks = KIND.report.render(stored)
    table = next(b for b in blocks if isinstance(b, Table))
    assert len(table.rows) == 2 and "2 completed zero-shot run(s) of 3" in blocks[0].text
    rows = {row[2]: dict(zip(table.header, row)) for row in table.rows}
    piqa, lam = stored[0].metrics, stored[1].metrics
    assert rows["piqa"]["acc ± stderr"] == f"{fnum(piqa['acc'], 4)} ± {fnum(piqa['acc_stderr'], 4)}"
    assert rows["piqa"]["acc_norm ± stderr"] == f"{fnum(piqa['acc_norm'], 4)} ± {fnum(piqa['acc_norm_stderr'], 4)}"
    assert rows["lambada_openai"]["acc_norm ± stderr"] == "—"
    assert rows["lambada_openai"]["perplexity ± stderr"].startswith(fnum(lam["perplexity"], 4))
    assert rows["piqa"]["items"] == f"6 of {piqa['n_total']}" and rows["piqa"]["seed"] == "3"
    assert fnum(piqa["acc"], 4) in to_markdown(blocks, {})


def test_warnings_count_non_finite_items():
    run = ZeroShotRun(ModelSpec("m"), "piqa", None, 5, 0, 1024)
    assert KIND.warnings(_stored(run, {"n_nonfinite_items": 0})) == []
    assert "2 item(s) with a non-finite" in KIND.warnings(_stored(run, {"n_nonfinite_items": 2}))[0]


# ------------------------------------------------------------------------------------------- the engine
def test_a_study_file_checks_its_zeroshot_section(tiny_llama_dir):
    with pytest.raises(EsaError, match=r"study\.zeroshot\.tasks\[1\]: unknown task 'arc_esy'\. Did you mean"):
        _study(tiny_llama_dir, zeroshot={"tasks": ["piqa", "arc_esy"]})


def test_run_study_stores_the_zeroshot_row_and_its_item_arrays(tiny_llama_dir, tiny_lm, tmp_path):
    from esa.executors import run_study
    from esa.store import Store

    study = parse_study({"name": "zs", "models": [str(tiny_llama_dir)], "datasets": ["python-docs"],
                         "context_lens": [32], "max_eval_tokens": 62, "batch_tokens": 1024,
                         "zeroshot": {"tasks": ["piqa"], "task_data": {"piqa": str(FIX / "piqa.jsonl")}, "limit": 6}})
    summary = run_study(study, tmp_path / "s.db")
    assert summary.ok and summary.completed == summary.total == 2, summary  # the baseline cell + piqa
    with Store(tmp_path / "s.db") as store:
        (rid, config, metrics), = store.con.execute(
            "SELECT run_id, config, metrics FROM runs WHERE kind = 'zeroshot' AND status = 'completed'").fetchall()
        arrays = store.load_arrays(rid)
    direct, direct_arrays = KIND.execute(tiny_lm, KIND.expand(study)[0], RunContext())
    assert json.loads(config)["kind_version"] == 1 and json.loads(config)["task"] == "piqa"
    assert json.loads(metrics) == json.loads(json.dumps(direct))
    assert sorted(arrays) == sorted(direct_arrays)
    assert all(np.array_equal(arrays[k], direct_arrays[k], equal_nan=k == "loglikelihoods") for k in arrays)
