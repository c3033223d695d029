"""Figures of the study report, returned as PNG bytes (embedded in report.html, written next to report.md).

Each function takes rows the report already computed (so a figure can never disagree with its table) and
returns the PNG encoding of one matplotlib figure (fixed size and dpi). Figures are ``matplotlib.figure.Figure``
objects drawn by the Agg canvas that ``savefig`` picks for PNG: pyplot is never imported and the global backend is
never switched, so importing ESA in a notebook leaves its inline plots alone.
"""

from __future__ import annotations

import io
import math

from matplotlib.figure import Figure

from esa.stats import MIN_WINDOWS, interval_phrase


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure outside pyplot: no figure manager, no backend switch; it is freed with its last reference."""
    return Figure(figsize=figsize)


def subplots(figsize: tuple[float, float]):
    """(figure, one axes), like ``pyplot.subplots`` but outside pyplot (:func:`new_figure`)."""
    fig = new_figure(figsize)
    return fig, fig.subplots()


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def finish_axes(ax, xlabel: str, ylabel: str, title: str, size: int | None = None, legend: int = 7) -> None:
    """Labels, title (``size``: their font size, None = matplotlib's), a light grid and the legend."""
    font = {} if size is None else {"fontsize": size}
    ax.set_xlabel(xlabel, **font)
    ax.set_ylabel(ylabel, **font)
    ax.set_title(title, **font)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend)


def _err(mean: float, low: float, high: float) -> tuple[float, float]:
    """(below, above) error-bar lengths; zero when the CI is undefined (one seed, non-finite seeds).

    Drawn from the bounds, not a half-width, so an asymmetric CI (perplexity, aggregated on the log scale) keeps
    its shape and never reaches below its lower bound."""
    if math.isnan(low) or math.isnan(high):
        return 0.0, 0.0
    return mean - low, high - mean


def baseline_perplexity_plot(cells: list[dict]) -> bytes:
    """Geometric-mean perplexity over seeds vs context length, one line per (model, dataset), 95 % CI as
    asymmetric error bars (the log-scale CI of :func:`esa.stats.aggregate_seeds`, always above 0).

    ``cells``: dicts with model, dataset, context_len and ``perplexity`` (an :class:`esa.stats.SeedAggregate`).
    """
    fig, ax = subplots(figsize=(7.0, 4.2))
    lines: dict[tuple[str, str], list[dict]] = {}
    for c in cells:
        lines.setdefault((c["model"], c["dataset"]), []).append(c)
    for (model, dataset), pts in lines.items():
        pts = sorted(pts, key=lambda c: c["context_len"])
        x = [c["context_len"] for c in pts]
        y = [c["perplexity"].mean for c in pts]
        err = [_err(c["perplexity"].mean, c["perplexity"].ci_low, c["perplexity"].ci_high) for c in pts]
        ax.errorbar(x, y, yerr=list(zip(*err)), marker="o", capsize=3, label=f"{_short(model)} · {dataset}")
    contexts = sorted({c["context_len"] for c in cells})
    if len(contexts) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.minorticks_off()
    finish_axes(ax, "context length (tokens)", "perplexity (geometric mean over seeds, 95% CI)",
                "Baseline perplexity vs context length")
    return _png(fig)


def comparison_plot(rows: list[dict]) -> bytes:
    """Horizontal bars of mean ΔNLL (nats/token) per comparison with its 95 % CI; collapsed ones in red.

    ``rows``: dicts with label, mean_delta_nll, ci_low, ci_high, collapsed, and optionally ci_method (the CI's
    method, named on the axis) and few_windows (labelled "†" : fewer than MIN_WINDOWS windows).
    """
    fig, ax = subplots(figsize=(7.0, 0.9 + 0.35 * len(rows)))
    y = list(range(len(rows)))[::-1]
    means = [r["mean_delta_nll"] if math.isfinite(r["mean_delta_nll"]) else 0.0 for r in rows]
    err = [_err(m, r["ci_low"], r["ci_high"]) for m, r in zip(means, rows)]
    colors = ["#c53030" if r["collapsed"] else "#2b6cb0" for r in rows]
    ax.barh(y, means, xerr=list(zip(*err)) if rows else None, color=colors, capsize=3)
    ax.set_yticks(y, [_short(r["label"], 60) + (" †" if r.get("few_windows") else "") for r in rows], fontsize=7)
    ax.axvline(0.0, color="black", linewidth=0.8)
    few = f"; † < {MIN_WINDOWS} windows: CI under-covers" if any(r.get("few_windows") for r in rows) else ""
    ax.set_xlabel(f"mean ΔNLL per window (nats/token), {interval_phrase(rows)}; red = collapsed{few}", fontsize=8)
    ax.set_title("Causal validation: perturbation effects")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _short(text: str, width: int = 40) -> str:
    """Keep the end of long labels (model paths differ at the end)."""
    return text if len(text) <= width else "…" + text[-(width - 1):]


def layer_role_heatmap_png(table, title: str) -> bytes:
    """:func:`esa.sensitivity.plots.layer_role_heatmap` of one ranking table, as PNG bytes instead of a file.

    ``table``: a ranking table (:mod:`esa.sensitivity.ranking`); cells count its weights per decoder layer ×
    module role (:func:`esa.sensitivity.plots.layer_role_counts`).
    """
    from esa.sensitivity.plots import layer_role_heatmap

    buf = io.BytesIO()
    layer_role_heatmap(table, buf, title)  # savefig writes to any binary file object
    return buf.getvalue()
