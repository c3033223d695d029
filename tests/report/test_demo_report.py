"""demo_report.md from hand-written step outputs in the real schemas: every number shown equals the files."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from esa.report.demo_report import TOP_ROWS, write_demo_report
from esa.sensitivity.ranking import COLUMNS, write_ranking

NAMES = ["target vs baseline", "random_k vs baseline", "bottom_k vs baseline", "target vs random_k",
         "random_k vs bottom_k"]
MODEL = {"model_id": "smollm2-135m", "n_params": 134515008, "model_type": "llama",
         "revision": "sha256:b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"}


def _comparison(i: int, name: str, p: float, mean: float) -> dict:
    """One entry of perturb.json "comparisons" (the fields the report reads, odd values to catch rounding)."""
    return {"name": name, "against": name.split(" vs ")[1], "n_windows": 16, "n_tokens": 2032,
            "mean_delta_nll": mean, "ci_low": mean - 0.348214892, "ci_high": mean + 0.41660143,
            "ppl_baseline": 25.3850051899366, "ppl_perturbed": 185.7648509072996 / (i + 1),
            "ppl_ratio": 7.3178969047815094 / (i + 1), "p_wilcoxon": p / 5, "p_wilcoxon_holm": p,
            "collapsed": i == 2, "collapse_ppl": 1000.0}


def _perturb(p_versus: float) -> dict:
    ps = [0.000152587890625, 0.0625, 0.0312, p_versus, 0.5]
    means = [1.9903229786023862, 0.0013114, -0.00051987, 1.9890115786, 0.0018313]
    return {"schema": "esa.perturb/1", "model": MODEL, "notes": ["bottom_k: no ranking given"],
            "data": {"dataset": "python-docs", "n_windows": 16, "scored_tokens": 2032},
            "baseline": {"perplexity": 25.3850051899366, "scored_tokens": 2032},
            "comparisons": [_comparison(i, *row) for i, row in enumerate(zip(NAMES, ps, means))]}


def _superweights() -> dict:
    cands = [{"iteration": it, "param_name": f"model.layers.{layer}.mlp.down_proj.weight", "layer": layer,
              "row": 507, "col": col, "weight": w, "output_activation": y, "share": s}
             for it, layer, col, w, y, s in [(0, 11, 1229, 5.875732421875, 23953.509765625, 0.7342557364334575),
                                             (1, 28, 678, -5.78125, 14340.2, 0.61234)]]
    return {"schema": "esa.superweights/1", "model": MODEL, "candidates": cands, "rounds": [{}, {}],
            "data": {"dataset": "python-docs", "n_sequences": 4, "context_len": 128}}


def _tail(seed: int) -> dict:
    return {"n_weights": 106168320, "n_nonfinite": seed * 3, "score_sum": 1.23, "score_max": 0.01,
            "top_0.1pct_share": 0.0812345 + seed / 100, "top_1pct_share": 0.3123456 + seed / 100,
            "gini": 0.7012345 + seed / 1000, "gini_low": 0.6999876, "gini_high": 0.7024814, "n_zero": 0}


def _sensitivity(root) -> pd.DataFrame:
    """stability.json + manifest.json as run_sensitivity writes them, and a 12-row ranking via write_ranking."""
    sens = root / "sensitivity"
    sens.mkdir()
    calib = {"dataset": "python-docs", "n_windows": 4, "context_len": 128, "seed_invariant": False}
    stab = {"scorer": "grad_x_weight", "k": 100, "mode": "global", "direction": "top", "seed_invariant": False,
            "seeds": [0, 1], "jaccard_pairs": {"0-1": 0.6528925619834711}, "jaccard_mean": 0.6528925619834711,
            "jaccard_min": 0.6528925619834711,
            "per_seed": [{"seed": s, "tail": _tail(s), "calibration": {**calib, "seed": s}, "score_seconds": 1.0,
                          "topk_seconds": 0.1, "stats_seconds": 0.2} for s in (0, 1)]}
    manifest = {"command": "sensitivity", "model": MODEL, "n_selected_params": 210,
                "n_selected_weights": 106168320,
                "config": {"scorer": "grad_x_weight", "calib_dataset": "python-docs", "max_samples": 4,
                           "context_len": 128, "k": 100, "mode": "global", "seeds": [0, 1]}}
    (sens / "stability.json").write_text(json.dumps(stab))
    (sens / "manifest.json").write_text(json.dumps(manifest))
    n = TOP_ROWS + 2
    layers = [11 if i == 1 else i for i in range(n)]  # rank 2 is the first super-weight candidate
    table = pd.DataFrame({
        "param": [f"model.layers.{i}.mlp.down_proj.weight" for i in layers],
        "layer": pd.array([None if i == 3 else i for i in layers], dtype="Int64"),
        "role": ["other" if i == 3 else "mlp_down" for i in layers],
        "row": [507 if i == 1 else 507 + i for i in range(n)],
        "col": pd.array([1229 if i == 1 else None if i == 5 else 10 * i for i in range(n)], dtype="Int64"),
        "score": [0.0123456789 / (i + 1) for i in range(n)],
        "weight": [(-1) ** i * 0.5123456 * (i + 1) for i in range(n)],
        "rank": list(range(1, n + 1))})[COLUMNS]
    write_ranking(table, sens / "ranking", MODEL)
    for png in ("topk_layer_role.png", "score_hist.png"):
        (sens / png).write_bytes(b"png")
    return table


def _build(tmp_path, p_versus: float = 0.003):
    docs = {"superweights/superweights.json": _superweights(), "perturb/perturb.json": _perturb(p_versus),
            "dose_response/dose_response.json": {"schema": "esa.dose_response/1", "parameter": "factor",
                                                 "config": {"op": "scale"},
                                                 "rows": [{"value": v} for v in (0.0, 0.5, 1.0, 2.0)]}}
    for rel, doc in docs.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps(doc))
    for png in ("superweights/superweights.png", "perturb/perturb.png", "dose_response/dose_response.png"):
        (tmp_path / png).write_bytes(b"png")
    table = _sensitivity(tmp_path)
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "baseline_report.md").write_text("# baseline")
    path = write_demo_report(tmp_path / "report", tmp_path / "report" / "baseline_report.md",
                             tmp_path / "superweights", tmp_path / "sensitivity", tmp_path / "perturb",
                             tmp_path / "dose_response")
    return path.read_text(), docs, table


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}")[1].split("\n## ")[0]


def _rows(section: str, first: str) -> list[list[str]]:
    """Cells of the Markdown table rows whose first cell starts with ``first`` (header/rule excluded)."""
    out = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if cells and cells[0].startswith(first) and not set(line) <= set("|-"):
            out.append(cells)
    return out


def _num(text: str) -> float:
    return float(text.replace(",", "").replace("+", ""))


def _assert_shown(text: str, value: float, decimals: int) -> None:
    assert _num(text) == pytest.approx(value, abs=0.51 * 10 ** -decimals), (text, value)


def test_comparison_table_and_verdict_equal_perturb_json(tmp_path):
    text, docs, _ = _build(tmp_path)
    comps = docs["perturb/perturb.json"]["comparisons"]
    section = _section(text, "4. Causal validation")
    for c in comps:
        [cells] = _rows(section, c["name"])
        _assert_shown(cells[1], c["mean_delta_nll"], 4)
        low, high = re.fullmatch(r"\[(\S+), (\S+)\]", cells[2]).groups()
        _assert_shown(low, c["ci_low"], 4)
        _assert_shown(high, c["ci_high"], 4)
        _assert_shown(cells[3], c["ppl_perturbed"], 3)
        _assert_shown(cells[4], c["ppl_ratio"], 3)
        assert float(cells[5]) == pytest.approx(c["p_wilcoxon_holm"], rel=0.05)  # 2 significant digits
        assert cells[6] == str(c["collapsed"])
    target = comps[0]
    m = re.search(r"multiplies perplexity by (\S+) \(mean ΔNLL (\S+), 95 % CI \[(\S+), (\S+)\], "
                  r"Holm-adjusted Wilcoxon p = (\S+)\)\. Against the size-matched random control the difference "
                  r"is significant at α = 0\.05\.", section)
    assert m, section
    _assert_shown(m[1], target["ppl_ratio"], 2)
    for got, key in zip(m.groups()[1:4], ("mean_delta_nll", "ci_low", "ci_high")):
        _assert_shown(got, target[key], 3)
    assert float(m[5]) == pytest.approx(target["p_wilcoxon_holm"], rel=0.05)
    base = docs["perturb/perturb.json"]["baseline"]
    assert f"{base['scored_tokens']:,} scored tokens, baseline perplexity {base['perplexity']:.3f}" in section


def test_verdict_says_not_significant_when_holm_p_is_large(tmp_path):
    text, _, _ = _build(tmp_path, p_versus=0.2)
    assert "the difference is not significant at α = 0.05" in _section(text, "4. Causal validation")


def test_superweights_and_dose_sections_equal_their_json(tmp_path):
    text, docs, _ = _build(tmp_path)
    section = _section(text, "2. Super weights")
    sw = docs["superweights/superweights.json"]
    assert f"{sw['data']['n_sequences']} windows of {sw['data']['context_len']} tokens" in section
    for w in sw["candidates"]:
        [cells] = _rows(section, str(w["iteration"]))
        assert cells[1:4] == [w["param_name"], str(w["row"]), str(w["col"])]
        _assert_shown(cells[4], w["weight"], 4)
        _assert_shown(cells[5], w["output_activation"], 0)
        _assert_shown(cells[6], w["share"], 2)
    assert "factor = 0.0, 0.5, 1.0, 2.0" in _section(text, "5. Dose-response")


def test_sensitivity_section_equals_ranking_and_stability(tmp_path):
    text, _, table = _build(tmp_path)
    section = _section(text, "3. Sensitivity ranking")
    stab = json.loads((tmp_path / "sensitivity" / "stability.json").read_text())
    assert "global top-100 of 106,168,320 weights in 210 tensors" in section
    shown = [cells for cells in _rows(section, "") if cells[0].isdigit() and len(cells) == 8]
    assert len(shown) == TOP_ROWS
    for cells, row in zip(shown, table.itertuples(index=False)):
        assert cells[:6] == [str(row.rank), row.param, "–" if pd.isna(row.layer) else str(row.layer), row.role,
                             str(row.row), "–" if pd.isna(row.col) else str(row.col)]
        assert float(cells[6]) == pytest.approx(row.score, rel=5e-4)  # 4 significant digits
        _assert_shown(cells[7], row.weight, 4)
    for per_seed in stab["per_seed"]:
        [cells] = [c for c in _rows(section, str(per_seed["seed"])) if len(c) == 6]
        tail = per_seed["tail"]
        assert cells[1] == "4 × 128"
        _assert_shown(cells[2], tail["top_0.1pct_share"], 4)
        _assert_shown(cells[3], tail["top_1pct_share"], 4)
        gini, low, high = re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", cells[4]).groups()
        for got, key in ((gini, "gini"), (low, "gini_low"), (high, "gini_high")):
            _assert_shown(got, tail[key], 4)
        assert _num(cells[5]) == tail["n_nonfinite"]
    m = re.search(r"seeds 0-1: (\S+) \(mean (\S+), min (\S+)\)", section)
    for got, key in zip(m.groups(), ("jaccard_pairs", "jaccard_mean", "jaccard_min")):
        _assert_shown(got, stab[key]["0-1"] if key == "jaccard_pairs" else stab[key], 3)
    assert ("1 of the 2 super-weight candidates of section 2 are in this top-100: "
            "model.layers.11.mlp.down_proj.weight[507,1229] at rank 2.") in section
    for png in ("topk_layer_role.png", "score_hist.png"):
        assert f"(../sensitivity/{png})" in section


def test_ci_method_named_and_few_windows_marked(tmp_path):
    """Audit issue 10, defect 2: the table names the CI's method; fewer than 8 windows get a † and a warning."""
    _build(tmp_path)
    doc = json.loads((tmp_path / "perturb/perturb.json").read_text())
    for i, c in enumerate(doc["comparisons"]):
        c.update(n_windows=5 if i == 0 else 16, few_windows=i == 0, ci_method="bootstrap-t")
    (tmp_path / "perturb/perturb.json").write_text(json.dumps(doc))
    path = write_demo_report(tmp_path / "report", tmp_path / "report" / "baseline_report.md",
                             tmp_path / "superweights", tmp_path / "sensitivity", tmp_path / "perturb",
                             tmp_path / "dose_response")
    section = _section(path.read_text(), "4. Causal validation")
    assert "| studentized bootstrap (bootstrap-t) 95 % CI |" in section
    [target], [random] = _rows(section, "target vs baseline"), _rows(section, "random_k vs baseline")
    assert target[2].endswith("] †") and random[2].endswith("]")
    assert "1 of 5 comparison(s) have fewer than 8 windows (5 windows)" in section
