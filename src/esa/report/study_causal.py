"""The study report's dose-response and bit-scan sections, computed only from the ``runs`` rows.

A **dose-response** run (:mod:`esa.kinds.dose_response`) stores, per swept value, the
names of its ``target`` and ``random_k`` comparisons, and the comparisons themselves (paired ΔNLL vs the
unperturbed model on the same windows, 95 % CI by the stored ``ci_method`` — bootstrap-t —, Wilcoxon p
Holm-adjusted across the run). CIs of comparisons with fewer than :data:`esa.stats.MIN_WINDOWS` windows are
marked † and the section says their coverage is not the stated one. The section shows:

1. a table with one row per run × value × arm — exactly the stored numbers, formatted;
2. per run, in words: the range of the target's ΔNLL, at how many values its CI lies entirely above the
   control's (a conservative reading: non-overlapping CIs), and where it collapses;
3. a figure of ΔNLL vs the swept value (target vs random_k, CI bands), and, where runs differ only in k, a
   figure of ΔNLL vs k.

A **bit-scan** run stores each single flip as a comparison (named by the flipped weight and bit) and the
greedy collapse search (PPL after each added flip). The section shows the single-flip table, the greedy
table, sentences on the most damaging flip and the flips to collapse, and cumulative damage vs flips.

Collapsed and non-significant target effects already appear in the report's Warnings (both kinds store
``metrics["comparisons"]``, which :func:`esa.report.study_report.run_warnings` reads).
"""

from __future__ import annotations

import math

from esa.report.study_downstream import accuracy_dose_panels, downstream_blocks
from esa.report.html import Block, Bullets, Figure, Paragraph, Table
from esa.report.study_causal_plots import dose_plot, dose_vs_k_plot, greedy_plot
from esa.report.study_report import ALPHA, Run, fnum, generic_section
from esa.kinds.causal import severity
from esa.perturb.protocols.bitscan import greedy_verdict
from esa.core.files import as_float
from esa.stats import few_windows, few_windows_caveat, interval_phrase


def fdelta(x: float) -> str:
    """A ΔNLL (nats/token) with sign and 4 significant digits; nan/inf spelled out."""
    return f"{x:+.4g}" if math.isfinite(x) else str(x)


def fci(low: float, high: float, few: bool = False) -> str:
    """``[low, high]``; a † when the comparison has too few windows for the CI's stated coverage."""
    return f"[{fdelta(low)}, {fdelta(high)}]" + (" †" if few else "")


def _stats(c: dict) -> dict:
    p = as_float(c.get("p_wilcoxon_holm", c.get("p_wilcoxon")))
    return {"mean": as_float(c.get("mean_delta_nll")), "ci_low": as_float(c.get("ci_low")),
            "ci_high": as_float(c.get("ci_high")), "ppl": as_float(c.get("ppl_perturbed")),
            "ppl_ratio": as_float(c.get("ppl_ratio")), "p_holm": p, "collapsed": bool(c.get("collapsed")),
            "ci_method": c.get("ci_method"), "n_windows": c.get("n_windows"), "few_windows": few_windows(c)}


def _interval_words(rows: list[dict]) -> tuple[str, str]:
    """(the CI method of ``rows``, the few-windows caveat or ""), for a section's intro."""
    caveat = few_windows_caveat(rows)
    return interval_phrase(rows), (f" ⚠ {caveat} Their CIs are marked †." if caveat else "")


def _title(run: Run) -> str:
    c = run.config
    size = f" top-{c['k']}" if c.get("k") is not None else ""
    bits = f"{c.get('top_n')} weight(s) × {len(c.get('bits') or [])} bit(s)"
    what = c.get("op") if run.kind == "dose_response" else bits
    return f"{run.model_name} · {c.get('target')}{size} · {what} · ctx {c.get('context_len')} · seed {c.get('seed')}"


# -------------------------------------------------------------------------------------------- dose-response
DOSE_HEADER = ("run", "value", "arm", "mean ΔNLL (nats/token)", "95% CI", "PPL", "PPL ratio",
               "Wilcoxon p (Holm)", "collapsed")


def dose_rows(run: Run) -> list[dict]:
    """One dict per stored value × arm of a completed dose-response run, in the stored order."""
    comps, out = run.metrics.get("comparisons") or {}, []
    for row in run.metrics.get("rows") or []:
        for arm in ("target", "random_k"):
            name = row.get(arm)
            if name in comps:
                out.append({"value": row.get("value"), "arm": arm, "name": name, **_stats(comps[name])})
    return out


def _dose_sentence(title: str, parameter: str, rows: list[dict], threshold) -> str:
    target = [r for r in rows if r["arm"] == "target"]
    control = {str(r["value"]): r for r in rows if r["arm"] == "random_k"}
    lo, hi = min(target, key=lambda r: r["mean"]), max(target, key=lambda r: r["mean"])
    text = (f"{title}: the target's mean ΔNLL ranges from {fdelta(lo['mean'])} ({parameter}={lo['value']}) to "
            f"{fdelta(hi['mean'])} ({parameter}={hi['value']}) nats/token.")
    if control:
        above = [str(r["value"]) for r in target if str(r["value"]) in control
                 and r["ci_low"] > control[str(r["value"])]["ci_high"]]
        text += (f" Its 95 % CI lies entirely above the random_k control's at {len(above)} of {len(target)} "
                 f"value(s){' (' + ', '.join(above) + ')' if above else ''}.")
    sig = [str(r["value"]) for r in target if r["p_holm"] < ALPHA]
    text += f" Holm-adjusted Wilcoxon p < {ALPHA} at {len(sig)} of {len(target)} value(s)."
    collapsed = [str(r["value"]) for r in target if r["collapsed"]]
    if collapsed:
        text += (f" The target collapses the model (PPL above {fnum(as_float(threshold), 0)} or non-finite) at "
                 f"{parameter} = {', '.join(collapsed)}.")
    return text


def _k_groups(done: list[Run]) -> list[dict]:
    """Runs that differ only in k (same model, target, op, values, data, seed), with ≥ 2 distinct k."""
    groups: dict[tuple, list[Run]] = {}
    for r in done:
        c = r.config
        if c.get("k") is not None:
            key = (r.model_name, c.get("target"), c.get("op"), str(c.get("values")), c.get("dataset"),
                   c.get("context_len"), c.get("seed"))
            groups.setdefault(key, []).append(r)
    out = []
    for key, rs in groups.items():
        if len({r.config["k"] for r in rs}) >= 2:
            points = [{**row, "k": r.config["k"]} for r in rs for row in dose_rows(r)]
            out.append({"title": f"{key[0]} · {key[1]} · {key[2]} · ctx {key[5]} · seed {key[6]}",
                        "parameter": rs[0].metrics.get("parameter"), "points": points})
    return out


def dose_section(runs: list[Run]) -> list[Block]:
    done = [r for r in runs if r.status == "completed" and (r.metrics.get("rows") is not None)]
    if not done:
        return generic_section(runs)
    table, sentences, panels = [], [], []
    for r in done:
        rows, title, param = dose_rows(r), _title(r), str(r.metrics.get("parameter"))
        table += [(title, f"{param}={x['value']}", x["arm"], fdelta(x["mean"]),
                   fci(x["ci_low"], x["ci_high"], x["few_windows"]),
                   fnum(x["ppl"]), fnum(x["ppl_ratio"], 4), f"{x['p_holm']:.3g}", "yes" if x["collapsed"] else "no")
                  for x in rows]
        if any(x["arm"] == "target" for x in rows):
            threshold = next((c.get("collapse_ppl") for c in r.metrics["comparisons"].values()), None)
            sentences.append(_dose_sentence(title, param, rows, threshold))
        panels.append({"title": title, "parameter": param, "rows": rows})
    n_values = sum(len(r.metrics["rows"]) for r in done)
    method, caveat = _interval_words([x for p in panels for x in p["rows"]])
    intro = (f"{len(done)} dose-response run(s), {n_values} op setting(s) in all: at each value of the swept "
             "parameter the targets and size-matched random_k controls are perturbed and scored on the same windows "
             f"as the unperturbed model (mean ΔNLL per window, {method}, Wilcoxon p Holm-adjusted within "
             f"each run); {sum(row[-1] == 'yes' for row in table)} setting(s) collapsed.{caveat}")
    failed = len(runs) - len(done)
    blocks: list[Block] = [Paragraph(intro + (f" {failed} run(s) failed (see the warnings)." if failed else "")),
                           Table(DOSE_HEADER, tuple(table)), Bullets(tuple(sentences))]
    shown = f" (first {min(len(panels), 12)} of {len(panels)} runs; the table lists all)" if len(panels) > 12 else ""
    blocks.append(Figure("dose_response.png", dose_plot(panels),
                         f"Mean ΔNLL vs dose, target (red) vs random_k (blue), 95 % CI bands{shown}"))
    if groups := _k_groups(done):
        blocks.append(Figure("dose_vs_k.png", dose_vs_k_plot(groups),
                             "Mean ΔNLL vs k, target (solid) vs random_k (dashed), one colour per dose, 95 % CI"))
    if acc_panels := accuracy_dose_panels(done):
        blocks.append(Figure("dose_accuracy.png", dose_plot(acc_panels, "Δ accuracy (perturbed − unperturbed)",
                                                            symlog=False),
                             "Δ zero-shot accuracy vs dose per task, target (red) vs random_k (blue), 95 % paired "
                             "item-bootstrap CI bands"))
    blocks += downstream_blocks(runs)
    return blocks


# ------------------------------------------------------------------------------------------------ bit scans
FLIP_HEADER = ("run", "flip", "value after", "mean ΔNLL (nats/token)", "95% CI", "PPL", "collapsed")
GREEDY_HEADER = ("run", "baseline PPL", "collapse PPL", "greedy steps", "flips to collapse", "exact minimum",
                 "PPL after each flip")


def flip_rows(run: Run) -> list[dict]:
    """One dict per stored single flip of a completed bit-scan run, in (weight, bit) order."""
    comps = (run.metrics.get("comparisons") or {}).values()
    return [{"name": str(c.get("name")), "value_after": as_float(c.get("value_after")), **_stats(c)}
            for c in sorted(comps, key=lambda c: (c.get("weight", 0), c.get("bit", 0)))]


def _greedy_cells(run: Run) -> tuple[str, ...]:
    m, g = run.metrics, run.metrics["greedy"]
    n = str(g.get("n_flips")) if g.get("collapsed") else f"none within {len(g.get('steps', []))}"
    return (_title(run), fnum(as_float(m.get("baseline_perplexity"))), fnum(as_float(g.get("collapse_ppl")), 0),
            str(len(g.get("steps", []))), n, "yes" if g.get("exact_minimum") else "no",
            ", ".join(fnum(as_float(s.get("ppl"))) for s in g.get("steps", [])) or "none")


def _bitscan_sentences(run: Run, flips: list[dict]) -> list[str]:
    g, title = run.metrics["greedy"], _title(run)
    worst = max(flips, key=lambda f: severity({"mean_delta_nll": f["mean"]}))
    out = [f"{title}: the most damaging single flip is {worst['name']} (mean ΔNLL {fdelta(worst['mean'])} "
           f"nats/token, PPL {fnum(worst['ppl'])}); {sum(f['collapsed'] for f in flips)} of {len(flips)} "
           f"single flips collapse the model."]
    if g.get("collapsed") and g.get("n_flips") == 0:
        out.append(f"{title}: the unperturbed model already exceeds the collapse threshold "
                   f"({fnum(as_float(g.get('collapse_ppl')), 0)}), so the greedy search is void.")
    elif g.get("collapsed"):
        how = "the exact minimum" if g.get("exact_minimum") else "a greedy upper bound"
        out.append(f"{title}: {g['n_flips']} flip(s) collapse the model ({how}): {'; '.join(g.get('flips', []))}.")
    else:
        last = g["steps"][-1]["ppl"] if g.get("steps") else math.nan
        out.append(f"{title}: {greedy_verdict(g)}; PPL reached {fnum(as_float(last))} (threshold "
                   f"{fnum(as_float(g.get('collapse_ppl')), 0)})" + (f"; {g['stalled']}." if g.get("stalled") else "."))
    return out


def bitscan_section(runs: list[Run]) -> list[Block]:
    done = [r for r in runs if r.status == "completed" and isinstance(r.metrics.get("greedy"), dict)]
    if not done:
        return generic_section(runs)
    flips = {r.run_id: flip_rows(r) for r in done}
    table = tuple((_title(r), f["name"], f"{f['value_after']:.6g}", fdelta(f["mean"]),
                   fci(f["ci_low"], f["ci_high"], f["few_windows"]), fnum(f["ppl"]), "yes" if f["collapsed"] else "no")
                  for r in done for f in flips[r.run_id])
    method, caveat = _interval_words([f for fs in flips.values() for f in fs])
    intro = (f"{len(done)} bit-scan run(s): each listed bit of each scanned weight flipped alone (paired ΔNLL vs the "
             f"unperturbed model on the same windows, {method}), then flips added greedily — most damaging "
             "first, re-scored with those already applied — until the model collapses or max_flips is reached."
             + caveat)
    sentences = [s for r in done for s in _bitscan_sentences(r, flips[r.run_id])]
    curves = [{"title": _title(r), "baseline_ppl": as_float(r.metrics.get("baseline_perplexity")),
               "collapse_ppl": as_float(r.metrics["greedy"].get("collapse_ppl")),
               "steps": [{"ppl": as_float(s.get("ppl"))} for s in r.metrics["greedy"].get("steps", [])]}
              for r in done]
    return [Paragraph(intro), Table(FLIP_HEADER, table), Table(GREEDY_HEADER, tuple(_greedy_cells(r) for r in done)),
            Bullets(tuple(sentences)),
            Figure("bitscan_greedy.png", greedy_plot(curves), "Perplexity after each greedily added bit flip "
                   "(step 0: unperturbed); dashed lines: collapse thresholds"), *downstream_blocks(runs)]
