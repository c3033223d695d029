"""The super-weight activation profile: max |input| and max |output| of each layer's MLP output projection.

Yu et al. 2024 (Fig. 2) locate super weights by eye as a spike in both curves at one early layer; this plot is
that figure, log-scaled, with the detected candidates starred and each layer's output-spike threshold
drawn. With
``iterate`` the later rounds (after zeroing what was found) are drawn faded, so the collapse of the spike is
visible. Uses matplotlib's Agg canvas through ``Figure`` directly: no pyplot global state, no display needed.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from esa.sensitivity.superweights import SearchRound, SuperWeightReport

_TINY = 1e-12  # log-scale floor for an all-zero layer


def _draw_round(ax, rnd: SearchRound, first: bool) -> None:
    layers = [p.layer for p in rnd.layers]
    style = {"alpha": 1.0, "linestyle": "-"} if first else {"alpha": 0.35, "linestyle": "--"}
    suffix = "" if first else f" (round {rnd.iteration}, {len(rnd.zeroed)} zeroed)"
    ax.plot(layers, [max(p.max_input, _TINY) for p in rnd.layers], marker="o", color="tab:blue",
            label=f"max |input|{suffix}", **style)
    ax.plot(layers, [max(p.max_output, _TINY) for p in rnd.layers], marker="s", color="tab:red",
            label=f"max |output|{suffix}", **style)


def plot_activation_profile(report: SuperWeightReport, path: Path | str, title: str = "") -> Path:
    """Write the profile as a PNG at ``path`` and return the path."""
    path = Path(path)
    fig = Figure(figsize=(9, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for k, rnd in enumerate(report.rounds):
        _draw_round(ax, rnd, first=k == 0)
    first = report.rounds[0]
    thr = report.thresholds
    limits = [max(thr.spike_floor, thr.spike_ratio * p.typical_output) for p in first.layers]
    ax.step([p.layer for p in first.layers], limits, where="mid", color="tab:red", linewidth=0.8, linestyle=":",
            label=f"output spike threshold per layer ({thr.spike_ratio:g}× the layer's median channel max, "
                  f"≥ {thr.spike_floor:g})")
    for w in report.candidates:
        ax.scatter([w.layer], [w.output_activation], marker="*", s=220, color="gold", edgecolors="black",
                   zorder=5)
        ax.annotate(f"L{w.layer} [{w.row}, {w.col}]" + (f" r{w.iteration}" if w.iteration else ""),
                    (w.layer, w.output_activation), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("max |activation| over tokens")
    ax.set_title(title or f"MLP output projection activations — {len(report.candidates)} super-weight "
                          f"candidate(s) [row, col] = (out, in)")
    ax.grid(True, which="major", alpha=0.3)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * 4)  # headroom (log scale) so the top candidate's label clears the frame
    fig.legend(fontsize=7, loc="outside lower center", ncols=3)  # below the axes: never over a spike
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
