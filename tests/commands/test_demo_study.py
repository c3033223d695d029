"""`esa demo --study FILE`: the demo's study step writes a fresh study database and its report."""

from __future__ import annotations

import sqlite3

import pytest

from esa.commands.demo import run_demo_study
from esa.core.errors import EsaError

pytestmark = pytest.mark.model  # the demo study runs the embedded SmolLM2

STUDY = """name: tiny-demo
models: [smollm2-135m]
dtype: fp32
datasets: [python-docs]
context_lens: [{ctx}]
seeds: [0]
max_eval_tokens: 126
batch_tokens: 1024
"""


def _rows(db) -> list[tuple]:
    with sqlite3.connect(db) as con:
        return con.execute("SELECT run_id, status, finished_at FROM runs").fetchall()


def test_demo_study_writes_database_and_report_and_overwrite_replaces_it(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(STUDY.format(ctx=64))
    run_demo_study(path, tmp_path, overwrite=True)
    first = _rows(tmp_path / "study.db")
    assert len(first) == 1 and first[0][1] == "completed"
    report = (tmp_path / "report" / "report.md").read_text()
    ppl = sqlite3.connect(tmp_path / "study.db").execute("SELECT perplexity FROM results").fetchone()[0]
    assert f"{ppl:.3f}"[:5] in report  # the report shows the database's perplexity
    assert "report (HTML)" in capsys.readouterr().out

    run_demo_study(path, tmp_path, overwrite=False)  # resumes: the completed run is reused, not redone
    assert _rows(tmp_path / "study.db") == first
    run_demo_study(path, tmp_path, overwrite=True)  # a fresh database: same run id, new finish time
    again = _rows(tmp_path / "study.db")
    assert [r[0] for r in again] == [r[0] for r in first] and again[0][2] != first[0][2]


def test_a_failed_demo_run_is_one_clear_error(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(STUDY.format(ctx=100_000))  # longer than SmolLM2's 8192 positions
    with pytest.raises(EsaError, match=r"tiny-demo|smollm2-135m.*kept in"):
        run_demo_study(path, tmp_path, overwrite=True)
    assert (tmp_path / "study.db").is_file()


def test_the_demo_is_one_study_with_every_kind_it_promises():
    """make demo: baseline, zero-shot, super weights, a ranking, perturbation vs random_k and bottom_k,
    dose-response, a bit scan and the vulnerability map — all in the one study file that esa demo runs."""
    from esa.commands.demo import DEMO_STUDY
    from esa.study import expand, load_study

    study = load_study(DEMO_STUDY)
    assert {r.kind for r in expand(study)} == {"baseline", "zeroshot", "superweights", "sensitivity",
                                               "perturbation", "dose_response", "bitscan", "vulnerability"}
    assert set(study.section("perturbation").controls) == {"random_k", "bottom_k", "largest_k"}
    assert study.section("perturbation").tasks and study.section("perturbation").task_limit  # downstream damage
