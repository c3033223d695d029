"""The study report's Sensitivity section: every number equals the db rows or the ranking parquet files.

A tiny study (random 2-layer Llama, magnitude + grad_x_weight, calibration seeds 0 and 1) is run into a
database; the expected values are computed here straight from the rows and the parquet files (pandas + scipy),
independently of esa.sensitivity.stability.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from esa.cli import main
from esa.executors import run_study
from esa.study import parse_study
from helpers.report_parsing import html_parts, md_tables

K = 32


@pytest.fixture(scope="module")
def sens_db(make_study_dir):
    """Baselines + sensitivity runs (magnitude: seed 0 only, data-free; grad_x_weight: seeds 0 and 1)."""
    path = make_study_dir("sens")
    study = parse_study({"name": "sens", "models": [str(path / "model")], "datasets": [str(path / "corpus.txt")],
                         "context_lens": [32], "seeds": [0, 1], "max_eval_tokens": 64, "batch_tokens": 1024,
                         "sensitivity": {"scorers": ["magnitude", "grad_x_weight"], "k": K,
                                         "calibration_tokens": 64}})
    db = path / "db" / "s.db"
    summary = run_study(study, db)
    assert summary.ok and summary.completed == 5, summary
    return db


@pytest.fixture(scope="module")
def report(sens_db, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert main(["report", str(sens_db), "--out", str(out)]) == 0
    return (out / "report.md").read_text(), (out / "report.html").read_text(), out


# ------------------------------------------------------------------------------------------- helpers
def sens_rows(db) -> dict[tuple[str, int], dict]:
    """(scorer, seed) → {config, metrics, table} of the completed sensitivity runs, read directly."""
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT config, metrics FROM runs WHERE kind = 'sensitivity' AND status = 'completed'")
        out = {}
        for cfg, met in rows.fetchall():
            cfg, met = json.loads(cfg), json.loads(met)
            out[(cfg["scorer"], cfg["seed"])] = {"config": cfg, "metrics": met,
                                                 "table": pd.read_parquet(db.parent / met["ranking_file"])}
    return out


def keys(table: pd.DataFrame) -> set[tuple]:
    return set(zip(table["param"], table["row"], table["col"].fillna(-1).astype(int)))


def ranks(table: pd.DataFrame) -> dict[tuple, int]:
    return dict(zip(zip(table["param"], table["row"], table["col"].fillna(-1).astype(int)), table["rank"]))


def table_with(tables, first_header: str, column: str) -> list[dict]:
    t = next(t for t in tables if t[0][0] == first_header and column in t[0])
    return [dict(zip(t[0], row)) for row in t[1:]]


def mean_half(values: list[float]) -> tuple[float, float | None]:
    x = np.asarray(values, dtype=float)
    half = sps.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else None
    return float(x.mean()), half


def check_cell(cell: str, values: list[float], digits: int) -> None:
    mean, half = mean_half(values)
    got = [float(v) for v in re.findall(r"[-+\d.]+(?:e[-+]?\d+)?", cell)]
    assert got[0] == pytest.approx(mean, abs=0.6 * 10 ** -digits), cell
    if half is None:
        assert len(got) == 1, cell
    else:
        assert got[1] == pytest.approx(half, abs=0.6 * 10 ** -digits), cell


# --------------------------------------------------------------------------------------------- tests
def test_tail_table_equals_the_rows(report, sens_db):
    md, page, _ = report
    runs = sens_rows(sens_db)
    assert sorted(runs) == [("grad_x_weight", 0), ("grad_x_weight", 1), ("magnitude", 0)]
    tables = md_tables(md)
    assert tables == html_parts(page).tables  # one block list renders both files
    rows = {r["scorer"]: r for r in table_with(tables, "model", "Gini bounds")}
    assert set(rows) == {"magnitude", "grad_x_weight"}
    for scorer, row in rows.items():
        tails = [v["metrics"]["tail"] for (s, _), v in sorted(runs.items()) if s == scorer]
        seeds = [seed for (s, seed) in sorted(runs) if s == scorer]
        assert row["k"] == str(K) and row["mode"] == "global" and row["rankings"] == "top"
        assert [int(s) for s in re.findall(r"\d+", row["seeds"])] == seeds
        assert ("seed-invariant" in row["seeds"]) == (scorer == "magnitude")
        assert int(row["weights scored"].replace(",", "")) == tails[0]["n_weights"]
        check_cell(row["top 0.1% share (%)"], [100 * t["top_0.1pct_share"] for t in tails], 2)
        check_cell(row["top 1% share (%)"], [100 * t["top_1pct_share"] for t in tails], 2)
        check_cell(row["Gini"], [t["gini"] for t in tails], 4)
        low, high = map(float, re.findall(r"[\d.]+", row["Gini bounds"]))
        assert low == pytest.approx(min(t["gini_low"] for t in tails), abs=6e-5)
        assert high == pytest.approx(max(t["gini_high"] for t in tails), abs=6e-5)
    gxw = [runs[("grad_x_weight", s)]["metrics"]["tail"]["top_1pct_share"] for s in (0, 1)]
    assert f"the top 1 % of weights hold {100 * np.mean(gxw):.2f} % of the total grad_x_weight score" in md


def test_stability_tables_equal_the_parquet_files(report, sens_db):
    md, page, _ = report
    runs = sens_rows(sens_db)
    tables = md_tables(md)
    (seed_row,) = table_with(tables, "model", "Jaccard min")
    a, b = keys(runs[("grad_x_weight", 0)]["table"]), keys(runs[("grad_x_weight", 1)]["table"])
    assert len(a) == len(b) == K
    jac = len(a & b) / len(a | b)
    assert seed_row["scorer"] == "grad_x_weight" and seed_row["seeds"] == "0, 1" and seed_row["k"] == str(K)
    assert float(seed_row["Jaccard mean"]) == pytest.approx(jac, abs=6e-4) == float(seed_row["Jaccard min"])
    assert f"seeds 0, 1 agree on {jac:.3f} of the top-{K}" in md
    assert "magnitude top-32: seed-invariant" in md

    (scorer_row,) = table_with(tables, "model", "Spearman ρ (union)")
    assert (scorer_row["scorer A"], scorer_row["scorer B"]) == (f"magnitude (k={K})", f"grad_x_weight (k={K})")
    assert scorer_row["seeds"] == "0, 1"  # the data-free ranking is paired with every grad_x_weight seed
    mag = runs[("magnitude", 0)]["table"]
    jaccards, rhos = [], []
    for seed in (0, 1):
        other = runs[("grad_x_weight", seed)]["table"]
        ka, kb = keys(mag), keys(other)
        jaccards.append(len(ka & kb) / len(ka | kb))
        ra, rb = ranks(mag), ranks(other)
        union = sorted(ka | kb)
        rhos.append(sps.spearmanr([ra.get(k, len(mag) + 1) for k in union],
                                  [rb.get(k, len(other) + 1) for k in union]).statistic)
    check_cell(scorer_row["Jaccard"], jaccards, 3)
    check_cell(scorer_row["Spearman ρ (union)"], rhos, 3)


def test_heatmaps_are_embedded_and_described(report, sens_db):
    md, page, out = report
    runs = sens_rows(sens_db)
    figures = re.findall(r"\]\((sensitivity_topk_[^)]+\.png)\)", md)
    assert len(figures) == 2 and all((out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in figures)
    imgs = html_parts(page).imgs
    assert len(imgs) == 3 and all(src.startswith("data:image/png;base64,") for src in imgs)  # + baseline plot
    assert not re.search(r"https?://|<script|<link|@import|url\(", page, re.I)
    for scorer in ("magnitude", "grad_x_weight"):
        table = runs[(scorer, 0)]["table"]
        roles, layers = table["role"].value_counts(), table["layer"].value_counts()
        m = re.search(rf"The {K} weights of {scorer} top-{K} \(global\) on \S+, seed 0 sit mostly in (\w+) "
                      rf"\((\d+) of {K}\) and in layer (\d+) \((\d+) of {K}\)", md)
        assert m, scorer
        assert int(m[2]) == roles.max() == roles[m[1]]
        assert int(m[4]) == layers.max() == layers[int(m[3])]


def test_missing_artifact_is_named_and_left_out(sens_db, tmp_path):
    copy = tmp_path / "db"
    shutil.copytree(sens_db.parent, copy)
    runs = sens_rows(copy / sens_db.name)
    gone = copy / runs[("grad_x_weight", 1)]["metrics"]["ranking_file"]
    gone.unlink()
    assert main(["report", str(copy / sens_db.name), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert f"ranking artifact missing: {gone.resolve()}" in md.replace("\\", "")
    assert "grad_x_weight top-32: 1 seed(s) with a ranking file" in md
    tables = md_tables(md)
    assert not [t for t in tables if "Jaccard min" in t[0]]  # one ranking left: no seed overlap
    (tail,) = [r for r in table_with(tables, "model", "Gini bounds") if r["scorer"] == "grad_x_weight"]
    assert tail["seeds"] == "0, 1"  # the tail statistics live in the row, not the artifact
    assert "seeds 0, 1 agree" not in md
