"""Run kind ``long_context``: its section, expansion, execution (identical to ``esa baseline --long-context``),
summary and report."""

import json
from types import SimpleNamespace

import numpy as np
import pytest

from esa.evals.baseline import BaselineConfig, evaluate_cell
from esa.data.corpora import load_corpus
from esa.core.errors import EsaError
from esa.kinds import get
from esa.kinds.base import RunContext
from esa.kinds.long_context import FROM_STUDY, KIND, LongContextRun, LongContextSection
from esa.models import ModelSpec, load_model
from esa.report.html import Table, to_markdown
from esa.report.study_report import Run, fnum
from esa.core.schema import parse_section
from esa.study import parse_study

TIMING = ("tokens_per_second", "forward_seconds")  # measured, so never equal between two evaluations


def _section(**data) -> LongContextSection:
    return parse_section(KIND.schema, data, "study.long_context")


def _study(study_dir, **sections):
    """A parsed study of two models; ``sections`` are raw YAML mappings the engine hands to their kinds."""
    return parse_study({"name": "lc", "models": ["smollm2-135m", str(study_dir / "model")],
                        "datasets": ["python-docs", str(study_dir / "corpus.txt")], "context_lens": [64],
                        "seeds": [3, 4], "max_eval_tokens": 512, "method": "chunks", "bos": "never", **sections})


@pytest.fixture(scope="module")
def study_dir(make_study_dir):
    return make_study_dir("long_context")


@pytest.fixture(scope="module")
def tiny_lm(study_dir):
    return load_model(ModelSpec(str(study_dir / "model")))  # 512 positions


def _run(study_dir, ctx=256, seed=3, max_eval_tokens=600) -> LongContextRun:
    return LongContextRun(ModelSpec(str(study_dir / "model")), str(study_dir / "corpus.txt"), ctx, seed, "chunks",
                          None, "auto", max_eval_tokens)


# ---------------------------------------------------------------------------------------------- section
def test_registered_under_its_section_key():
    assert get("long_context") is KIND and KIND.section == "long_context" and KIND.version == 1
    assert KIND.depends_on == ()


def test_section_parses_with_defaults():
    assert _section(context_lens=[8192, 16384]) == LongContextSection((8192, 16384), (), FROM_STUDY)
    assert _section(context_lens=[8192], max_eval_tokens=None).max_eval_tokens is None


def test_section_refuses_an_unknown_key():
    with pytest.raises(EsaError, match=r"study\.long_context: unknown key 'seeds'.*Valid keys: context_lens"):
        _section(context_lens=[8192], seeds=[0])


@pytest.mark.parametrize("data, message", [
    ({"context_lens": []}, r"study\.long_context\.context_lens: give distinct lengths ≥ 2"),
    ({"context_lens": [8192, 8192]}, r"distinct lengths"),
    ({"context_lens": [1]}, r"distinct lengths ≥ 2"),
    ({"context_lens": [8192], "max_eval_tokens": 0}, r"study\.long_context\.max_eval_tokens: ≥ 1, null"),
])
def test_check_names_the_key_and_the_fix(data, message):
    with pytest.raises(EsaError, match=message):
        KIND.check(_section(**data), None, "study.long_context")


def test_check_datasets_with_the_engine_rule():
    with pytest.raises(EsaError, match=r"study\.long_context\.datasets\[0\]: unknown dataset 'wikitxt-2'"):
        KIND.check(_section(context_lens=[8192], datasets=["wikitxt-2"]), None, "study.long_context")


# -------------------------------------------------------------------------------------------- expansion
def test_expand_model_dataset_ctx_with_the_first_seed(study_dir):
    runs = KIND.expand(_study(study_dir, long_context={"context_lens": [256, 512]}))
    models, datasets = ("smollm2-135m", str(study_dir / "model")), ("python-docs", str(study_dir / "corpus.txt"))
    assert [(r.model.name, r.dataset, r.context_len) for r in runs] == [
        (m, d, c) for m in models for d in datasets for c in (256, 512)]
    assert {(r.seed, r.method, r.stride, r.bos, r.max_eval_tokens) for r in runs} == {(3, "chunks", None, "never", 512)}
    config = runs[0].config()
    assert {k: v for k, v in config.items() if k != "model"} == {
        "kind": "long_context", "dataset": "python-docs", "context_len": 256, "seed": 3, "method": "chunks",
        "stride": None, "bos": "never", "max_eval_tokens": 512}
    assert config["model"]["name"] == "smollm2-135m" and runs[0].dependencies() == {}
    assert "long ctx=256" in runs[0].label()


def test_expand_section_overrides_datasets_and_budget(study_dir):
    s = {"context_lens": [256], "datasets": ["python-docs"], "max_eval_tokens": None}
    runs = KIND.expand(_study(study_dir, long_context=s))
    assert [(r.dataset, r.max_eval_tokens) for r in runs] == [("python-docs", None)] * 2


def test_expand_without_the_section_is_empty(study_dir):
    assert KIND.expand(_study(study_dir)) == []


# -------------------------------------------------------------------------------------------- execution
@pytest.mark.parametrize("ctx", [128, 256])
def test_execute_stores_what_baseline_long_context_computes(tiny_lm, study_dir, tmp_path, ctx):
    run = _run(study_dir, ctx)
    metrics, arrays = KIND.execute(tiny_lm, run, RunContext())
    # the pre-engine `esa baseline --long-context CTX`: resolved config, corpus read for the method, evaluate_cell
    cfg = BaselineConfig(run.model, "smoke", (run.dataset,), (64,), (run.seed,), max_eval_tokens=600,
                         long_context=(ctx,)).resolved()
    entry = evaluate_cell(tiny_lm, load_corpus(run.dataset, cfg.method), cfg, ctx, cfg.seeds[0], tmp_path,
                          long_context=True)
    assert {k: metrics[k] for k in entry.metrics if k not in TIMING} == \
        {k: v for k, v in entry.metrics.items() if k not in TIMING}
    assert metrics["batch_sizes"] == [1] and metrics["long_context"] is True
    assert (metrics["corpus_source"], metrics["bos_resolved"], metrics["seed_invariant"],
            metrics["windows_available"], metrics["sanity"]) == \
        (entry.corpus_source, entry.bos, entry.seed_invariant, entry.windows_available, entry.sanity)
    assert set(metrics["peak_memory"]) == set(entry.peak_memory) == {"process_peak_rss_bytes"}
    with np.load(tmp_path / entry.per_window_file) as ref:
        assert sorted(arrays) == sorted(ref.files) == ["n_correct", "n_scored", "nll", "window_index"]
        for k in ref.files:
            assert np.array_equal(arrays[k], ref[k]), k
    assert int(arrays["n_scored"].sum()) == metrics["scored_tokens"] and len(arrays["nll"]) == metrics["n_windows"]


def test_execute_refuses_a_context_beyond_the_model_positions(tiny_lm, study_dir):
    with pytest.raises(EsaError, match=r"context length 1024 exceeds .* maximum of 512 positions"):
        KIND.execute(tiny_lm, _run(study_dir, 1024), RunContext())


def test_cost_is_the_token_budget_in_one_pass(study_dir):
    assert KIND.cost(_run(study_dir, max_eval_tokens=600)) == (600, 1.0)
    assert KIND.cost(_run(study_dir, max_eval_tokens=None)) == (None, 1.0)


# ------------------------------------------------------------------------------------- summary and report
def _stored(run: LongContextRun, metrics: dict, status="completed") -> Run:
    return Run("rid", "long_context", status, None, run.config(), {}, metrics, "2024-01-01T00:00:00")


def test_summary_line_has_perplexity_rate_and_memory(tiny_lm, study_dir):
    run = _run(study_dir)
    metrics, _ = KIND.execute(tiny_lm, run, RunContext())
    line = KIND.summary(SimpleNamespace(config=run.config(), metrics=metrics))
    gib = metrics["peak_memory"]["process_peak_rss_bytes"] / 2**30
    assert line == (f"{run.dataset} ctx=256 ppl {fnum(metrics['perplexity'], 2)}, "
                    f"{metrics['tokens_per_second']:,.0f} tok/s, peak {gib:.2f} GiB (process RSS)")


def test_report_has_a_row_per_context_with_the_stored_numbers(tiny_lm, study_dir):
    runs = [_run(study_dir, ctx) for ctx in (256, 128)]
    stored = [_stored(r, KIND.execute(tiny_lm, r, RunContext())[0]) for r in runs]
    stored.append(_stored(runs[0], {}, status="failed"))
    blocks = KIND.report.render(stored)
    table = next(b for b in blocks if isinstance(b, Table))
    assert "2 completed long-context run(s) of 3" in blocks[0].text
    rows = [dict(zip(table.header, row)) for row in table.rows]
    assert [r["ctx"] for r in rows] == ["128", "256"]  # increasing context within a model × dataset
    for row, run in zip(rows, stored[1::-1]):
        m = run.metrics
        assert row["perplexity"] == fnum(m["perplexity"]) and row["token accuracy"] == fnum(m["token_accuracy"], 4)
        assert row["scored tokens"] == f"{m['scored_tokens']:,}" and row["tokens/s"] == f"{m['tokens_per_second']:,.0f}"
        assert row["peak memory"].endswith("GiB (process RSS)")
    assert fnum(stored[0].metrics["perplexity"]) in to_markdown(blocks, {})


# ------------------------------------------------------------------------------------------- the engine
def test_a_study_file_checks_its_long_context_section(study_dir):
    with pytest.raises(EsaError, match=r"study\.long_context: unknown key 'context_len'\. Did you mean"):
        _study(study_dir, long_context={"context_len": [256]})


def test_run_study_stores_the_long_context_row_and_its_window_arrays(study_dir, tiny_lm, tmp_path):
    from esa.executors import run_study
    from esa.store import Store

    study = parse_study({"name": "lc", "models": [str(study_dir / "model")],
                         "datasets": [str(study_dir / "corpus.txt")], "context_lens": [64], "max_eval_tokens": 600,
                         "long_context": {"context_lens": [256]}})
    summary = run_study(study, tmp_path / "s.db")
    assert summary.ok and summary.completed == summary.total == 2, summary  # the baseline cell + ctx 256
    with Store(tmp_path / "s.db") as store:
        (rid, config, metrics), = store.con.execute(
            "SELECT run_id, config, metrics FROM runs WHERE kind = 'long_context' AND status = 'completed'").fetchall()
        arrays = store.load_arrays(rid)
    direct, direct_arrays = KIND.execute(tiny_lm, KIND.expand(study)[0], RunContext())
    config, metrics = json.loads(config), json.loads(metrics)
    assert config["kind_version"] == 1 and config["context_len"] == 256 and metrics["long_context"] is True
    assert {k: v for k, v in metrics.items() if k not in TIMING + ("peak_memory",)} == \
        {k: v for k, v in json.loads(json.dumps(direct)).items() if k not in TIMING + ("peak_memory",)}
    assert sorted(arrays) == sorted(direct_arrays)
    assert all(np.array_equal(arrays[k], direct_arrays[k]) for k in arrays)
