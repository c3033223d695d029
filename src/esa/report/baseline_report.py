"""``baseline_report.md``: the seed's report shape, with every sentence computed from results.json.

Insights are computed per (dataset, context length) — never averaged across datasets, whose perplexities are
not comparable. Warnings (sanity guard, non-finite losses) come first.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from esa.report.loading import BaselineRun, entry_rows, load_runs
from esa.report.plots import perplexity_vs_context
from esa.runs import as_float


def _fmt_ci(stat: dict, digits: int = 3) -> str:
    mean = as_float(stat["mean"])
    if stat["ci95"] is None:
        return f"{mean:.{digits}f}"
    lo, hi = (as_float(v) for v in stat["ci95"])
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _centre(stat: dict) -> str:
    """What ``stat["mean"]`` is: results written before log-scale aggregation carry no ``scale``."""
    return "geometric mean" if stat.get("scale") == "log" else "mean"


def _summary_table(runs: list[BaselineRun]) -> list[str]:
    lines = ["| model | dataset | ctx | method | tokens scored | seeds | perplexity (geometric mean, 95% CI) | "
             "token acc | "
             "bits/byte | tok/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        tps = defaultdict(list)
        for e in run.results["entries"]:
            tps[(e["dataset"], e["context_len"])].append(e["metrics"]["tokens_per_second"] or 0.0)
        for a in run.results["aggregates"]:
            seeds = "invariant (whole split)" if a["seed_invariant"] else ",".join(map(str, a["seeds"]))
            speed = sum(tps[(a["dataset"], a["context_len"])]) / len(tps[(a["dataset"], a["context_len"])])
            ctx = f"{a['context_len']}{' (long)' if a['long_context'] else ''}"
            lines.append(f"| {run.model} | {a['dataset']} | {ctx} | {a['method']} | "
                         f"{sum(a['scored_tokens']):,} | {seeds} | {_fmt_ci(a['perplexity'])} | "
                         f"{_fmt_ci(a['token_accuracy'])} | {_fmt_ci(a['bits_per_byte'])} | {speed:,.0f} |")
    return lines


def _pm(metrics: dict, key: str) -> str:
    """``value ± stderr`` of a zero-shot metric, or a dash when the task does not define it."""
    if key not in metrics:
        return "–"
    return f"{as_float(metrics[key]):.4f} ± {as_float(metrics[key + '_stderr']):.4f}"


def _zeroshot_table(runs: list[BaselineRun]) -> list[str]:
    """Task × model: acc and acc_norm ± standard error (lm-evaluation-harness definitions)."""
    rows = [(run.model, task, z) for run in runs for task, z in (run.results.get("zeroshot") or {}).items()]
    if not rows:
        return []
    lines = ["## Zero-shot Accuracy", "", "| task | model | items | acc ± stderr | acc_norm ± stderr | other |",
             "|---|---|---|---|---|---|"]
    for model, task, z in sorted(rows, key=lambda r: (r[1], r[0])):
        m = z["metrics"]
        other = f"perplexity {_pm(m, 'perplexity')}" if "perplexity" in m else ""
        lines.append(f"| {task} | {model} | {z['config']['n']} | {_pm(m, 'acc')} | {_pm(m, 'acc_norm')} | {other} |")
    return lines + [""]


def _long_context_table(runs: list[BaselineRun]) -> list[str]:
    rows = [(run.model, e) for run in runs for e in run.results["entries"] if e["long_context"]]
    if not rows:
        return []
    lines = ["## Long Context", "", "| model | dataset | ctx | tokens scored | perplexity | peak memory |",
             "|---|---|---|---|---|---|"]
    for model, e in rows:
        mem = ", ".join(f"{k.replace('_bytes', '')} {v / 2**30:.2f} GiB" for k, v in e["peak_memory"].items())
        lines.append(f"| {model} | {e['dataset']} | {e['context_len']} | {e['metrics']['scored_tokens']:,} | "
                     f"{as_float(e['metrics']['perplexity']):.3f} | {mem} |")
    return lines + [""]


def _insights(runs: list[BaselineRun]) -> list[str]:
    """Sentences computed per (dataset, ctx) and per (model, dataset) across contexts."""
    cells: dict[tuple, list[tuple[str, float]]] = defaultdict(list)
    curves: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
    for run in runs:
        for a in run.results["aggregates"]:
            ppl = as_float(a["perplexity"]["mean"])
            cells[(a["dataset"], a["context_len"])].append((run.model, ppl))
            curves[(run.model, a["dataset"])].append((a["context_len"], ppl))
    out = []
    for (dataset, ctx), vals in sorted(cells.items()):
        best = min(vals, key=lambda v: v[1])
        if len(vals) > 1:
            worst = max(vals, key=lambda v: v[1])
            out.append(f"On {dataset} at context {ctx}, {best[0]} has the lowest perplexity ({best[1]:.3f}) of "
                       f"{len(vals)} models; {worst[0]} the highest ({worst[1]:.3f}).")
        else:
            out.append(f"On {dataset} at context {ctx}, {best[0]} reaches perplexity {best[1]:.3f}.")
    for (model, dataset), pts in sorted(curves.items()):
        pts = sorted(pts)
        if len(pts) > 1:
            (c0, p0), (c1, p1) = pts[0], pts[-1]
            change = (p1 / p0 - 1) * 100
            direction = "falls" if p1 < p0 else "rises"
            out.append(f"For {model} on {dataset}, perplexity {direction} from {p0:.3f} at context {c0} to "
                       f"{p1:.3f} at context {c1} ({change:+.1f} %).")
    return [f"- {s}" for s in out]


def _configuration(runs: list[BaselineRun]) -> list[str]:
    lines = []
    for run in runs:
        cfg, prov, fp = run.manifest["config"], run.manifest["provenance"], run.results["model"]
        lines.append(f"- **{run.model}**: {fp['n_params']:,} parameters, dtype {fp['dtype']}, revision "
                     f"`{fp['revision'][:24]}`, device {prov['device']}, profile `{cfg['profile']}`, window method "
                     f"`{cfg['method']}`, BOS `{cfg['bos']}`, micro-batch budget {cfg['batch_tokens']:,} tokens, "
                     f"token budget per cell {cfg['max_eval_tokens'] or 'whole split'}, ESA {prov['esa_version']} "
                     f"(git {prov['git_sha'] or 'unknown'}), torch {prov['libraries']['torch']}, transformers "
                     f"{prov['libraries']['transformers']}.")
    return lines


def _reliability(runs: list[BaselineRun]) -> list[str]:
    lines = []
    for run in runs:
        for a in run.results["aggregates"]:
            where = f"{run.model} / {a['dataset']} / ctx {a['context_len']}"
            if a["seed_invariant"]:
                lines.append(f"- {where}: the whole split was evaluated, so the number is seed-invariant "
                             "(no seed variance exists to report).")
            elif a["perplexity"]["ci95"] is None:
                lines.append(f"- {where}: one seed ({a['seeds'][0]}) on a sampled subset; run more --seeds for a CI.")
            else:
                lo, hi = (as_float(v) for v in a["perplexity"]["ci95"])
                mean = as_float(a["perplexity"]["mean"])
                lines.append(f"- {where}: {len(a['seeds'])} seeds resample the windows; perplexity 95 % CI "
                             f"[{lo:.4g}, {hi:.4g}] around the {_centre(a['perplexity'])} {mean:.3f}.")
    return lines


def _next_steps(runs: list[BaselineRun], warnings: list[str]) -> list[str]:
    steps = []
    if warnings:
        steps.append(f"Investigate the {len(warnings)} warning(s) above before using these numbers.")
    single = [a for r in runs for a in r.results["aggregates"] if not a["seed_invariant"] and len(a["seeds"]) < 3]
    if single:
        steps.append(f"{len(single)} cell(s) have fewer than 3 seeds on sampled windows: add --seeds for CIs.")
    datasets = {a["dataset"] for r in runs for a in r.results["aggregates"]}
    if len(datasets) < 2:
        steps.append("Only one dataset was evaluated: add a second corpus to check that conclusions transfer.")
    if len(runs) < 2:
        steps.append("Only one model was evaluated: add models to compare, or run `esa sensitivity` next.")
    return [f"- {s}" for s in steps] or ["- All cells have ≥ 3 seeds or full splits and no warnings."]


def write_baseline_report(paths: list[Path], out_dir: Path) -> Path:
    """Write ``baseline_report.md`` and ``perplexity_vs_context.png`` into ``out_dir``; return the .md path."""
    runs = load_runs(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = perplexity_vs_context(runs, out_dir / "perplexity_vs_context.png")
    warnings = [f"{r.model}: {w}" for r in runs for w in r.results["warnings"]]
    rows = entry_rows(runs)
    lines = ["# ESA baseline report", ""]
    if warnings:
        lines += ["> **Warnings**", *[f"> - {w}" for w in warnings], ""]
    lines += ["## Overview", "",
              f"{len(runs)} model(s), {len({r['dataset'] for r in rows})} dataset(s), "
              f"{len({r['context_len'] for r in rows})} context length(s), {len(rows)} evaluated cell(s), "
              f"{sum(r['scored_tokens'] for r in rows):,} scored tokens in total.", "",
              "## Model Performance Summary", "", *_summary_table(runs), "",
              f"![perplexity vs context]({plot.name})", "",
              *_zeroshot_table(runs), *_long_context_table(runs),
              "## Key Insights", "", *_insights(runs), "",
              "## Testing Configuration", "", *_configuration(runs), "",
              "## Statistical Reliability", "", *_reliability(runs), "",
              "## Next Steps", "", *_next_steps(runs, warnings), ""]
    path = out_dir / "baseline_report.md"
    path.write_text("\n".join(lines))
    return path
