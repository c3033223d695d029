"""The baseline kind's report section: the executive summary of baselines (mean ± 95 % CI across seeds,
perplexity as a geometric mean with a log-scale CI, "seed-invariant" when the whole split was scored), the
comparisons across models, context trends and reliability sentences, and the perplexity-vs-context figure.
"""

from __future__ import annotations

import math

from esa.report.html import Block, Bullets, Figure, Heading, Paragraph, Table
from esa.report.study_plots import baseline_perplexity_plot
from esa.report.study_report import Run, fbound, fmt_agg, fnum
from esa.core.files import as_float
from esa.stats import aggregate_seeds

BASELINE_HEADER = ("model", "dtype", "dataset", "ctx", "method", "seeds", "scored tokens",
                   "perplexity (geometric mean)", "perplexity 95% CI", "token accuracy", "bits/byte",
                   "non-finite windows")


def baseline_cells(runs: list[Run]) -> list[dict]:
    """Completed baseline runs grouped per (model, dtype, dataset, ctx, method), aggregated across seeds."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        if r.status == "completed":
            c = r.config
            key = (r.model_name, (c.get("model") or {}).get("dtype"), c.get("dataset"), c.get("context_len"),
                   c.get("method"))
            groups.setdefault(key, []).append(r)
    cells = []
    for (model, dtype, dataset, ctx, method), rs in groups.items():
        rs = sorted(rs, key=lambda r: r.config.get("seed"))
        agg = {k: aggregate_seeds([as_float(r.metrics.get(k)) for r in rs], scale=scale)
               for k, scale in (("perplexity", "log"), ("token_accuracy", "linear"), ("bits_per_byte", "linear"))}
        cells.append({"model": model, "dtype": dtype, "dataset": dataset, "context_len": ctx, "method": method,
                      "seeds": [r.config.get("seed") for r in rs], **agg,
                      "seed_invariant": all(bool(r.metrics.get("seed_invariant")) for r in rs),
                      "scored_tokens": sum(int(r.metrics.get("scored_tokens") or 0) for r in rs),
                      "n_nonfinite": sum(int(r.metrics.get("n_nonfinite_windows") or 0) for r in rs)})
    return sorted(cells, key=lambda c: (c["model"], str(c["dataset"]), c["context_len"] or 0, str(c["method"])))


def _seeds_cell(c: dict) -> str:
    seeds = ", ".join(map(str, c["seeds"]))
    return f"{seeds} (seed-invariant: whole split)" if c["seed_invariant"] else seeds


def _ci_cell(c: dict) -> str:
    p = c["perplexity"]
    if c["seed_invariant"]:
        return "none needed (seed-invariant)"
    if math.isnan(p.ci_low):
        return f"undefined ({p.n} seed{'s' if p.n != 1 else ''}, {p.n_nonfinite} non-finite)"
    return f"[{fbound(p.ci_low)}, {fbound(p.ci_high)}]"


def baseline_table(cells: list[dict]) -> Table:
    rows = tuple((c["model"], str(c["dtype"]), str(c["dataset"]), str(c["context_len"]), str(c["method"]),
                  _seeds_cell(c), f"{c['scored_tokens']:,}", fmt_agg(c["perplexity"]), _ci_cell(c),
                  fmt_agg(c["token_accuracy"], 4), fmt_agg(c["bits_per_byte"], 4), str(c["n_nonfinite"]))
                 for c in cells)
    return Table(BASELINE_HEADER, rows)


def _comparisons_across_models(cells: list[dict]) -> list[str]:
    by: dict[tuple, list[dict]] = {}
    for c in cells:
        by.setdefault((c["dataset"], c["context_len"], c["method"]), []).append(c)
    out = []
    for (dataset, ctx, method), cs in sorted(by.items(), key=lambda kv: (str(kv[0][0]), kv[0][1] or 0)):
        best = min(cs, key=lambda c: c["perplexity"].mean)
        if len(cs) > 1:
            worst = max(cs, key=lambda c: c["perplexity"].mean)
            out.append(f"On {dataset} at context {ctx} ({method}), {best['model']} has the lowest mean perplexity "
                       f"({fnum(best['perplexity'].mean)}) of {len(cs)} models; {worst['model']} the highest "
                       f"({fnum(worst['perplexity'].mean)}).")
    return out


def _trend(cells: list[dict]) -> list[str]:
    by: dict[tuple, list[dict]] = {}
    for c in cells:
        by.setdefault((c["model"], c["dataset"], c["method"]), []).append(c)
    out = []
    for (model, dataset, method), cs in sorted(by.items(), key=lambda kv: tuple(map(str, kv[0]))):
        cs = sorted(cs, key=lambda c: c["context_len"])
        if len(cs) > 1:
            p0, p1 = cs[0]["perplexity"].mean, cs[-1]["perplexity"].mean
            out.append(f"For {model} on {dataset} ({method}), mean perplexity {'falls' if p1 < p0 else 'rises'} from "
                       f"{fnum(p0)} at context {cs[0]['context_len']} to {fnum(p1)} at context "
                       f"{cs[-1]['context_len']} ({(p1 / p0 - 1) * 100:+.1f} %).")
    return out


def _reliability(cells: list[dict]) -> list[str]:
    out = []
    for c in cells:
        where, p = f"{c['model']} / {c['dataset']} / ctx {c['context_len']}", c["perplexity"]
        if c["seed_invariant"]:
            out.append(f"{where}: the whole split was scored, so the result is seed-invariant.")
        elif math.isnan(p.ci_low):
            out.append(f"{where}: {p.n} seed(s) ({p.n_nonfinite} non-finite), so no confidence interval exists; "
                       "add seeds to get one.")
        else:
            out.append(f"{where}: {p.n} seeds resample the windows; the 95 % CI of perplexity is "
                       f"[{fbound(p.ci_low)}, {fbound(p.ci_high)}], the geometric mean ×/÷ "
                       f"{p.ci_high / p.mean:.4g}.")
    return out


def baseline_section(runs: list[Run]) -> list[Block]:
    cells = baseline_cells(runs)
    if not cells:
        return [Heading(2, "Executive summary: baselines"),
                Paragraph(f"All {len(runs)} baseline run(s) failed; see the warnings above.")]
    models, datasets = {c["model"] for c in cells}, {c["dataset"] for c in cells}
    intro = (f"{sum(len(c['seeds']) for c in cells)} completed baseline run(s): {len(models)} model(s) × "
             f"{len(datasets)} dataset(s) × {len({c['context_len'] for c in cells})} context length(s), "
             f"{sum(c['scored_tokens'] for c in cells):,} scored tokens. Values are mean ± half-width of the "
             "t-based 95 % CI across seeds (a seed picks which windows are scored); perplexity is the geometric "
             "mean across seeds, its CI the t-interval of log perplexity (NLL per token) exponentiated — "
             "asymmetric and always positive.")
    return [Heading(2, "Executive summary: baselines"), Paragraph(intro), baseline_table(cells),
            Bullets(tuple(_comparisons_across_models(cells) + _trend(cells) + _reliability(cells))),
            Figure("baseline_perplexity.png", baseline_perplexity_plot(cells),
                   "Geometric-mean perplexity vs context length per model and dataset (95 % CI across seeds, "
                   "from log perplexity)")]
