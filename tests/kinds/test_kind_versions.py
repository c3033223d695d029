"""A run kind's semantic version is part of every run's identity (issue 10, defect 9).

Before: a database made before a change to what a kind's numbers mean silently reused its old rows, because
the code version was not part of a run's id. Now ``kind_version`` is in the resolved config, a bump computes
fresh rows, and the report flags a kind whose rows come from another version.
"""

from __future__ import annotations

import dataclasses
import importlib
import sqlite3

import pytest

from esa import kinds
from esa.executors import resolved_config, run_key, run_study
from esa.report.study_report import load_runs, version_warnings
from esa.study import expand, parse_study
from esa.store import sha256_json

FP = {"model_id": "m", "revision": "sha256:1", "source": "/here"}


@pytest.fixture
def bump(monkeypatch):
    """bump(kind, version): this ESA makes ``version`` of ``kind`` for the rest of the test."""
    def set_version(name: str, version: int) -> None:
        module = importlib.import_module(kinds.KIND_MODULES[name])
        monkeypatch.setattr(module, "KIND", dataclasses.replace(module.KIND, version=version))
        kinds.get.cache_clear()
    yield set_version
    monkeypatch.undo()
    kinds.get.cache_clear()


def _study(d):
    return parse_study({"name": "v", "models": [str(d / "model")], "datasets": [str(d / "corpus.txt")],
                        "context_lens": [32], "seeds": [0], "max_eval_tokens": 62, "batch_tokens": 512})


def test_every_kind_has_a_version_and_it_is_in_the_run_id(tiny_study_dir, bump):
    run = expand(_study(tiny_study_dir))[0]
    config = resolved_config(run, FP)
    assert config["kind_version"] == kinds.get("baseline").version
    before = run_key(run, FP)
    assert before == sha256_json({"config": config, "model": {k: v for k, v in FP.items() if k != "source"}})
    bump("baseline", 99)
    assert run_key(run, FP) != before


def test_a_version_bump_recomputes_and_the_report_flags_old_rows(make_study_dir, bump):
    d = make_study_dir("versions")
    db = d / "v.db"
    first = run_study(_study(d), db)
    assert first.ok and first.completed == first.total == 1
    runs, _ = load_runs(db)
    assert version_warnings(runs) == []
    bump("baseline", 99)
    second = run_study(_study(d), db)
    assert second.completed == 1 and second.skipped == 0  # the old row is not reused
    runs, _ = load_runs(db)
    (warning,) = version_warnings(runs)
    assert "baseline runs: 1 by version 2, 1 by version 99" in warning and "this ESA makes version 99" in warning


def test_rows_stored_before_versions_count_as_version_one(make_study_dir):
    d = make_study_dir("unversioned")
    db = d / "v.db"
    assert run_study(_study(d), db).ok
    with sqlite3.connect(db) as con:  # what an older ESA stored: no kind_version in the config
        con.execute("UPDATE runs SET config = json_remove(config, '$.kind_version')")
    runs, _ = load_runs(db)
    assert "kind_version" not in runs[0].config
    (warning,) = version_warnings(runs)
    assert "1 by version 1" in warning
