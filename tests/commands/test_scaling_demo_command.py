"""`esa scaling` and `esa demo` as every other command: the timestamped progress log beside the results database
(``<db>.log``) and ``--track`` (esa.tracking), which reaches the tracker setup with that database and fails in
one line, before any run, when the tracker's package is missing. Tiny random Llama, unit tier."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from esa.cli import main

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")
TINY = ["--max-eval-tokens", "254", "--calib-samples", "2", "--control-seeds", "0", "--n-boot", "200",
        "--device", "cpu"]  # 2 windows of 128 tokens


class Fake:
    """A tracker that records what it was asked to log."""

    name = "fake"

    def __init__(self) -> None:
        self.runs: list[tuple[str, str]] = []

    def start(self) -> None:
        pass

    def log_run(self, record, label, artifacts) -> None:
        self.runs.append((record.kind, label))

    def close(self) -> None:
        pass


@pytest.fixture
def fake(monkeypatch):
    """(tracker, setup): every ``--track`` name builds the one Fake; ``setup`` holds the names and database."""
    tracker, setup = Fake(), {}

    def make(names, db, uri=None, project="esa"):
        setup.update(names=names, db=Path(db))
        return [tracker]

    monkeypatch.setattr("esa.tracking.make_trackers", make)
    return tracker, setup


def _scaling(model, out, *extra) -> list[str]:
    return ["scaling", "--models", str(model), *TINY, "--out-dir", str(out), *extra]


def _demo_study(d: Path) -> Path:
    (d / "s.yaml").write_text(json.dumps({"name": "tiny-demo", "models": ["./model"], "datasets": ["./corpus.txt"],
                                          "context_lens": [32], "seeds": [0], "max_eval_tokens": 62}))
    return d / "s.yaml"


def test_scaling_logs_beside_its_database_and_tracks_each_run(tiny_llama_dir, tmp_path, capsys, fake):
    out = tmp_path / "ladder"
    assert main(_scaling(tiny_llama_dir, out, "--track", "fake")) == 0
    log = (out / "scaling.log").read_text().splitlines()
    assert STAMP.match(log[0]) and "$ esa scaling --models" in log[0]
    assert all(STAMP.match(ln) for ln in log)
    counted = [ln[20:] for ln in log if re.search(r"\[[12]/2\]", ln)]  # the baseline cell and the scaling point
    assert [c[:5] for c in counted] == ["[1/2]", "[1/2]", "[2/2]", "[2/2]"], log  # each started, then finished
    assert counted == [ln[20:] for ln in capsys.readouterr().out.splitlines() if ln[20:] in counted]
    tracker, setup = fake
    assert setup == {"names": ["fake"], "db": out / "scaling.db"}
    assert sorted(kind for kind, _ in tracker.runs) == ["baseline", "scaling_point"]


def test_scaling_logs_beside_a_database_given_by_db(tiny_llama_dir, tmp_path):
    db = tmp_path / "elsewhere" / "ladder.db"
    assert main(_scaling(tiny_llama_dir, tmp_path / "out", "--db", str(db))) == 0
    assert "[2/2]" in (tmp_path / "elsewhere" / "ladder.log").read_text()
    assert not (tmp_path / "out" / "scaling.log").exists()


def test_demo_tracks_each_run_of_its_study(make_study_dir, tmp_path, fake):
    study = _demo_study(make_study_dir("demo_track"))
    out = tmp_path / "demo"
    assert main(["demo", "--study", str(study), "--out-dir", str(out), "--track", "fake"]) == 0
    tracker, setup = fake
    assert setup == {"names": ["fake"], "db": out / "study.db"}
    assert [kind for kind, _ in tracker.runs] == ["baseline"]
    assert "[1/1]" in (out / "study.log").read_text()


@pytest.mark.parametrize("command", ["scaling", "demo"])
def test_track_mlflow_without_mlflow_is_one_line_before_any_run(command, tiny_llama_dir, make_study_dir, tmp_path,
                                                                capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import fails as if not installed
    out = tmp_path / "out"
    argv = _scaling(tiny_llama_dir, out) if command == "scaling" else \
        ["demo", "--study", str(_demo_study(make_study_dir("demo_no_mlflow"))), "--out-dir", str(out)]
    assert main([*argv, "--track", "mlflow"]) == 2
    err = capsys.readouterr().err
    assert "--track mlflow needs the mlflow package: pip install 'esa[tracking]'" in err and err.count("\n") == 1
    assert not out.exists()  # nothing measured, no database, no log
