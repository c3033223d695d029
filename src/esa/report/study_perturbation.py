"""Causal validation in the study report: the paired comparisons of ``perturbation`` runs.

Each perturbation run stores its comparisons (``metrics["comparisons"]``: target / controls vs the unperturbed
model and target vs each control, on the same windows): mean ΔNLL per token with its 95 % CI (the method is
stored as ``ci_method``: bootstrap-t since audit issue 10, percentile bootstrap before), the PPL ratio,
Holm-adjusted Wilcoxon p-values and whether the model collapsed. This section tabulates every one, states per
run whether the target beats the size-matched random control (p < α and CI above 0), warns when comparisons
have fewer windows than the CI needs (:data:`esa.stats.MIN_WINDOWS`), and draws them.
"""

from __future__ import annotations

from esa.report.html import Block, Bullets, Figure, Paragraph, Table
from esa.report.study_downstream import downstream_blocks
from esa.report.study_plots import comparison_plot
from esa.report.study_report import ALPHA, Run, _comparisons, _p_holm, fnum, generic_section, run_label
from esa.core.files import as_float
from esa.stats import few_windows, few_windows_caveat, interval_phrase

COMPARISON_HEADER = ("run", "comparison", "mean ΔNLL (nats/token)", "95% CI", "PPL ratio",
                     "Wilcoxon p (Holm)", "collapsed")


def comparison_rows(runs: list[Run]) -> list[dict]:
    """One dict per stored paired comparison (``metrics["comparisons"]``) of the completed runs."""
    rows = []
    for r in runs:
        for c in _comparisons(r) if r.status == "completed" else []:
            rows.append({"run": run_label(r), "name": str(c.get("name")), "label": f"{r.model_name}: {c.get('name')}",
                         "mean_delta_nll": as_float(c.get("mean_delta_nll")), "ci_low": as_float(c.get("ci_low")),
                         "ci_high": as_float(c.get("ci_high")), "ppl_ratio": as_float(c.get("ppl_ratio")),
                         "p_holm": _p_holm(c), "collapsed": bool(c.get("collapsed")),
                         "ci_method": c.get("ci_method"), "n_windows": c.get("n_windows"),
                         "few_windows": few_windows(c)})
    return rows


def _verdicts(rows: list[dict]) -> list[str]:
    """Per run: the target's effect vs baseline, and whether it beats the size-matched random control."""
    out = []
    for run in dict.fromkeys(r["run"] for r in rows):
        comps = {r["name"]: r for r in rows if r["run"] == run}
        target, versus = comps.get("target vs baseline"), comps.get("target vs random_k")
        if target is None:
            continue
        text = (f"{run}: perturbing the targets multiplies perplexity by {fnum(target['ppl_ratio'])} (mean ΔNLL "
                f"{target['mean_delta_nll']:+.4f}, 95 % CI [{target['ci_low']:+.4f}, {target['ci_high']:+.4f}], "
                f"Holm-adjusted Wilcoxon p = {target['p_holm']:.3g}).")
        if versus is not None:
            sig = versus["p_holm"] < ALPHA and versus["ci_low"] > 0
            text += (f" Against the size-matched random control the difference is "
                     f"{'significant' if sig else 'not significant'} at α = {ALPHA}.")
        out.append(text)
    return out


def _ci(row: dict) -> str:
    """``[low, high]``, with a † when the comparison has too few windows for the CI's stated coverage."""
    return f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]" + (" †" if row["few_windows"] else "")


def causal_section(runs: list[Run]) -> list[Block]:
    rows = comparison_rows(runs)
    if not rows:
        return generic_section(runs)
    table = Table(COMPARISON_HEADER, tuple(
        (r["run"], r["name"], f"{r['mean_delta_nll']:+.4f}", _ci(r), fnum(r["ppl_ratio"]), f"{r['p_holm']:.3g}",
         "yes" if r["collapsed"] else "no") for r in rows))
    n_runs = len({r["run"] for r in rows})
    intro = (f"{len(rows)} paired comparison(s) from {n_runs} perturbation run(s): per-window ΔNLL on the same "
             f"windows, {interval_phrase(rows)}, Wilcoxon p-values Holm-adjusted within each run; "
             f"{sum(r['collapsed'] for r in rows)} collapsed.")
    caveat = few_windows_caveat(rows)
    intro += f" ⚠ {caveat} Their CIs are marked † in the table." if caveat else ""
    return [Paragraph(intro), table, *([Bullets(tuple(v))] if (v := _verdicts(rows)) else []),
            Figure("causal_validation.png", comparison_plot(rows), "Mean ΔNLL per comparison (95 % CI)"),
            *downstream_blocks(runs)]
