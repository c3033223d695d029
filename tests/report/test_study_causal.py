"""The study report's dose-response and bit-scan sections: figures present, every number equal to the DB's."""

import json
import math
import sqlite3

import pytest

from esa.executors import run_study
from esa.report.html import Bullets, Table
from esa.report.study_causal import DOSE_HEADER, FLIP_HEADER, GREEDY_HEADER
from esa.report.study_report import build_report, load_runs, write_study_report
from esa.study import parse_study

SECTIONS = {
    "sensitivity": {"scorers": ["magnitude"], "k": 8},
    "dose_response": {"targets": [{"name": "top", "ranking": "magnitude"}], "ks": [1, 4],
                      "ops": [{"op": "scale", "values": [0.0, 1000.0]}], "collapse_ppl": 1e6},
    "bitscan": {"targets": [{"name": "top", "ranking": "magnitude"}], "top_n": 2, "bits": ["sign", "exponent_msb"],
                "max_flips": 2, "greedy_pool": 2, "collapse_ppl": 1e6},  # the random model's PPL is ≈ 5e4
}


@pytest.fixture(scope="module")
def report(make_study_dir):
    path = make_study_dir("causal-report")
    study = parse_study({"name": "causal-report", "models": [str(path / "model")],
                         "datasets": [str(path / "corpus.txt")], "context_lens": [32], "seeds": [0],
                         "max_eval_tokens": 128, "batch_tokens": 1024, **SECTIONS})
    assert run_study(study, path / "r.db").ok
    md, page = write_study_report(path / "r.db", path / "out")
    runs, studies = load_runs(path / "r.db")
    return path / "r.db", md, page, build_report(runs, path / "r.db", studies)


def _db_rows(db, kind):
    con = sqlite3.connect(db)
    try:
        return [(json.loads(c), json.loads(m)) for c, m in
                con.execute("SELECT config, metrics FROM runs WHERE kind = ? AND status = 'completed'", (kind,))]
    finally:
        con.close()


def _f(x) -> float:
    return float(x)  # the DB stores non-finite numbers as "nan"/"inf" strings


def _d(x) -> str:
    x = _f(x)
    return f"{x:+.4g}" if math.isfinite(x) else str(x)


def _ppl(x) -> str:
    return f"{_f(x):.3f}" if math.isfinite(_f(x)) else str(_f(x))


def _table(blocks, header):
    return next(b for b in blocks if isinstance(b, Table) and b.header == header)


def _ci(c: dict) -> str:
    """A stored CI as the report shows it: † when the comparison has fewer windows than esa.stats.MIN_WINDOWS."""
    return f"[{_d(c['ci_low'])}, {_d(c['ci_high'])}]" + (" †" if c.get("few_windows") else "")


def test_sections_and_figures_are_written(report):
    _, md, page, _ = report
    text = md.read_text()
    for heading in ("## Causal validation: dose-response", "## Causal validation: bit scans"):
        assert heading in text
        section = text.split(heading)[1].split("\n## ")[0]  # 128 tokens in windows of 32: too few for the CI
        assert "studentized bootstrap (bootstrap-t) 95 % CI" in section and "fewer than 8 windows" in section
    for name in ("dose_response.png", "dose_vs_k.png", "bitscan_greedy.png"):
        assert f"]({name})" in text and (md.parent / name).read_bytes().startswith(b"\x89PNG")
    assert page.read_text().count("data:image/png;base64,") >= 5  # + baseline and sensitivity figures


def test_dose_table_equals_the_db(report):
    db, _, _, blocks = report
    rows = set(_table(blocks, DOSE_HEADER).rows)
    stored = _db_rows(db, "dose_response")
    assert len(stored) == 2 and len(rows) == 2 * 2 * 2  # 2 runs (k = 1, 4) × 2 values × 2 arms
    for config, m in stored:
        for row in m["rows"]:
            for arm in ("target", "random_k"):
                c = m["comparisons"][row[arm]]
                cells = (f"{m['parameter']}={row['value']}", arm, _d(c["mean_delta_nll"]),
                         _ci(c), _ppl(c["ppl_perturbed"]),
                         f"{_f(c['ppl_ratio']):.4f}", f"{_f(c['p_wilcoxon_holm']):.3g}",
                         "yes" if c["collapsed"] else "no")
                match = [r for r in rows if f"top-{config['k']}" in r[0] and r[1:] == cells]
                assert len(match) == 1, (config["k"], row["value"], arm, cells)


def test_dose_sentences_follow_the_db(report):
    db, _, _, blocks = report
    text = " ".join(s for b in blocks if isinstance(b, Bullets) for s in b.items)
    for config, m in _db_rows(db, "dose_response"):
        target = [m["comparisons"][r["target"]] for r in m["rows"]]
        low = min(target, key=lambda c: _f(c["mean_delta_nll"]))
        assert f"top-{config['k']}" in text and f"ranges from {_d(low['mean_delta_nll'])}" in text


def test_bitscan_tables_sentences_and_warnings_equal_the_db(report):
    db, md, _, blocks = report
    (config, m), = _db_rows(db, "bitscan")
    flips = _table(blocks, FLIP_HEADER).rows
    assert len(flips) == len(m["comparisons"]) == 4
    for name, c in m["comparisons"].items():
        row = next(r for r in flips if r[1] == name)
        assert row[3:] == (_d(c["mean_delta_nll"]), _ci(c),
                           _ppl(c["ppl_perturbed"]), "yes" if c["collapsed"] else "no")
    g = m["greedy"]
    (greedy,) = _table(blocks, GREEDY_HEADER).rows
    assert greedy[3] == str(len(g["steps"])) and greedy[4] == (str(g["n_flips"]) if g["collapsed"] else
                                                               f"none within {len(g['steps'])}")
    text = md.read_text()
    warnings = text.split("## Executive summary")[0]
    collapsed = [n for n, c in m["comparisons"].items() if c["collapsed"]]
    assert collapsed, "an exponent flip of the random model should collapse it"
    assert "collapsed the model" in warnings and str(len(collapsed)) + " of 4 single flips collapse" in text
    if g["collapsed"]:
        assert f"{g['n_flips']} flip(s) collapse the model" in text
