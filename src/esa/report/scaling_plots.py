"""Scaling plots: each statistic vs parameter count on log–log axes, model names at the points, fitted line.

Reads only a ``scaling.json`` document (:mod:`esa.scaling.fits`), so a stored run can be re-plotted::

    plot_scaling(esa.core.files.read_json("runs/scaling/scaling.json"), Path("runs/scaling"))

A statistic whose value is missing, non-finite or ≤ 0 for a model (no super weights; a random_k ΔNLL below 0)
cannot sit on a log axis: that model is left out of the panel and counted in its title. Uses matplotlib's
``Figure`` directly (Agg canvas): no pyplot global state, no display needed.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

PANEL = (4.2, 3.4)  # inches per statistic panel
COLUMNS = 3  # panels per row of the overview figure


def _num(value) -> float | None:
    """A JSON value as a positive finite float, else None ("nan"/"inf" strings, null, ≤ 0)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and x > 0 else None


def _slope_text(entry: dict) -> str:
    fit = entry.get("fit")
    if fit is None:
        n = len(entry.get("models", []))
        return f"no fit: {n} usable point(s), need ≥ 2" if n < 2 else "no fit: " + entry.get("reason", "")[:60]
    ci = fit.get("slope_ci95")
    spread = f"95% CI [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "CI undefined (2 points)"
    return f"slope {fit['slope']:.3g}, {spread}"


def _draw(ax, doc: dict, key: str) -> None:
    """One statistic on ``ax``: points with model names, the fitted power law, slope and CI in the title."""
    x_key = doc["x_axis"]
    entry = doc["fits"][key]
    points = [(_num(r.get(x_key)), _num(r.get(key)), r["model"]) for r in doc["rows"]]
    kept = [(x, y, name) for x, y, name in points if x is not None and y is not None]
    for x, y, name in kept:
        ax.scatter([x], [y], color="tab:blue", zorder=3)
        ax.annotate(Path(name).name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=7)
    fit = entry.get("fit")
    if fit is not None and kept:
        xs = np.array([x for x, _, _ in kept])
        grid = np.logspace(np.log10(xs.min()) - 0.1, np.log10(xs.max()) + 0.1, 50)  # (50,)
        ax.plot(grid, 10.0 ** (fit["intercept"] + fit["slope"] * np.log10(grid)), color="tab:red",
                linewidth=1, label=f"fit: 10^{fit['intercept']:.3g} · N^{fit['slope']:.3g}")
        ax.legend(fontsize=6, loc="best")
    if kept:
        ax.set_xscale("log")
        ax.set_yscale("log")
    dropped = len(points) - len(kept)
    label = doc["statistics"][key]["label"]
    ax.set_title(f"{label}\n{_slope_text(entry)}" + (f"; {dropped} model(s) not plottable" if dropped else ""),
                 fontsize=7)
    ax.set_xlabel(x_key.replace("_", " "), fontsize=7)
    ax.tick_params(labelsize=6)
    ax.grid(True, which="major", alpha=0.3)


def plot_statistic(doc: dict, key: str, path: Path) -> Path:
    """One statistic's PNG at ``path``."""
    fig = Figure(figsize=(PANEL[0] * 1.4, PANEL[1] * 1.4), layout="constrained")
    _draw(fig.add_subplot(), doc, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _overview(doc: dict) -> Figure:
    keys = list(doc["fits"])
    columns = min(COLUMNS, max(1, len(keys)))
    rows = math.ceil(len(keys) / columns)
    fig = Figure(figsize=(PANEL[0] * columns, PANEL[1] * rows), layout="constrained")
    for i, key in enumerate(keys):
        _draw(fig.add_subplot(rows, columns, i + 1), doc, key)
    models = ", ".join(Path(r["model"]).name for r in doc["rows"])
    fig.suptitle(f"scaling: {models} (x = {doc['x_axis']})", fontsize=9)
    return fig


def plot_overview(doc: dict, path: Path) -> Path:
    """All statistics of ``doc["fits"]`` in one grid PNG at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _overview(doc).savefig(path, dpi=100)
    return path


def overview_png(doc: dict) -> bytes:
    """The overview grid as PNG bytes (embedded by the study report)."""
    buf = io.BytesIO()
    _overview(doc).savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def plot_scaling(doc: dict, out_dir: Path) -> list[Path]:
    """``<out_dir>/scaling.png`` (every statistic) and ``<out_dir>/plots/<statistic>.png`` for each fitted one
    (an unfitted statistic's few points are in the overview already); returns the paths."""
    out_dir = Path(out_dir)
    paths = [plot_overview(doc, out_dir / "scaling.png")]
    paths += [plot_statistic(doc, key, out_dir / "plots" / f"{key}.png")
              for key, entry in doc["fits"].items() if entry.get("fit") is not None]
    return paths
