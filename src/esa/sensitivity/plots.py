"""Sensitivity plots (PNG): score distribution and where the top-k weights sit.

Drawn on ``matplotlib.figure.Figure`` (the Agg canvas ``savefig`` picks for PNG), never through pyplot, so the
session's backend — a notebook's inline one — is left as it is."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def score_histogram(sample: np.ndarray, path: Path, title: str) -> Path:
    """Histogram of log10(score) from a random sample of the scores; zeros are counted in the legend."""
    sample = np.asarray(sample, dtype=np.float64)
    positive = sample[sample > 0]
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    if len(positive):
        ax.hist(np.log10(positive), bins=120, color="#3a6ea5", log=True)
    ax.set_xlabel("log10(score)")
    ax.set_ylabel("weights in sample (log scale)")
    ax.set_title(title, fontsize=10)
    ax.text(0.99, 0.97, f"sample n={len(sample):,}\nzeros: {len(sample) - len(positive):,}",
            transform=ax.transAxes, ha="right", va="top", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def layer_role_counts(table: pd.DataFrame) -> pd.DataFrame:
    """Top-k weights per (layer, role): layers 0..max as rows ("-" for non-layer parameters), roles as columns."""
    layer = table["layer"].astype("Int64").astype(object).where(table["layer"].notna(), "-")
    counts = pd.crosstab(layer.astype(str), table["role"])
    present = [int(i) for i in counts.index if i != "-"]
    numeric = [str(i) for i in range(max(present) + 1)] if present else []  # empty layers show as 0 rows
    return counts.reindex(numeric + (["-"] if "-" in counts.index else []), fill_value=0)


def layer_role_heatmap(table: pd.DataFrame, path: Path, title: str) -> Path:
    """Heatmap of top-k counts, decoder layer × module role."""
    counts = layer_role_counts(table)
    fig = Figure(figsize=(1.2 + 0.8 * max(1, counts.shape[1]), 1.5 + 0.22 * max(1, counts.shape[0])))
    ax = fig.subplots()
    image = ax.imshow(counts.to_numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(counts.shape[1]), counts.columns, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(counts.shape[0]), counts.index, fontsize=7)
    ax.set_xlabel("module role")
    ax.set_ylabel("decoder layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="top-k weights")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
