"""The study report's Scaling section: numbers and fits equal to esa.scaling.fits's on the stored rows, the
log–log figure, one-model ladders, and ladders kept apart by protocol."""

import json
import math
import sqlite3

import pytest

from esa.report.html import Figure, Paragraph, Table
from esa.report.study_report import Run, load_runs, write_study_report
from esa.report.study_scaling import ladders, num, scaling_section
from esa.scaling.fits import fit_power_law, fit_trends

STATS = ["perplexity", "bits_per_byte", "magnitude_top_share"]  # no super-weight search or perturbation
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ladder_db(tmp_path_factory):
    from transformers import AutoTokenizer

    from esa.executors import run_study
    from esa.models import resolve_source
    from esa.study import parse_study
    from esa.models.tiny import tiny_model

    path = tmp_path_factory.mktemp("scaling-report")
    tokenizer = AutoTokenizer.from_pretrained(resolve_source("smollm2-135m")[1])
    for family in ("gpt2", "llama"):  # 3.3M and 6.4M parameters: a fast ladder of two families
        tiny_model(family, seed=1).save_pretrained(path / family)
        tokenizer.save_pretrained(path / family)
    study = parse_study({"name": "ladder", "models": [str(path / "gpt2"), str(path / "llama")],
                         "datasets": ["python-docs"], "context_lens": [128], "max_eval_tokens": 254,
                         "batch_tokens": 4096, "scaling": {"statistics": STATS}})
    assert run_study(study, path / "s.db").ok
    return path / "s.db"


def _db_rows(db) -> list[dict]:
    """The stored scaling rows, read with plain sqlite (model = the study's model name), smallest first."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT config, metrics FROM runs WHERE kind = 'scaling_point'").fetchall()
    finally:
        con.close()
    out = [{**json.loads(m), "model": json.loads(c)["model"]["name"]} for c, m in rows]
    return sorted(out, key=lambda r: r["n_params"])


def test_the_section_shows_the_stored_numbers_and_esa_scalings_fits(ladder_db, tmp_path):
    md_path, html_path = write_study_report(ladder_db, tmp_path / "report")
    md = md_path.read_text()
    section = md[md.index("## Scaling"):]
    rows = _db_rows(ladder_db)
    fits = fit_trends(rows, "n_params", STATS)
    assert set(fits) == set(STATS)
    for key in STATS:
        fit = fits[key]["fit"]
        assert fit is not None and fit["n"] == 2 and fit["slope_ci95"] is None
        assert f"| {num(fit['slope'])} | undefined (2 models) | {num(fit['intercept'])} |" in section
        slope = (math.log10(rows[1][key]) - math.log10(rows[0][key])) / \
                (math.log10(rows[1]["n_params"]) - math.log10(rows[0]["n_params"]))
        assert fit["slope"] == pytest.approx(slope, rel=1e-9)
    for r in rows:
        assert f"| {r['n_params']:,} | {num(r['bits_per_byte'])} | {num(r['perplexity'])} | — |" in section
        assert num(r["magnitude_top_share"]) in section
    assert "2 models: each fitted line passes through both points" in section
    assert "mixed families (gpt2, llama)" in section  # bits per byte, not perplexity, compares them
    assert (tmp_path / "report" / "scaling_ladder_1.png").read_bytes()[:8] == PNG_MAGIC
    page = html_path.read_text()
    assert "<h2>Scaling</h2>" in page and page.count("data:image/png;base64,") >= 2  # baseline + scaling figures


def test_one_model_gets_one_sentence_and_no_fit(ladder_db):
    runs, _ = load_runs(ladder_db)
    one = [r for r in runs if r.model_name.endswith("llama")]
    blocks = scaling_section(one)
    sentences = [b.text for b in blocks if isinstance(b, Paragraph)]
    assert sentences == [f"Only {one[0].model_name} was measured with this protocol, so no trend is fitted: a trend "
                         "needs ≥ 2 models."]
    assert not any(isinstance(b, Figure) for b in blocks)


def _run(model: str, n: float, bpb: float, ctx: int = 128) -> Run:
    config = {"kind": "scaling_point", "model": {"name": model}, "dataset": "d", "context_len": ctx, "seed": 0,
              "max_eval_tokens": 100, "op": "zero", "control_seeds": [0], "tail_fraction": 0.001,
              "x_axis": "n_params", "statistics": ["bits_per_byte", "sw_count"]}
    metrics = {"model": model, "n_params": n, "bits_per_byte": bpb, "sw_count": "nan", "perplexity": 2.0}
    return Run(f"id-{model}-{ctx}", "scaling_point", "completed", None, config, {}, metrics, f"t{n}")


def test_three_models_give_a_slope_ci_and_protocols_stay_apart():
    runs = [_run("a", 1e7, 2.0), _run("b", 1e8, 1.5), _run("c", 1e9, 1.2), _run("a", 1e7, 2.2, ctx=512)]
    found = ladders(runs)
    assert [len(lad["doc"]["rows"]) for lad in found] == [3, 1]
    fit = fit_power_law([1e7, 1e8, 1e9], [2.0, 1.5, 1.2])
    blocks = scaling_section(runs)
    fit_table = next(b for b in blocks if isinstance(b, Table) and b.header[0] == "statistic")
    bpb, sw = fit_table.rows
    assert bpb[2:4] == (num(fit.slope), f"[{num(fit.slope_ci95[0])}, {num(fit.slope_ci95[1])}]")
    assert sw[2] == "—" and "0 usable model(s)" in sw[-1]
    assert "left out: a (no finite, positive value); b (no finite, positive value); c (" in sw[-1]
    assert any(isinstance(b, Paragraph) and "Only a was measured" in b.text for b in blocks)  # ctx 512 ladder
