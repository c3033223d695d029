"""Baseline plots (PNG, matplotlib Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from esa.runs import as_float


def perplexity_vs_context(runs, path: Path) -> Path:
    """One line per (model, dataset): perplexity across seeds vs context length, CI as error bars.

    The centre is the geometric mean across seeds and the bars are drawn from the stored bounds (asymmetric:
    the CI comes from log perplexity, :func:`esa.baseline.aggregate`), so they never go below 0."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for run in runs:
        by_dataset: dict[str, list[dict]] = {}
        for agg in run.results["aggregates"]:
            by_dataset.setdefault(agg["dataset"], []).append(agg)
        for dataset, aggs in by_dataset.items():
            aggs = sorted(aggs, key=lambda a: a["context_len"])
            x = [a["context_len"] for a in aggs]
            y = [as_float(a["perplexity"]["mean"]) for a in aggs]
            err = [[0.0, 0.0] if a["perplexity"]["ci95"] is None else
                   [y[i] - as_float(a["perplexity"]["ci95"][0]), as_float(a["perplexity"]["ci95"][1]) - y[i]]
                   for i, a in enumerate(aggs)]
            ax.errorbar(x, y, yerr=list(zip(*err)), marker="o", capsize=3, label=f"{run.model} · {dataset}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity (geometric mean over seeds, 95% CI)")
    ax.set_title("Perplexity vs context length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
