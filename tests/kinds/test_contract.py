"""Every registered run kind honours the RunKind contract, and expand → plan → execute → report runs for each
of them on a tiny model (one study with a section for every kind)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from esa import kinds
from esa.executors import plan, run_study
from esa.kinds.base import ReportSection, RunKind
from esa.report.study_report import write_study_report
from esa.store import Store
from esa.study import expand, parse_study

FIX = Path(__file__).resolve().parents[1] / "evals" / "fixtures"  # offline zero-shot items
SECTIONS = {  # one section per kind that has one; baseline comes from the study's own fields
    "sensitivity": {"scorers": ["magnitude"], "k": 8},
    "superweights": {"context_len": 32, "max_samples": 2},
    "perturbation": {"targets": [{"name": "top", "ranking": "magnitude", "k": 4}], "ops": [{"op": "zero"}],
                     "controls": ["random_k", "bottom_k"], "tasks": ["piqa"],
                     "task_data": {"piqa": str(FIX / "piqa.jsonl")}, "task_limit": 4},
    "dose_response": {"targets": [{"name": "top", "ranking": "magnitude", "k": 4}],
                      "ops": [{"op": "scale", "values": [0.0, 2.0]}], "tasks": ["piqa"],
                      "task_data": {"piqa": str(FIX / "piqa.jsonl")}, "task_limit": 4},
    "bitscan": {"targets": [{"name": "top", "ranking": "magnitude", "k": 2}], "top_n": 2, "bits": ["sign"],
                "max_flips": 1, "collapse_ppl": 1e6},
    "scaling": {"statistics": ["bits_per_byte", "magnitude_top_share"]},
    "zeroshot": {"tasks": ["piqa"], "task_data": {"piqa": str(FIX / "piqa.jsonl")}, "limit": 4},
    "long_context": {"context_lens": [64]},
    "vulnerability": {"top_k": 8, "verify_top": 4, "verify_random": 6, "screen_n": 3, "calib_samples": 2},
}


def test_every_kind_implements_the_protocol():
    assert kinds.names() and len({k.name for k in kinds.ordered()}) == len(kinds.names())
    for name in kinds.names():
        kind = kinds.get(name)
        assert isinstance(kind, RunKind) and kind.name == name and kind.version >= 1 and kind.about.strip()
        for hook in ("check", "expand", "execute", "cost", "summary"):
            assert callable(getattr(kind, hook)), (name, hook)
        assert isinstance(kind.report, ReportSection) and callable(kind.report.render)
        assert (kind.section is None) == (kind.schema is None), name
        assert kind.schema is None or dataclasses.is_dataclass(kind.schema)
        assert set(kind.depends_on) <= set(kinds.names()) and name not in kind.depends_on


def test_dependency_order_is_topological():
    order = [k.name for k in kinds.ordered()]
    for kind in kinds.ordered():
        assert all(order.index(dep) < order.index(kind.name) for dep in kind.depends_on)


def test_every_section_key_is_covered_here():
    assert set(SECTIONS) == set(kinds.with_section()), "add the new kind's section to this contract test"


@pytest.fixture(scope="module")
def contract_db(make_study_dir, tmp_path_factory):
    d = make_study_dir("contract")
    study = parse_study({"name": "contract", "models": [str(d / "model")], "datasets": [str(d / "corpus.txt")],
                         "context_lens": [32], "seeds": [0], "max_eval_tokens": 124, "batch_tokens": 1024,
                         **SECTIONS})
    db = tmp_path_factory.mktemp("contract") / "c.db"
    return study, db, run_study(study, db)


def test_expand_plan_execute_report_for_every_kind(contract_db, tmp_path):
    study, db, summary = contract_db
    runs = expand(study)
    assert {r.kind for r in runs} == set(kinds.names())  # every kind expanded
    rows = plan(study, measure=False)
    assert [r.run for r in rows] == runs and all(r.passes >= 0 for r in rows)  # magnitude: no data, 0
    assert summary.ok and summary.completed == summary.total == len(runs), summary
    with Store(db) as store:
        frame = store.runs_frame("contract")
    assert set(frame["kind"]) == set(kinds.names()) and (frame["status"] == "completed").all()
    assert all(frame["config.kind_version"] == [kinds.get(k).version for k in frame["kind"]])
    md, _ = write_study_report(db, tmp_path / "report")
    text = md.read_text()
    for kind in kinds.ordered():
        assert not kind.report.title or f"## {kind.report.title}" in text, kind.name
    assert "Runs of kind" not in text  # no kind fell back to the generic table


def test_perturbation_with_tasks_stores_and_reports_downstream_damage(contract_db, tmp_path):
    """The perturbation section's tasks: one paired comparison per arm on the same 4 items, in the report."""
    from esa.store import Reader

    study, db, _ = contract_db
    with Reader(db) as reader:
        (run,) = reader.runs("contract", "perturbation", completed=True)
    down = run.metrics["downstream"]
    assert {c["arm"] for c in down["comparisons"]} == {"target", "random_k", "bottom_k"}
    assert all(c["task"] == "piqa" and c["acc"]["n_items"] == 4 for c in down["comparisons"])
    assert run.config["tasks"] == [["piqa", str(FIX / "piqa.jsonl")]] and run.config["task_limit"] == 4
    md, _ = write_study_report(db, tmp_path / "report")
    text = md.read_text()
    assert "Zero-shot accuracy under perturbation" in text
    assert "dose_accuracy.png" in text and (tmp_path / "report" / "dose_accuracy.png").stat().st_size > 0
