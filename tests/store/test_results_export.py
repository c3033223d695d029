"""`esa results` exports, wide and long: non-finite metrics come back as float NaN/±Inf (float64 columns), and
the long format has one row per run × numeric metric leaf."""

import math

import numpy as np
import pandas as pd
import pytest

from esa.cli import main
from esa.store import RunRecord, Store, export
from esa.store.reader import numeric_leaves

INF = math.inf
# run "bad": every non-finite kind, at the top level, nested in a dict and inside a list; a flag and a string
BAD = {"perplexity": math.nan, "nll": INF, "delta": -INF, "acc": 0.5, "n_items": 6,
       "fit": {"alpha": math.nan, "beta": 2.0}, "ci": [0.1, INF], "seed_invariant": True, "note": "x"}
GOOD = {"perplexity": 3.5, "nll": 1.25, "delta": 0.0, "acc": 1.0, "n_items": 6,
        "fit": {"alpha": 0.7, "beta": 2.0}, "ci": [0.2, 0.3], "seed_invariant": False, "note": "y"}
N_LEAVES = 9  # perplexity nll delta acc n_items fit.alpha fit.beta ci.0 ci.1 (flags and strings are not numbers)


def _record(rid: str, metrics: dict, status: str = "completed") -> RunRecord:
    config = {"kind": "baseline", "model": {"name": "tiny", "dtype": "fp32"}, "dataset": "wiki", "context_len": 32,
              "seed": 0, "kind_version": 1}
    return RunRecord(rid, "baseline", config, {"model_id": "tiny", "dtype": "fp32"}, {"git_sha": "x"}, metrics,
                     status, f"2025-01-01T00:00:0{len(rid)}", "2025-01-01T00:01:00", error=None if metrics else "boom")


@pytest.fixture()
def db(tmp_path):
    path = tmp_path / "r.db"
    with Store(path) as store:
        store.commit_run(_record("bad", BAD))
        store.commit_run(_record("good", GOOD))
        store.commit_run(_record("failed", {}, status="failed"))
    return path


def _read(path):
    return pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)


def test_numeric_leaves_are_dotted_and_decode_the_stored_strings():
    got = list(numeric_leaves({"acc": 0.5, "ci": [0.1, 0.9], "fit": {"alpha": "nan"}, "ok": True, "s": "x"}))
    assert [n for n, _ in got] == ["acc", "ci.0", "ci.1", "fit.alpha"]
    assert got[:3] == [("acc", 0.5), ("ci.0", 0.1), ("ci.1", 0.9)] and math.isnan(got[3][1])
    assert list(numeric_leaves({"a": "inf", "b": "-inf", "c": 3})) == [("a", INF), ("b", -INF), ("c", 3.0)]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_wide_export_has_float64_columns_with_the_non_finite_values(db, tmp_path, suffix):
    out = tmp_path / f"wide{suffix}"
    assert export(db, out) == 3
    frame = _read(out).set_index("run_id")
    for col in ("perplexity", "nll", "delta", "acc", "fit.alpha", "fit.beta"):
        assert frame[col].dtype == np.float64, col
    bad = frame.loc["bad"]
    assert math.isnan(bad["perplexity"]) and bad["nll"] == INF and bad["delta"] == -INF
    assert math.isnan(bad["fit.alpha"]) and bad["acc"] == 0.5
    assert frame.loc["good", "perplexity"] == 3.5 and math.isnan(frame.loc["failed", "perplexity"])
    assert frame.loc["bad", "ci"] == '[0.1, "inf"]'  # a list stays its stored JSON


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_long_export_has_one_float64_row_per_numeric_leaf(db, tmp_path, suffix):
    out = tmp_path / f"long{suffix}"
    assert main(["results", str(db), "--out", str(out), "--long"]) == 0
    frame = _read(out)
    assert len(frame) == 2 * N_LEAVES  # the failed run has no metrics, so no rows
    assert frame["value"].dtype == np.float64
    assert list(frame.columns[:4]) == ["run_id", "kind", "model", "dtype"] and list(frame.columns[-2:]) == \
        ["metric", "value"]
    assert {"config.dataset", "config.context_len", "config.seed"} <= set(frame.columns)
    assert set(frame["model"]) == {"tiny"} and set(frame["config.context_len"]) == {32}
    value = frame.set_index(["run_id", "metric"])["value"]
    assert math.isnan(value["bad", "perplexity"]) and math.isnan(value["bad", "fit.alpha"])
    assert value["bad", "nll"] == INF and value["bad", "delta"] == -INF and value["bad", "ci.1"] == INF
    assert value["good", "fit.alpha"] == 0.7 and value["good", "n_items"] == 6.0
    assert not {"seed_invariant", "note"} & set(frame["metric"])
    wide = export(db, tmp_path / "w.csv")
    assert wide == 3  # the same database, wide: one row per run


def test_long_export_of_an_unknown_study_is_refused(db, tmp_path):
    assert main(["results", str(db), "--out", str(tmp_path / "x.csv"), "--long", "--study", "nope"]) == 2
