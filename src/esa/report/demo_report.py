"""``demo_report.md``: baseline, super weights and causal validation of one demo run, read from its files.

Every number comes from the JSON each step wrote (``results.json``, ``superweights.json``, ``perturb.json``,
``dose_response.json``); nothing is recomputed or typed in.
"""

from __future__ import annotations

import os
from pathlib import Path

from esa.runs import as_float, read_json


def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(path, start)


def _superweight_lines(doc: dict) -> list[str]:
    lines = ["| round | parameter | row | col | weight | max \\|output\\| | share of output |",
             "|---|---|---|---|---|---|---|"]
    for w in doc["candidates"]:
        lines.append(f"| {w['iteration']} | {w['param_name']} | {w['row']} | {w['col']} | {as_float(w['weight']):+.4f} "
                     f"| {as_float(w['output_activation']):,.0f} | {as_float(w['share']):.2f} |")
    return lines if doc["candidates"] else ["No super-weight candidates passed the thresholds."]


def _comparison_lines(doc: dict) -> list[str]:
    lines = ["| comparison | mean ΔNLL per window | 95 % CI | PPL after | PPL ratio | Wilcoxon p (Holm) | collapsed |",
             "|---|---|---|---|---|---|---|"]
    for c in doc["comparisons"]:
        lines.append(f"| {c['name']} | {as_float(c['mean_delta_nll']):+.4f} | "
                     f"[{as_float(c['ci_low']):+.4f}, {as_float(c['ci_high']):+.4f}] | "
                     f"{as_float(c['ppl_perturbed']):.3f} | {as_float(c['ppl_ratio']):.3f} | "
                     f"{as_float(c.get('p_wilcoxon_holm')):.2g} | {c['collapsed']} |")
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


def write_demo_report(out: Path, baseline_report: Path, sw_dir: Path, perturb_dir: Path, dose_dir: Path) -> Path:
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
              "## 3. Causal validation: targets vs size-matched controls", "",
              f"{pert['data']['n_windows']} fixed windows, {pert['baseline']['scored_tokens']:,} scored tokens, "
              f"baseline perplexity {as_float(pert['baseline']['perplexity']):.3f}.", "",
              *_comparison_lines(pert), "", _verdict(pert), "",
              f"![target vs controls]({_rel(perturb_dir / 'perturb.png', out)})", "",
              "## 4. Dose-response", "",
              f"Op `{dose['config']['op']}` over {dose['parameter']} = "
              f"{', '.join(str(r['value']) for r in dose['rows'])}.", "",
              f"![dose-response]({_rel(dose_dir / 'dose_response.png', out)})", ""]
    path = out / "demo_report.md"
    path.write_text("\n".join(lines))
    return path
