"""The study report's **Scaling** section: a size ladder's per-model numbers and log–log trends, from the
``scaling_point`` rows of a results database (:mod:`esa.kinds.scaling_point`).

Completed points are grouped into ladders by protocol — their run config without the model (dataset, context,
seed, token budget, op, control seeds, tail fraction, statistics, x axis) — because only models measured the
same way belong on one trend line. Within a ladder a model appears once (the newest row, should its weights
have changed) and models are ordered by size. Each ladder with ≥ 2 models shows:

* a per-model table: parameters, bits per byte, perplexity, super-weight count and depth, mean ΔNLL/token of
  the perturbed super weights (target) and of the size-matched random_k control with bootstrap-t 95 % CIs, the
  PPL ratio of the target, and the heavy-tail share;
* the fits of :func:`esa.scaling.fits.fit_trends` — the very function ``esa scaling`` uses — computed here from the
  stored rows: slope with its t-based 95 % CI (undefined with 2 models), intercept, R², the models used, or
  the reason there is no fit;
* the log–log overview figure of :mod:`esa.report.scaling_plots`, model names at the points.

A ladder of one model gets its table and one sentence: a trend needs ≥ 2 models. Every number is formatted
from the stored rows (non-finite values spelled "nan"/"inf"; a statistic that was not measured is "—").
"""

from __future__ import annotations

import json
import math

from esa.report.html import Block, Bullets, Figure, Heading, Paragraph, Table
from esa.report.study_report import Run
from esa.core.files import as_float
from esa.scaling.fits import STATISTICS, ladder_document, measurements

KIND = "scaling_point"
LABELS = {s.key: s.label for s in STATISTICS}


# ------------------------------------------------------------------------------------------------ ladders
def _protocol(run: Run) -> str:
    return json.dumps({k: v for k, v in run.config.items() if k != "model"}, sort_keys=True)


def ladders(runs: list[Run]) -> list[dict]:
    """Completed scaling points grouped by protocol: ``{"config", "runs", "doc"}`` per ladder, where ``doc`` is
    :func:`esa.scaling.fits.ladder_document` of the stored rows (each row's ``model`` = the study's model name)."""
    groups: dict[str, dict[str, Run]] = {}
    for r in sorted((r for r in runs if r.kind == KIND and r.status == "completed"), key=lambda r: r.started_at):
        groups.setdefault(_protocol(r), {})[r.model_name] = r  # newest row of a model wins
    out = []
    for members in groups.values():
        cfg = next(iter(members.values())).config
        ordered = sorted(members.values(), key=lambda r: (as_float(r.metrics.get(cfg["x_axis"])), r.model_name))
        rows = [{**{k: v for k, v in r.metrics.items() if k != "perturbation"}, "model": r.model_name}
                for r in ordered]
        out.append({"config": cfg, "runs": ordered,
                    "doc": ladder_document(rows, cfg["x_axis"], tuple(cfg["statistics"]))})
    return out


# --------------------------------------------------------------------------------------------- formatting
def num(value, digits: int = 4, sign: bool = False) -> str:
    """A stored number with ``digits`` significant digits; "—" when absent, "nan"/"inf" when non-finite."""
    if value is None or isinstance(value, bool):
        return "—"
    x = as_float(value)
    return (f"{x:+.{digits}g}" if sign else f"{x:.{digits}g}") if math.isfinite(x) else str(x)


def _with_ci(row: dict, key: str) -> str:
    ci = row.get(f"{key}_ci95")
    text = num(row.get(key), sign=True)
    return f"{text} [{num(ci[0], sign=True)}, {num(ci[1], sign=True)}]" if ci and row.get(key) is not None else text


MODEL_HEADER = ("model", "parameters", "bits/byte", "perplexity", "super weights", "depth (layer/L)",
                "ΔNLL super weights [95% CI]", "ΔNLL random_k [95% CI]", "PPL ratio super weights", "tail share")


def model_table(doc: dict) -> Table:
    x = doc["x_axis"]
    rows = tuple((r["model"], f"{int(r[x]):,}" if r.get(x) is not None else "—", num(r.get("bits_per_byte")),
                  num(r.get("perplexity")), num(r.get("sw_count")), num(r.get("sw_depth_fraction"), 3),
                  _with_ci(r, "sw_delta_nll"), _with_ci(r, "random_delta_nll"), num(r.get("sw_ppl_ratio")),
                  num(r.get("magnitude_top_share"))) for r in doc["rows"])
    return Table(MODEL_HEADER, rows)


FIT_HEADER = ("statistic", "models", "slope", "slope 95% CI", "intercept (log10)", "R²", "note")


def _fit_row(key: str, entry: dict) -> tuple[str, ...]:
    fit, n = entry.get("fit"), len(entry.get("models", []))
    reasons = entry.get("why") or {m: "no finite, positive value" for m in entry["excluded"]}
    left_out = "left out: " + "; ".join(f"{m} ({r})" for m, r in reasons.items()) if reasons else ""
    if fit is None:
        why = f"{n} usable model(s), a fit needs ≥ 2" if n < 2 else entry.get("reason", "")
        return (LABELS[key], str(n), "—", "—", "—", "—", "; ".join(filter(None, ("no fit: " + why, left_out))))
    ci = fit.get("slope_ci95")
    spread = f"[{num(ci[0])}, {num(ci[1])}]" if ci else "undefined (2 models)"
    return (LABELS[key], str(n), num(fit["slope"]), spread, num(fit["intercept"]), num(fit.get("r2")), left_out)


def fit_table(doc: dict) -> Table:
    return Table(FIT_HEADER, tuple(_fit_row(k, e) for k, e in doc["fits"].items()))


# ------------------------------------------------------------------------------------------------ section
def _intro(ladder: dict) -> str:
    c, doc = ladder["config"], ladder["doc"]
    tokens = f"{c['max_eval_tokens']:,} scored tokens" if c.get("max_eval_tokens") else "every window"
    fitted = sum(e.get("fit") is not None for e in doc["fits"].values())
    needs = measurements(c["statistics"])
    parts = [f"{c['dataset']}, chunks windows of {c['context_len']} tokens, seed {c['seed']}, {tokens} per model "
             "(in its own tokens)"]
    if "perturbation" in needs:
        parts.append(f"super weights perturbed with {c['op']} vs a size-matched random_k control "
                     f"({len(c['control_seeds'])} seed(s))")
    if "tail" in needs:
        parts.append(f"tail share = Σ|W| in the top {c['tail_fraction']:.3%} of |W|")
    return (f"{len(doc['rows'])} model(s) measured with one protocol: {'; '.join(parts)}. Trends: OLS of "
            f"log10(statistic) on log10({c['x_axis']}); {fitted} of {len(doc['fits'])} statistic(s) could be fitted"
            + ("." if len(doc["fits"]) == len(STATISTICS) else f" (the study measured only these: "
               f"{', '.join(doc['fits'])}; other columns are not measured, —)."))


def _sentences(doc: dict) -> list[str]:
    """Per fitted statistic: what a 10× larger model does to it, from the slope."""
    out = []
    for key, e in doc["fits"].items():
        fit = e.get("fit")
        if fit is not None:
            out.append(f"{LABELS[key]}: slope {num(fit['slope'])}, so each 10× in {doc['x_axis']} multiplies it by "
                       f"{num(10 ** fit['slope'], 3)} (over {', '.join(e['models'])}).")
    return out


def ladder_blocks(ladder: dict, index: int, n_ladders: int) -> list[Block]:
    doc, c = ladder["doc"], ladder["config"]
    head = [Heading(3, f"Ladder {index + 1}: {c['dataset']}, ctx {c['context_len']}, seed {c['seed']}")] \
        if n_ladders > 1 else []
    if len(doc["rows"]) < 2:
        only = doc["rows"][0]["model"] if doc["rows"] else "no model"
        return head + [Paragraph(f"Only {only} was measured with this protocol, so no trend is fitted: a trend "
                                 "needs ≥ 2 models."), model_table(doc)]
    figure = Figure(f"scaling_ladder_{index + 1}.png", _png(doc),
                    f"Each statistic vs {doc['x_axis']} on log–log axes, model names at the points, fitted power "
                    "law and slope (95 % CI) in each title")
    return head + [Paragraph(_intro(ladder)), model_table(doc), fit_table(doc),
                   Bullets(tuple(_sentences(doc) + doc["notes"])), figure]


def _png(doc: dict) -> bytes:
    from esa.report.scaling_plots import overview_png

    return overview_png(doc)


def scaling_section(runs: list[Run]) -> list[Block]:
    """The Scaling section's blocks (no heading: the study report adds it)."""
    found = ladders(runs)
    failed = sum(r.status != "completed" for r in runs if r.kind == KIND)
    note = [Paragraph(f"{failed} scaling point(s) failed; see the warnings above.")] if failed else []
    if not found:
        return note or [Paragraph("No scaling point completed.")]
    blocks: list[Block] = []
    for i, ladder in enumerate(found):
        blocks += ladder_blocks(ladder, i, len(found))
    return note + blocks
