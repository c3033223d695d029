"""Figures of the study report's dose-response and bit-scan sections, as PNG bytes.

Each function takes the rows :mod:`esa.report.study_causal` already put in its tables, so a figure can never
disagree with its table. ΔNLL axes are symmetric-log (a super weight moves NLL by nats, a random control by
1e-6); a non-finite mean (a collapse) is drawn as a red ✕ at the top of its panel, never dropped.
"""

from __future__ import annotations

import math

from esa.report.study_plots import _png, _short, finish_axes, new_figure, subplots

COLORS = {"target": "tab:red", "random_k": "tab:blue"}
MAX_PANELS = 12  # dose-response panels per figure; the table lists every run


def _linthresh(values: list[float]) -> float:
    small = [abs(v) for v in values if math.isfinite(v) and v != 0]
    return min(1e-4, max(1e-9, min(small) / 2)) if small else 1e-4


def _finite(values: list[float]) -> list[float]:
    return [v if math.isfinite(v) else math.nan for v in values]


def _mark_collapse(ax, xs: list, ys: list[float]) -> None:
    top = ax.get_ylim()[1]
    for x, y in zip(xs, ys):
        if not math.isfinite(y):
            ax.scatter([x], [top], marker="x", color="red", s=60, zorder=5, clip_on=False)


def _curve(ax, xs: list, pts: list[dict], arm: str, style: str = "-", label: str | None = None) -> None:
    """Mean ΔNLL with its 95 % CI band for one arm (``pts``: table rows in x order)."""
    mean = [p["mean"] for p in pts]
    low, high = _finite([p["ci_low"] for p in pts]), _finite([p["ci_high"] for p in pts])
    ax.plot(xs, _finite(mean), style, marker="o", color=COLORS[arm], label=label or arm)
    ax.fill_between(xs, low, high, color=COLORS[arm], alpha=0.15, linewidth=0)


def dose_plot(runs: list[dict], ylabel: str = "mean ΔNLL (nats/token)", symlog: bool = True) -> bytes:
    """One panel per dose-response run: ``mean`` (ΔNLL, or Δ accuracy) vs the swept value, target vs random_k.

    ``runs``: dicts with ``title``, ``parameter`` and ``rows`` (value, arm, mean, ci_low, ci_high). Values sit
    at equal spacing in the study's order (factors, sigmas and bit names alike), labelled with their values.
    """
    shown = runs[:MAX_PANELS]
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig = _figure(cols, rows)
    for i, run in enumerate(shown):
        ax = fig.add_subplot(rows, cols, i + 1)
        values = list(dict.fromkeys(str(r["value"]) for r in run["rows"]))
        for arm in ("target", "random_k"):
            pts = [r for r in run["rows"] if r["arm"] == arm]
            if pts:
                _curve(ax, [values.index(str(p["value"])) for p in pts], pts, arm)
        every = [v for r in run["rows"] for v in (r["mean"], r["ci_low"], r["ci_high"])]
        if symlog:
            ax.set_yscale("symlog", linthresh=_linthresh(every))
        ax.axhline(0.0, color="black", linewidth=0.6)
        for arm in ("target", "random_k"):
            pts = [r for r in run["rows"] if r["arm"] == arm]
            _mark_collapse(ax, [values.index(str(p["value"])) for p in pts], [p["mean"] for p in pts])
        ax.set_xticks(range(len(values)), values, fontsize=7)
        finish_axes(ax, run["parameter"], ylabel, _short(run["title"], 48), 8)
    return _png(fig)


def dose_vs_k_plot(groups: list[dict]) -> bytes:
    """Per group of runs differing only in k: mean ΔNLL vs k (log), one line per swept value and arm.

    ``groups``: dicts with ``title``, ``parameter`` and ``points`` (k, value, arm, mean, ci_low, ci_high).
    """
    shown = groups[:MAX_PANELS]
    cols = min(2, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig = _figure(cols, rows, width=5.2)
    for i, g in enumerate(shown):
        ax = fig.add_subplot(rows, cols, i + 1)
        values = list(dict.fromkeys(str(p["value"]) for p in g["points"]))
        for j, value in enumerate(values):
            for arm, style in (("target", "-"), ("random_k", "--")):
                pts = sorted((p for p in g["points"] if str(p["value"]) == value and p["arm"] == arm),
                             key=lambda p: p["k"])
                if not pts:
                    continue
                ks, mean = [p["k"] for p in pts], [p["mean"] for p in pts]
                err = [[max(m - p["ci_low"], 0) if math.isfinite(m) and math.isfinite(p["ci_low"]) else 0
                        for m, p in zip(mean, pts)],
                       [max(p["ci_high"] - m, 0) if math.isfinite(m) and math.isfinite(p["ci_high"]) else 0
                        for m, p in zip(mean, pts)]]
                ax.errorbar(ks, _finite(mean), yerr=err, fmt=style, marker="o", capsize=3,
                            color=f"C{j}", alpha=1.0 if arm == "target" else 0.6,
                            label=f"{arm} {g['parameter']}={value}")
        every = [v for p in g["points"] for v in (p["mean"], p["ci_low"], p["ci_high"])]
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=_linthresh(every))
        ax.axhline(0.0, color="black", linewidth=0.6)
        finish_axes(ax, "k (top weights of the ranking)", "mean ΔNLL (nats/token), 95% CI", _short(g["title"], 60),
                    8, legend=6)
    return _png(fig)


def greedy_plot(runs: list[dict]) -> bytes:
    """Perplexity (log) after 0, 1, 2 … greedily chosen bit flips per bit-scan run; dashed: collapse threshold.

    ``runs``: dicts with ``title``, ``baseline_ppl``, ``collapse_ppl`` and ``steps`` (each with ``ppl``).
    """
    fig, ax = subplots(figsize=(7.0, 4.2))
    for i, run in enumerate(runs):
        ppl = [run["baseline_ppl"]] + [s["ppl"] for s in run["steps"]]
        xs = list(range(len(ppl)))
        ax.plot(xs, _finite(ppl), marker="o", color=f"C{i % 10}", label=_short(run["title"], 50))
        ax.axhline(run["collapse_ppl"], color=f"C{i % 10}", linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(1 + max((len(r["steps"]) for r in runs), default=0)))
    for run in runs:
        ppl = [run["baseline_ppl"]] + [s["ppl"] for s in run["steps"]]
        _mark_collapse(ax, list(range(len(ppl))), ppl)
    finish_axes(ax, "bit flips applied (greedy: most damaging first)", "perplexity (log); dashed: collapse threshold",
                "Bit scans: cumulative damage vs flips (red ✕: non-finite loss)")
    return _png(fig)


def _figure(cols: int, rows: int, width: float = 4.0):
    return new_figure(figsize=(width * cols, 3.2 * rows))
