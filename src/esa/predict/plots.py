"""Plots of predicted damage (PNG, on ``matplotlib.figure.Figure``, never pyplot).

- :func:`heatmap_png`: decoder layer × bit position, two panels — log10 of the largest second-order predicted
  ΔNLL among the ``taylor`` flips (the map's summary), and the share of flips outside the Taylor regime
  (``large`` + ``nonfinite``, log scale), so the exponent bits that a polynomial cannot rank are shown, not hidden.
- :func:`scatter_png`: predicted vs measured ΔNLL of verified flips, one colour per regime, symmetric-log axes
  (damage can be negative); collapses (measured +inf) drawn at the top edge.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from esa.report.study_plots import _png, finish_axes, new_figure

COLOURS = {"taylor": "#3a6ea5", "large": "#d08c2c", "nonfinite": "#b03030"}


def _grid(summary: pd.DataFrame, value: pd.Series, how: str) -> pd.DataFrame:
    frame = summary.assign(v=value, layer=summary["layer"].fillna(-1).astype(int))
    return frame.pivot_table(index="layer", columns="bit", values="v", aggfunc=how).sort_index()


def heatmap_png(summary: pd.DataFrame, title: str) -> bytes:
    """Layer × bit heat maps from :attr:`esa.predict.vmap.VulnerabilityMap.summary`."""
    worst = _grid(summary, summary["max_predicted"], "max")
    outside = _grid(summary, summary["n_large"] + summary["n_nonfinite"], "sum") / _grid(summary, summary["n"], "sum")
    fig = new_figure((11.0, 0.22 * len(worst) + 2.2))
    axes = fig.subplots(1, 2, sharey=True)
    log10 = (lambda x: np.log10(x) if x > 0 else np.nan)  # noqa: E731 — blank where nothing is there
    panels = ((worst.map(log10), "log10 max predicted ΔNLL (taylor flips)", "viridis"),
              (outside.map(log10), "log10 share of flips outside the Taylor regime (blank: none)", "magma"))
    for ax, (grid, label, cmap) in zip(axes, panels):
        image = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap=cmap, origin="lower")
        ax.set_xticks(range(len(grid.columns)), [str(b) for b in grid.columns], fontsize=6)
        ax.set_yticks(range(len(grid.index)), [str(i) if i >= 0 else "-" for i in grid.index], fontsize=6)
        fig.colorbar(image, ax=ax, shrink=0.8).set_label(label, fontsize=8)
        ax.set_xlabel("bit position (0 = mantissa LSB)", fontsize=9)
        ax.set_title(label, fontsize=9)
    axes[0].set_ylabel("decoder layer", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def scatter_png(rows: pd.DataFrame, title: str) -> bytes:
    """Predicted (second order; r for ``large``, drawn at its rank) vs measured ΔNLL per verified flip."""
    fig = new_figure((6.4, 4.8))
    ax = fig.subplots()
    finite = rows["measured"].to_numpy(dtype=float)
    top = np.nanmax(np.where(np.isfinite(finite), finite, np.nan), initial=1.0) * 2
    for regime, part in rows.groupby("regime"):
        x = part["second"].to_numpy(dtype=float)
        y = np.where(np.isfinite(part["measured"]), part["measured"], top)
        x = np.where(np.isfinite(x), x, np.nanmax(np.abs(x[np.isfinite(x)]), initial=1.0))
        ax.scatter(x, y, s=10, alpha=0.7, color=COLOURS.get(regime), label=f"{regime} (n={len(part)})")
    lim = 1e-6
    ax.set_xscale("symlog", linthresh=lim)
    ax.set_yscale("symlog", linthresh=lim)
    ax.axhline(top, color="#999", lw=0.6, ls=":")
    ax.plot([-1, 1e3], [-1, 1e3], color="#555", lw=0.6, ls="--")
    finish_axes(ax, "predicted ΔNLL (nats/token, second order)", "measured ΔNLL (nats/token; dotted: collapse)",
                title, size=10)
    fig.tight_layout()
    return _png(fig)
