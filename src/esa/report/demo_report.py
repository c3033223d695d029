"""``demo_report.md``: baseline, super weights, sensitivity ranking and causal validation of one demo run.

Every number comes from the files each step wrote (``results.json``, ``superweights.json``, the sensitivity
step's ``stability.json``, ``manifest.json`` and ``ranking.parquet``, ``perturb.json``, ``dose_response.json``);
nothing is recomputed or typed in.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from esa.runs import as_float, read_json
from esa.sensitivity.ranking import read_ranking
from esa.stats import few_windows, few_windows_caveat, interval_phrase

TOP_ROWS = 10  # ranking rows shown in the report (the full table is in ranking.parquet / .csv)


def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(path, start)


def _superweight_lines(doc: dict) -> list[str]:
    lines = ["| round | parameter | row | col | weight | max \\|output\\| | share of output |",
             "|---|---|---|---|---|---|---|"]
    for w in doc["candidates"]:
        lines.append(f"| {w['iteration']} | {w['param_name']} | {w['row']} | {w['col']} | {as_float(w['weight']):+.4f} "
                     f"| {as_float(w['output_activation']):,.0f} | {as_float(w['share']):.2f} |")
    return lines if doc["candidates"] else ["No super-weight candidates passed the thresholds."]


def _dash(value) -> str:
    """An integer cell, or an en dash for a missing one (a non-layer parameter's layer, a 1-D weight's col)."""
    return "–" if pd.isna(value) else str(int(value))


def _ranking_lines(table) -> list[str]:
    lines = ["| rank | param | layer | role | row | col | score | weight |", "|---|---|---|---|---|---|---|---|"]
    for r in table.head(TOP_ROWS).itertuples(index=False):
        lines.append(f"| {int(r.rank)} | {r.param} | {_dash(r.layer)} | {r.role} | {int(r.row)} | {_dash(r.col)} | "
                     f"{as_float(r.score):.4g} | {as_float(r.weight):+.4f} |")
    return lines


def _tail_lines(stab: dict) -> list[str]:
    """Heavy-tail statistics per calibration seed (TailStats: exact shares, Gini with its bound interval)."""
    lines = ["| calibration seed | windows × tokens | top-0.1 % share | top-1 % share | Gini [bounds] | "
             "non-finite scores |", "|---|---|---|---|---|---|"]
    for row in stab["per_seed"]:
        t, calib = row["tail"], row["calibration"]
        data = f"{calib['n_windows']} × {calib['context_len']}" if calib else "no data"
        lines.append(f"| {row['seed']} | {data} | {as_float(t['top_0.1pct_share']):.4f} | "
                     f"{as_float(t['top_1pct_share']):.4f} | {as_float(t['gini']):.4f} "
                     f"[{as_float(t['gini_low']):.4f}, {as_float(t['gini_high']):.4f}] | {t['n_nonfinite']:,} |")
    return lines


def _overlap_sentence(stab: dict) -> str:
    """Top-k Jaccard across calibration seeds, or why there is none."""
    k = f"{stab['direction']}-{stab['k']}"
    if stab["jaccard_mean"] is None:
        return f"Only one calibration seed was run, so there is no {k} overlap across seeds."
    pairs = ", ".join(f"seeds {pair}: {as_float(j):.3f}" for pair, j in stab["jaccard_pairs"].items())
    text = (f"Overlap of the {k} sets across calibration seeds (Jaccard |A ∩ B| / |A ∪ B|): {pairs} "
            f"(mean {as_float(stab['jaccard_mean']):.3f}, min {as_float(stab['jaccard_min']):.3f}).")
    if stab["seed_invariant"]:
        text += " The seeds changed nothing here (seed-invariant scorer or calibration set)."
    return text


def _superweights_in_topk(table, sw: dict, k: str) -> str:
    """Which super-weight candidates the ranking also selects; both files use (out, in) row/col."""
    if not sw["candidates"]:
        return f"No super-weight candidates to look up in this {k}."
    ranks = {(p, int(r), int(c)): int(rk) for p, r, c, rk in zip(table["param"], table["row"],
                                                                 table["col"].fillna(-1), table["rank"])}
    found = [(w, ranks.get((w["param_name"], int(w["row"]), int(w["col"])))) for w in sw["candidates"]]
    hits = [f"{w['param_name']}[{w['row']},{w['col']}] at rank {rank}" for w, rank in found if rank is not None]
    return (f"{len(hits)} of the {len(found)} super-weight candidates of section 2 are in this {k}"
            + (f": {'; '.join(hits)}." if hits else "."))


def _sensitivity_lines(sens_dir: Path, out: Path, sw: dict) -> list[str]:
    stab = read_json(sens_dir / "stability.json")
    manifest = read_json(sens_dir / "manifest.json")
    cfg = manifest["config"]
    table = read_ranking(sens_dir / "ranking.parquet")
    return [f"Scorer `{stab['scorer']}`: {stab['mode']} {stab['direction']}-{stab['k']} of "
            f"{manifest['n_selected_weights']:,} weights in {manifest['n_selected_params']} tensors "
            f"({cfg['calib_dataset']}, {cfg['max_samples']} calibration windows of {cfg['context_len']} tokens "
            f"per seed, seeds {', '.join(str(s) for s in stab['seeds'])}). The first {TOP_ROWS} rows of "
            f"the seed-{stab['seeds'][0]} ranking (row/col index W[out, in]):", "", *_ranking_lines(table), "",
            "How heavy the tail of the score distribution is (share of the summed score held by the top "
            "weights; Gini 0 = uniform, 1 = one weight holds everything):", "", *_tail_lines(stab), "",
            _superweights_in_topk(table, sw, f"{stab['direction']}-{stab['k']}"), "",
            _overlap_sentence(stab), "",
            f"![top-k by layer and role]({_rel(sens_dir / 'topk_layer_role.png', out)})", "",
            f"![score distribution]({_rel(sens_dir / 'score_hist.png', out)})", ""]


def _comparison_lines(doc: dict) -> list[str]:
    """The comparison table; its CI column names the method, and a † marks too few windows for its coverage."""
    comps = doc["comparisons"]
    lines = [f"| comparison | mean ΔNLL (nats/token, over windows) | {interval_phrase(comps)} | PPL after | "
             "PPL ratio | Wilcoxon p (Holm) | collapsed |",
             "|---|---|---|---|---|---|---|"]
    for c in comps:
        lines.append(f"| {c['name']} | {as_float(c['mean_delta_nll']):+.4f} | "
                     f"[{as_float(c['ci_low']):+.4f}, {as_float(c['ci_high']):+.4f}]{' †' if few_windows(c) else ''} | "
                     f"{as_float(c['ppl_perturbed']):.3f} | {as_float(c['ppl_ratio']):.3f} | "
                     f"{as_float(c.get('p_wilcoxon_holm')):.2g} | {c['collapsed']} |")
    if caveat := few_windows_caveat(comps):
        lines += ["", f"> **Warning** (†): {caveat}"]
    return lines


def _verdict(doc: dict) -> str:
    """One sentence on whether the target beat its controls, from the stored statistics."""
    comps = {c["name"]: c for c in doc["comparisons"]}
    target = comps.get("target vs baseline")
    if target is None:
        return ""
    ratio = as_float(target["ppl_ratio"])
    text = (f"Perturbing the targets multiplies perplexity by {ratio:.2f} (mean ΔNLL "
            f"{as_float(target['mean_delta_nll']):+.3f}, 95 % CI [{as_float(target['ci_low']):+.3f}, "
            f"{as_float(target['ci_high']):+.3f}], Holm-adjusted Wilcoxon p = "
            f"{as_float(target.get('p_wilcoxon_holm')):.2g}).")
    versus = comps.get("target vs random_k")
    if versus is not None:
        significant = as_float(versus.get("p_wilcoxon_holm")) < 0.05 and as_float(versus["ci_low"]) > 0
        text += (f" Against the size-matched random control the difference is "
                 f"{'significant' if significant else 'not significant'} at α = 0.05.")
    return text


def write_demo_report(out: Path, baseline_report: Path, sw_dir: Path, sens_dir: Path, perturb_dir: Path,
                      dose_dir: Path) -> Path:
    """Write ``out/demo_report.md`` from the step directories of one demo run; return its path."""
    out.mkdir(parents=True, exist_ok=True)
    sw = read_json(sw_dir / "superweights.json")
    pert = read_json(perturb_dir / "perturb.json")
    dose = read_json(dose_dir / "dose_response.json")
    notes = pert.get("notes") or []
    lines = ["# ESA demo report", "",
             f"Model: {pert['model']['model_id']} ({pert['model']['n_params']:,} parameters, "
             f"revision `{pert['model']['revision'][:24]}`).", ""]
    if notes:
        lines += ["> **Notes**", *[f"> - {n}" for n in notes], ""]
    lines += ["## 1. Baseline", "", f"See [the baseline report]({_rel(baseline_report, out)}).", "",
              "## 2. Super weights", "",
              f"One forward pass over {sw['data']['n_sequences']} windows of {sw['data']['context_len']} tokens "
              f"({sw['data']['dataset']}), {len(sw['rounds'])} search round(s).", "", *_superweight_lines(sw), "",
              f"![activation profile]({_rel(sw_dir / 'superweights.png', out)})", "",
              "## 3. Sensitivity ranking", "", *_sensitivity_lines(sens_dir, out, sw),
              "## 4. Causal validation: targets vs size-matched controls", "",
              f"{pert['data']['n_windows']} fixed windows, {pert['baseline']['scored_tokens']:,} scored tokens, "
              f"baseline perplexity {as_float(pert['baseline']['perplexity']):.3f}.", "",
              *_comparison_lines(pert), "", _verdict(pert), "",
              f"![target vs controls]({_rel(perturb_dir / 'perturb.png', out)})", "",
              "## 5. Dose-response", "",
              f"Op `{dose['config']['op']}` over {dose['parameter']} = "
              f"{', '.join(str(r['value']) for r in dose['rows'])}.", "",
              f"![dose-response]({_rel(dose_dir / 'dose_response.png', out)})", ""]
    path = out / "demo_report.md"
    path.write_text("\n".join(lines))
    return path
