"""esa.tracking without mlflow or wandb (unit tier, in make test): what a tracked run's params and metrics are,
the one-line errors (unknown tracker, missing extra), and that a tracker never stops a study."""

from __future__ import annotations

import argparse
import logging
import math
import subprocess
import sys

import numpy as np
import pytest

from esa.core.errors import EsaError
from esa.store import RunRecord
from esa.tracking import (INSTALL, PARAM_LIMIT, MlflowTracker, WandbTracker, flat_metrics, flat_params,
                          from_args, make_trackers, tracked)


def test_params_are_the_config_flattened_to_dotted_string_values():
    config = {"model": {"name": "m", "revision": None, "dtype": "fp32"}, "seeds": [0, 1], "dataset": "d",
              "fit": {}, "k": 10, "on": True, "x": 0.5, "depends_on": {"ranking": "ab12"}}
    assert flat_params(config) == {"model.name": "m", "model.revision": "null", "model.dtype": "fp32",
                                   "seeds": "[0,1]", "dataset": "d", "fit": "{}", "k": "10", "on": "true",
                                   "x": "0.5", "depends_on.ranking": "ab12"}


def test_a_long_value_is_cut_to_mlflows_limit_and_odd_key_characters_are_replaced():
    flat = flat_params({"targets": ["w" * 50] * 200, "a:b/c": {"d e": 1}})
    assert len(flat["targets"]) == PARAM_LIMIT and flat["targets"].endswith("...[truncated]")
    assert flat["a_b_c.d e"] == "1"
    assert flat_params({"t": "é" * PARAM_LIMIT})["t"] == "é" * PARAM_LIMIT  # characters, not bytes: kept whole


def test_metrics_are_the_finite_numbers_and_non_finite_ones_are_set_aside():
    metrics = {"perplexity": 12.5, "scored_tokens": 62, "batch_sizes": [2, 4], "peak_memory": {"rss": 1e9},
               "mfu": None, "ok": True, "source": "file:x", "ppl_after": math.inf, "fit": {"alpha": "nan"},
               "low": -math.inf, "rounds": [{"layers": [{"max_input": 0.25}]}]}
    finite, nonfinite = flat_metrics(metrics)
    assert finite == {"perplexity": 12.5, "scored_tokens": 62.0, "batch_sizes.0": 2.0, "batch_sizes.1": 4.0,
                      "peak_memory.rss": 1e9, "rounds.0.layers.0.max_input": 0.25}
    assert nonfinite == {"ppl_after": "inf", "fit.alpha": "nan", "low": "-inf"}  # "nan": as the store writes it


def test_a_fresh_record_flattens_as_its_stored_row_does():
    """The executor's record may hold tuples and numpy scalars; the stored row holds their JSON."""
    fresh = {"rounds": ({"layer": np.int64(3), "max": np.float32(0.5)},), "ci": (np.float64(0.1), 0.9)}
    assert flat_metrics(fresh)[0] == {"rounds.0.layer": 3.0, "rounds.0.max": 0.5, "ci.0": 0.1, "ci.1": 0.9}
    assert flat_params({"bits": ("sign", "exponent_msb"), "k": np.int64(4)}) == \
        {"bits": '["sign","exponent_msb"]', "k": "4"}


def test_an_unknown_tracker_is_one_line_with_the_near_match_and_the_valid_names(tmp_path):
    with pytest.raises(EsaError) as err:
        make_trackers(["mlflow,wandb", "mlfow"], tmp_path / "esa.db")
    assert str(err.value) == "unknown tracker 'mlfow'. Did you mean 'mlflow'? Valid trackers: mlflow, wandb."


def test_the_cli_rejects_an_unknown_tracker_before_running_anything(tmp_path, capsys):
    from esa.cli import main

    assert main(["superweights", "--model", str(tmp_path / "m"), "--out-dir", str(tmp_path / "o"),
                 "--track", "wandbb"]) == 2
    assert "unknown tracker 'wandbb'. Did you mean 'wandb'?" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_trackers_by_name_with_their_default_stores_beside_the_database(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    mlflow, wandb = make_trackers(["mlflow", "wandb", "mlflow"], tmp_path / "runs" / "esa.db", project="p")
    assert isinstance(mlflow, MlflowTracker) and isinstance(wandb, WandbTracker)
    assert mlflow.uri == f"sqlite:///{tmp_path.resolve()}/runs/mlflow.db" and mlflow.experiment == "p"
    assert wandb.project == "p" and wandb.dir == (tmp_path / "runs").resolve()
    (given,) = make_trackers(["mlflow"], tmp_path / "esa.db", uri="http://127.0.0.1:5000")
    assert given.uri == "http://127.0.0.1:5000"


def test_a_missing_package_names_the_install_command(monkeypatch):
    for module in ("mlflow", "wandb"):
        monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(EsaError, match=r"--track mlflow needs the mlflow package: pip install 'esa\[tracking\]'"):
        MlflowTracker("sqlite:///x.db").start()
    with pytest.raises(EsaError, match=r"--track wandb needs the wandb package") as err:
        WandbTracker().start()
    assert INSTALL in str(err.value)


def test_without_track_the_callback_is_unchanged_and_nothing_is_imported():
    code = ("import argparse, sys\nfrom esa.tracking import from_args\n"
            "f = print\nassert from_args(argparse.Namespace(track=[]), f, 'x.db') is f\n"
            "assert not {'mlflow', 'wandb'} & set(sys.modules), sorted(sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert from_args(argparse.Namespace(), print, "x.db") is print  # a command without the flags


class Fake:
    def __init__(self, name, fail_start=False, fail_log=False):
        self.name, self.fail_start, self.fail_log, self.calls = name, fail_start, fail_log, []

    def start(self):
        self.calls.append("start")
        if self.fail_start:
            raise EsaError("bad uri")

    def log_run(self, record, label, artifacts):
        self.calls.append(("log", label, artifacts))
        if self.fail_log:
            raise RuntimeError("server down")

    def close(self):
        self.calls.append("close")


RECORD = RunRecord("ab" * 32, "baseline", {"seed": 0}, {}, {}, {"ppl": 2.0}, "completed", "2026-01-01T00:00:00+00:00",
                   "2026-01-01T00:00:01+00:00")


def test_a_tracker_that_cannot_log_warns_and_the_study_goes_on(tmp_path, caplog):
    seen, broken, good = [], Fake("broken", fail_log=True), Fake("good")
    with tracked(lambda kind, **info: seen.append(kind), [broken, good], tmp_path / "esa.db") as on_event:
        on_event("group", model="m", pending=1, completed=0)
        with caplog.at_level(logging.WARNING, logger="esa.tracking"):
            on_event("run", record=RECORD, label="m seed=0", done=1, total=1)
    assert seen == ["group", "run"]
    folder = tmp_path / "artifacts" / RECORD.run_id
    assert good.calls == ["start", ("log", "m seed=0", folder), "close"]
    assert "broken could not track run m seed=0 (abababababab): server down" in caplog.text


def test_a_tracker_that_cannot_start_fails_at_once_and_closes_those_started():
    first, second = Fake("first"), Fake("second", fail_start=True)
    with pytest.raises(EsaError, match="bad uri"):
        tracked(print, [first, second])
    assert first.calls == ["start", "close"]
    assert tracked(print, []) is print
