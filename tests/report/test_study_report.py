"""The study report (`esa report study.db`): numbers equal the database, HTML is self-contained, bad paths fail."""

from __future__ import annotations

import base64
import re
import shutil
import sqlite3

import numpy as np
import pytest
from scipy import stats as sps

from esa.cli import main
from esa.executors import run_study
from esa import kinds
from esa.store import RunRecord, Store
from esa.study import parse_study
from helpers.report_parsing import html_parts, md_tables


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_dir(make_study_dir, python_docs):
    """The tiny Llama and a corpus of 6 python-docs documents next to it."""
    return make_study_dir("tiny", "\n\n".join(python_docs.documents[:6]))


@pytest.fixture(scope="module")
def study_db(tiny_dir, tmp_path_factory):
    """Two studies of the tiny model: 2 contexts × 3 seeds on sampled windows, and one whole-split cell."""
    db = tmp_path_factory.mktemp("db") / "study.db"
    base = {"models": [str(tiny_dir / "model")], "datasets": [str(tiny_dir / "corpus.txt")], "batch_tokens": 512}
    sampled = parse_study({**base, "name": "sampled", "context_lens": [32, 64], "seeds": [0, 1, 2],
                           "max_eval_tokens": 128})
    whole = parse_study({**base, "name": "whole", "context_lens": [128], "seeds": [0], "max_eval_tokens": None})
    assert run_study(sampled, db).ok and run_study(whole, db).ok
    return db


def _comparison(name, mean, lo, hi, p, collapsed=False, ppl_ratio=1.5):
    return {"name": name, "against": name.split(" vs ")[1], "mean_delta_nll": mean, "ci_low": lo, "ci_high": hi,
            "ppl_ratio": ppl_ratio, "ppl_perturbed": "inf" if collapsed else 30.0, "p_wilcoxon": p,
            "p_wilcoxon_holm": min(1.0, 3 * p) if p == p else float("nan"), "collapsed": collapsed}


@pytest.fixture(scope="module")
def mixed_db(study_db, tmp_path_factory):
    """The study db plus hand-written rows: a failed run, a perturbation run and a sensitivity run."""
    db = tmp_path_factory.mktemp("mixed") / "mixed.db"
    shutil.copy(study_db, db)
    comps = [_comparison("target vs baseline", 0.8123, 0.7012, 0.9345, 1e-5, ppl_ratio=2.2531),
             _comparison("random_k vs baseline", 0.0011, -0.0021, 0.0042, 0.4),
             _comparison("target vs random_k", 0.0101, -0.0031, 0.0233, 0.2),
             _comparison("bottom_k vs baseline", float("nan"), float("nan"), float("nan"), float("nan"), True)]
    cfg = {"kind": "perturbation", "model": {"name": "m"}, "target": "superweights", "op": "zero", "bottom": False,
           "kind_version": kinds.get("perturbation").version}
    metrics = {"perplexity": 30.0, "comparisons": {c.pop("name"): c for c in comps}}  # as esa.executors stores
    with Store(db) as store:
        store.commit_run(RunRecord("f1", "baseline", {"kind": "baseline", "model": {"name": "m"}, "dataset": "d",
                                                      "context_len": 4096, "seed": 0,
                                                      "kind_version": kinds.get("baseline").version}, {}, {}, {},
                                   "failed", "t0", "t1", error="context 4096 exceeds the model's 512 positions"))
        store.commit_run(RunRecord("p1", "perturbation", cfg, {}, {}, metrics, "completed",
                                   "t2", "t3"))
        store.commit_run(RunRecord("s1", "sensitivity", {"kind": "sensitivity", "model": {"name": "m"},
                                                         "scorer": "magnitude",
                                                         "kind_version": kinds.get("sensitivity").version},
                                   {}, {}, {"tail": {"top_0.1pct_share": 0.0421}, "k": 100}, "completed", "t4", "t5"))
    return db


# --------------------------------------------------------------------------------------------- parsing
def _pm(cell: str) -> tuple[float, float]:
    mean, half = re.fullmatch(r"(\S+) ± (\S+)", cell).groups()
    return float(mean), float(half)


def _log_t_interval(x: np.ndarray) -> tuple[float, float]:
    """exp of the t-interval of log(x): the perplexity CI across seeds, computed here with scipy."""
    logs = np.log(x)
    return tuple(np.exp(sps.t.interval(0.95, len(x) - 1, loc=logs.mean(), scale=sps.sem(logs))))


def _expected_cells(db) -> dict[tuple, dict]:
    """Mean and t-based CI half-width per (ctx) straight from the `results` view (independent of the report).

    Perplexity: (geometric mean, (low, high) of the log-scale interval), or (value, None) for one seed."""
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT context_len, seed, perplexity, token_accuracy, bits_per_byte, scored_tokens, "
                           "seed_invariant FROM results WHERE kind = 'baseline' AND status = 'completed'").fetchall()
    out = {}
    for ctx in sorted({r[0] for r in rows}):
        cell = [r for r in rows if r[0] == ctx]
        exp = {"seeds": sorted(r[1] for r in cell), "tokens": sum(r[5] for r in cell),
               "invariant": all(r[6] for r in cell)}
        for i, key in ((2, "perplexity"), (3, "token_accuracy"), (4, "bits_per_byte")):
            x = np.array([r[i] for r in cell], dtype=float)
            half = sps.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else None
            exp[key] = (x.mean(), half)
            if key == "perplexity":
                exp[key] = (sps.gmean(x), _log_t_interval(x) if len(x) > 1 else None)
        out[ctx] = exp
    return out


# ---------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def clean_report(study_db, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert main(["report", str(study_db), "--out", str(out)]) == 0
    return (out / "report.md").read_text(), (out / "report.html").read_text(), out


def _check_baseline_table(table: list[list[str]], expected: dict) -> None:
    header, rows = table[0], table[1:]
    col = {h: i for i, h in enumerate(header)}
    assert sorted(int(r[col["ctx"]]) for r in rows) == sorted(expected)
    for r in rows:
        exp = expected[int(r[col["ctx"]])]
        assert int(r[col["scored tokens"]].replace(",", "")) == exp["tokens"]
        assert [int(s) for s in re.findall(r"^\d+|(?<=, )\d+", r[col["seeds"]])] == exp["seeds"]
        assert ("seed-invariant" in r[col["seeds"]]) == bool(exp["invariant"])
        gmean, bounds = exp["perplexity"]
        assert float(r[col["perplexity (geometric mean)"]]) == pytest.approx(gmean, abs=6e-4)
        for key, digits in (("token accuracy", 4), ("bits/byte", 4)):
            mean, half = exp[key.replace(" ", "_").replace("/", "_per_")]
            if half is None:
                assert float(r[col[key]]) == pytest.approx(mean, abs=0.6 * 10 ** -digits)
            else:
                got_mean, got_half = _pm(r[col[key]])
                assert got_mean == pytest.approx(mean, abs=0.6 * 10 ** -digits)
                assert got_half == pytest.approx(half, abs=0.6 * 10 ** -digits)
        if bounds:
            lo, hi = map(float, re.findall(r"[-\d.]+", r[col["perplexity 95% CI"]]))
            assert (lo, hi) == (pytest.approx(bounds[0], abs=6e-4), pytest.approx(bounds[1], abs=6e-4))


def test_report_numbers_equal_the_database(clean_report, study_db):
    md, page, _ = clean_report
    expected = _expected_cells(study_db)
    assert len(expected) == 3 and expected[128]["invariant"] and len(expected[32]["seeds"]) == 3
    md_table = md_tables(md)[0]
    html_table = html_parts(page).tables[0]
    assert md_table == html_table  # one block list renders both files
    _check_baseline_table(md_table, expected)
    assert "Warnings (0)" in md and "None of the 7 run(s) failed" in md
    assert "2 studies (sampled, whole)" in md and "baseline (7)" in md
    assert "Causal validation" not in md and "Sensitivity" not in md  # no such runs → no such sections
    p32, p64 = expected[32]["perplexity"][0], expected[64]["perplexity"][0]
    p128 = expected[128]["perplexity"][0]
    trend = "falls" if p128 < p32 else "rises"
    assert f"(chunks), mean perplexity {trend} from {p32:.3f} at context 32 to {p128:.3f} at context 128" in md
    lo, hi = expected[64]["perplexity"][1]
    assert f"ctx 64: 3 seeds resample the windows; the 95 % CI of perplexity is [{lo:.3f}, {hi:.3f}], " \
           f"the geometric mean ×/÷ {hi / p64:.4g}." in md.replace("\\[", "[").replace("\\]", "]")


def test_html_is_self_contained(clean_report):
    md, page, out = clean_report
    parts = html_parts(page)
    assert parts.imgs and all(src.startswith("data:image/png;base64,") for src in parts.imgs)
    for src in parts.imgs:
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [link for link in parts.links if not link.startswith("data:")]
    assert not re.search(r"https?://|<script|<link|@import|url\(", page, re.I)
    assert "](baseline_perplexity.png)" in md and (out / "baseline_perplexity.png").read_bytes()[:4] == b"\x89PNG"


def test_warnings_failed_collapsed_and_kind_sections(mixed_db, tmp_path):
    assert main(["report", str(mixed_db), "--out", str(tmp_path)]) == 0
    md, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    warn = md.split("## Warnings (3)")[1].split("\n## ")[0]
    assert "run failed — context 4096 exceeds the model's 512 positions" in warn
    assert "'bottom_k vs baseline' collapsed the model (perturbed perplexity inf)" in warn
    assert "'target vs random_k' is not significant (Holm-adjusted Wilcoxon p = 0.6 ≥ 0.05)" in warn
    assert md.index("## Warnings") < md.index("## Executive summary") < md.index("## Sensitivity") \
        < md.index("## Causal validation")
    tables = md_tables(md)
    assert tables == html_parts(page).tables
    causal = next(t for t in tables if t[0][1] == "comparison")
    rows = {r[1]: r for r in causal[1:]}
    assert rows["target vs baseline"][2:] == ["+0.8123", "[+0.7012, +0.9345]", "2.253", "3e-05", "no"]
    assert rows["bottom_k vs baseline"][2] == "+nan" and rows["bottom_k vs baseline"][-1] == "yes"
    assert "multiplies perplexity by 2.253" in md and "difference is not significant at α = 0.05" in md
    sens = next(t for t in tables if t[0] == ["run", "metric", "value"])
    assert {tuple(r[1:]) for r in sens[1:]} == {("k", "100"), ("tail.top_0.1pct_share", "0.0421")}
    assert "1 failed" in md and "perturbation (1)" in md


def test_study_filter_and_one_line_errors(study_db, tmp_path, capsys):
    assert main(["report", str(study_db), "--study", "whole", "--out", str(tmp_path / "w")]) == 0
    table = md_tables((tmp_path / "w" / "report.md").read_text())[0]
    assert [r[3] for r in table[1:]] == ["128"]
    foreign = tmp_path / "other.db"
    with sqlite3.connect(foreign) as con:
        con.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    before = foreign.read_bytes()
    capsys.readouterr()
    cases = [([str(foreign)], "not an ESA results database"), ([str(tmp_path / "missing.db")], "does not exist"),
             ([str(study_db), "--study", "nope"], "no runs of study 'nope'"),
             ([str(study_db), str(tmp_path)], "pass one results database")]
    for argv, wanted in cases:
        assert main(["report", *argv, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert wanted in err and err.count("\n") == 1, err
    assert foreign.read_bytes() == before and not (tmp_path / "x").exists()


def test_a_baseline_out_dir_gets_the_study_report_of_its_database(tiny_dir, tmp_path, capsys):
    """`esa report OUT` (or OUT/<model>) renders the esa.db that `esa baseline --out-dir OUT` wrote; a run
    directory of the pre-engine command, without a database, is refused in one line naming the remedy."""
    model = tiny_dir / "model"
    out = tmp_path / "runs"
    assert main(["--no-progress", "baseline", "--model", str(model), "--datasets", str(tiny_dir / "corpus.txt"),
                 "--context-lens", "32", "--seeds", "0", "--max-eval-tokens", "64", "--batch-tokens", "512",
                 "--out-dir", str(out)]) == 0
    for arg, rep in ((out, tmp_path / "rep"), (out / model.name, tmp_path / "rep2")):
        assert main(["report", str(arg), "--out", str(rep)]) == 0
        assert (rep / "report.html").is_file() and not (rep / "baseline_report.md").exists()
        assert "## Executive summary: baselines" in (rep / "report.md").read_text()
    legacy = tmp_path / "legacy"
    shutil.copytree(out / model.name, legacy / model.name)
    capsys.readouterr()
    for arg in (legacy, legacy / model.name):
        assert main(["report", str(arg), "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert "without a results database (esa.db)" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------- audit issue 10: intervals that can be trusted
def _baseline_record(seed: int, ppl: float) -> RunRecord:
    cfg = {"kind": "baseline", "model": {"name": "m", "dtype": "float32"}, "dataset": "d", "context_len": 64,
           "method": "chunks", "seed": seed}
    metrics = {"perplexity": ppl, "token_accuracy": 0.3, "bits_per_byte": 1.1, "seed_invariant": False,
               "scored_tokens": 512, "n_nonfinite_windows": 0}
    return RunRecord(f"b{seed}", "baseline", cfg, {}, {}, metrics, "completed", "t0", "t1")


@pytest.fixture(scope="module")
def spread_report(tmp_path_factory):
    """Two baseline seeds with PPL 3 and 80 (linear t-interval ≈ [-448, 531]) and a 5-window perturbation run."""
    out = tmp_path_factory.mktemp("spread")
    comps = {"target vs baseline": {**_comparison("target vs baseline", 0.8, 0.5, 1.1, 0.03), "n_windows": 5,
                                    "few_windows": True, "ci_method": "bootstrap-t"}}
    comps["target vs baseline"].pop("name")
    pert = RunRecord("p5", "perturbation", {"kind": "perturbation", "model": {"name": "m"}, "target": "superweights"},
                     {}, {}, {"perplexity": 30.0, "comparisons": comps}, "completed", "t2", "t3")
    with Store(out / "spread.db") as store:
        for rec in (_baseline_record(0, 3.0), _baseline_record(1, 80.0), pert):
            store.commit_run(rec)
    assert main(["report", str(out / "spread.db"), "--out", str(out)]) == 0
    return (out / "report.md").read_text()


def test_perplexity_bounds_are_positive_log_scale_intervals(spread_report):
    """Regression (defect 3): the report showed 41.500 ± 489.189 and CI [-447.689, 530.689] for these seeds."""
    (row,) = md_tables(spread_report)[0][1:]
    header = md_tables(spread_report)[0][0]
    col = {h: i for i, h in enumerate(header)}
    logs = np.log([3.0, 80.0])
    want = np.exp(sps.t.interval(0.95, 1, loc=logs.mean(), scale=sps.sem(logs)))
    lo, hi = map(float, re.fullmatch(r"\[(\S+), (\S+)\]", row[col["perplexity 95% CI"]]).groups())
    assert (lo, hi) == (pytest.approx(want[0], rel=1e-3), pytest.approx(want[1], rel=1e-3)) and lo > 0
    assert float(row[col["perplexity (geometric mean)"]]) == pytest.approx(np.sqrt(240), abs=6e-4)
    summary = spread_report.split("## Executive summary")[1].split("\n## ")[0]
    assert not re.search(r"(?<!e)-\d", summary), "a perplexity bound or value below zero"  # e-08 is no sign


def test_few_windows_are_warned_and_the_method_named(spread_report):
    warn = spread_report.split("## Warnings")[1].split("\n## ")[0]
    assert "1 of 1 comparison(s) have fewer than 8 windows (5 windows)" in warn
    causal = spread_report.split("## Causal validation")[1].split("\n## ")[0]
    assert "studentized bootstrap (bootstrap-t) 95 % CI" in causal
    (table,) = md_tables(causal)
    assert table[1][3] == "[+0.5000, +1.1000] †"
