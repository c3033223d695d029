"""PNG plots of the perturbation protocols, drawn from their result documents (matplotlib ``Figure``, Agg).

ΔNLL (nats per token, mean over windows) spans orders of magnitude between a super weight (several nats) and
a random control (≈ 1e-6), so ΔNLL axes are symmetric-log: linear within ±``LINTHRESH`` and logarithmic
beyond, keeping sign. Collapsed trials (non-finite loss) have no finite mean: they are drawn as a red ✕ at the
top of the axis and labelled, never dropped. Axis labels name the CI's method (the comparisons' stored
``ci_method``), and a figure whose comparisons have fewer windows than that CI needs says so in red.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import SymLogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from esa.perturb.protocols.bitscan import greedy_verdict
from esa.stats import few_windows_caveat, interval_phrase

LINTHRESH = 1e-4  # nats/token: |ΔNLL| below this is drawn linearly
COLORS = {"target": "tab:red", "random_k": "tab:blue", "bottom_k": "tab:green"}


def _f(x) -> float:
    """A float from a result value (None or the "nan"/"inf" strings of a written JSON included)."""
    return math.nan if x is None else float(x)


def _err(mean: float, low: float, high: float) -> tuple[float, float]:
    """Error-bar lengths below/above ``mean`` (0 where the CI is undefined)."""
    if not all(math.isfinite(v) for v in (mean, low, high)):
        return 0.0, 0.0
    return max(mean - low, 0.0), max(high - mean, 0.0)


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _linthresh(values) -> float:
    """Linear range of a symlog ΔNLL axis: LINTHRESH, or less so that the smallest non-zero value shows."""
    small = [abs(v) for v in values if math.isfinite(v) and v != 0]
    return min(LINTHRESH, max(1e-9, min(small) / 2)) if small else LINTHRESH


def _mark_collapse(ax, xs: list, ys: list[float]) -> None:
    """Red ✕ at the top of the axis where a mean is non-finite."""
    top = ax.get_ylim()[1]
    for x, y in zip(xs, ys):
        if not math.isfinite(y):
            ax.scatter([x], [top], marker="x", color="red", s=80, zorder=5, clip_on=False)
            ax.annotate("collapsed (non-finite)", (x, top), textcoords="offset points", xytext=(4, -12),
                        fontsize=7, color="red")


def _few_windows_note(fig: Figure, comparisons: list[dict]) -> None:
    """A red footnote when some comparisons have too few windows for their CI's stated coverage."""
    if caveat := few_windows_caveat(comparisons):
        fig.text(0.01, 0.005, caveat.split(":")[0] + ": CIs under-cover", fontsize=7, color="red", va="bottom")


def plot_perturb(doc: dict, path: Path) -> Path:
    """Bars: mean ΔNLL of each arm vs baseline with its 95 % CI; random_k's per-seed means as dots."""
    comps = [c for c in doc["comparisons"] if c["against"] == "baseline"]
    names = [c["name"].split(" vs ")[0] for c in comps]
    means = [_f(c["mean_delta_nll"]) for c in comps]
    errs = [_err(m, _f(c["ci_low"]), _f(c["ci_high"])) for m, c in zip(means, comps)]
    fig = Figure(figsize=(7, 4.6), layout="constrained")
    ax = fig.add_subplot()
    xs = np.arange(len(names))
    ax.bar(xs, [m if math.isfinite(m) else 0.0 for m in means], yerr=np.array(errs).T if errs else None,
           capsize=5, color=[COLORS.get(n, "grey") for n in names], alpha=0.85)
    for arm in doc["arms"]:
        spread = arm.get("seed_spread")
        if spread and arm["name"] in names:
            x = names.index(arm["name"])
            ys = [_f(v) for v in spread["mean_delta_nll"]]
            ax.scatter([x] * len(ys), ys, color="black", s=12, zorder=4, label=f"{arm['name']} per seed")
    dots = [_f(v) for a in doc["arms"] for v in (a.get("seed_spread") or {}).get("mean_delta_nll", [])]
    ax.set_yscale("symlog", linthresh=_linthresh(means + dots))
    ax.axhline(0, color="black", linewidth=0.6)
    size = {a["name"]: a["n_elements"] for a in doc["arms"]}
    ax.set_xticks(xs, [f"{n}\n({size.get(n, '?')} el.)" for n in names])
    for x, c in zip(xs, comps):
        ax.annotate(f"ΔNLL {_f(c['mean_delta_nll']):.3g}\nPPL ×{_f(c['ppl_ratio']):.6g}", (x, 0),
                    textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7)
    _mark_collapse(ax, list(xs), means)
    ax.set_ylabel(f"ΔNLL vs baseline (nats/token, mean over windows)\n{interval_phrase(comps)}", fontsize=8)
    _few_windows_note(fig, comps)
    op = doc["arms"][0]["op"] if doc["arms"] else {}
    ax.set_title(f"{doc['model']['model_id']}: {doc['targets']['spec']} under {op.get('op', '?')} vs controls",
                 fontsize=9)
    if any(a.get("seed_spread") for a in doc["arms"]):
        ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def _positions(values: list) -> tuple[np.ndarray, list[str] | None]:
    """Numeric values are their own x; anything else (bit names) is categorical."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=float), None
    return np.arange(len(values), dtype=float), [str(v) for v in values]


def plot_dose_response(doc: dict, path: Path) -> Path:
    """Mean ΔNLL vs the swept parameter for the target and the random_k control, with CI bands."""
    rows = doc["rows"]
    xs, labels = _positions([r["value"] for r in rows])
    fig = Figure(figsize=(7, 4.6), layout="constrained")
    ax = fig.add_subplot()
    for arm in ("target", "random_k"):
        if not all(arm in r for r in rows):
            continue
        mean = np.array([_f(r[arm]["mean_delta_nll"]) for r in rows])
        low, high = (np.array([_f(r[arm][k]) for r in rows]) for k in ("ci_low", "ci_high"))
        finite = np.isfinite(mean)
        ax.plot(xs[finite], mean[finite], marker="o", color=COLORS[arm], label=arm)
        band = finite & np.isfinite(low) & np.isfinite(high)
        ax.fill_between(xs[band], low[band], high[band], color=COLORS[arm], alpha=0.2)
        _mark_collapse(ax, list(xs), list(mean))
    ax.set_yscale("symlog", linthresh=_linthresh([_f(r[a]["mean_delta_nll"]) for r in rows
                                                  for a in ("target", "random_k") if a in r]))
    if labels:
        ax.set_xticks(xs, labels, rotation=30)
    elif np.all(xs >= 0) and xs.max() > 0 and xs[xs > 0].min() > 0 and xs.max() / xs[xs > 0].min() > 20:
        ax.set_xscale("symlog", linthresh=xs[xs > 0].min())
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xlabel(f"{rows[0]['op']['op']} {doc['parameter']}" if rows else doc["parameter"])
    comps = [r[a] for r in rows for a in ("target", "random_k") if a in r]
    ax.set_ylabel(f"ΔNLL vs baseline (nats/token)\n{interval_phrase(comps)} band", fontsize=8)
    _few_windows_note(fig, comps)
    ax.set_title(f"{doc['model']['model_id']}: dose-response of {doc['targets']['spec']} "
                 f"({doc['targets']['n_elements']} elements)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def plot_bitscan(doc: dict, path: Path) -> Path:
    """Heat map weights × bit positions of single-flip mean ΔNLL; non-finite cells grey and labelled; the greedy
    collapse search's flips outlined in gold with their order (#1, #2, …)."""
    weights, cells = doc["weights"], doc["cells"]
    bits = [b["spec"] for b in doc["bits"]]
    grid = np.array([_f(c["mean_delta_nll"]) for c in cells]).reshape(len(weights), len(bits))  # (N, bits)
    finite = grid[np.isfinite(grid)]
    vmax = max(float(np.abs(finite).max()) if finite.size else 1.0, 10 * LINTHRESH)
    fig = Figure(figsize=(3 + 1.3 * len(bits), 1.8 + 0.5 * len(weights)), layout="constrained")
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(grid)
    cmap = colormaps["RdBu_r"].with_extremes(bad="lightgrey")
    norm = SymLogNorm(_linthresh(list(finite)), vmin=-vmax, vmax=vmax)
    im = ax.imshow(masked, cmap=cmap, aspect="auto", norm=norm)
    for (i, j), v in np.ndenumerate(grid):
        text = f"{v:.2g}" if math.isfinite(v) else ("inf" if v == math.inf else "NaN")
        dark = math.isfinite(v) and abs(float(norm(v)) - 0.5) > 0.3
        ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    column = {b["position"]: j for j, b in enumerate(doc["bits"])}
    for k, step in enumerate(doc["greedy"]["steps"], start=1):  # the greedy choices, in order
        i, j = step["weight"], column[step["bit"]]
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="gold", linewidth=2))
        ax.text(j - 0.45, i - 0.45, f"#{k}", ha="left", va="top", fontsize=6, color="gold")
    ax.set_xticks(range(len(bits)), bits, rotation=30)
    ax.set_yticks(range(len(weights)), [w["label"] for w in weights], fontsize=7)
    fig.colorbar(im, ax=ax, label="ΔNLL (nats/token)")
    g = doc["greedy"]
    ax.set_title(f"{doc['model']['model_id']}: single bit flips — {greedy_verdict(g)} (PPL > {g['collapse_ppl']:g})",
                 fontsize=9)
    return _save(fig, path)
