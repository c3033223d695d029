"""The study report's Sensitivity section, computed from the ``sensitivity`` rows and their ranking artifacts.

A sensitivity run (:mod:`esa.kinds.sensitivity`) scores every selected weight of one
model with one scorer on one calibration seed and keeps the top (or bottom, ``config["bottom"]``) k. Its row
holds the heavy-tail statistics of *all* scores (``metrics["tail"]``, :class:`esa.sensitivity.stability.TailStats`)
and the path of its ranking table, ``metrics["ranking_file"]``, relative to the database's folder
(``artifacts/<run_id>/ranking.parquet``). The section shows:

1. **Heavy tails** — one row per model × scorer setting (scorer, mode, k, calibration): the share of the summed
   score held by the top 0.1 % / 1 % of weights and the Gini coefficient, mean ± half-width of the t-based
   95 % CI across seeds (:func:`esa.stats.aggregate_seeds`), plus the Gini bounds: the smallest ``gini_low``
   and largest ``gini_high`` over the seeds, an interval that holds every seed's exact Gini. The scores do not
   depend on the direction, so a top and a bottom run of one seed count once (the top run's).
2. **Stability across seeds** — per model × scorer × direction with ≥ 2 seeds, the pairwise Jaccard overlap
   of the seeds' top-k sets (:func:`esa.sensitivity.stability.seed_overlap`).
3. **Agreement across scorers** — per model × direction and pair of scorers, Jaccard and Spearman ρ over the
   union of the two rankings (:func:`esa.sensitivity.stability.compare_rankings`), averaged over the seeds
   both have. A seed-invariant scorer (``magnitude``, which reads no data, runs for one seed only) is paired
   with every seed of the other. Example: magnitude {0} vs grad_x_weight {0, 1} → seeds 0 and 1, both with
   the one magnitude ranking.
4. **Where the top-k sit** — a decoder layer × module role heatmap of the first seed's top-k per model ×
   scorer (:func:`esa.sensitivity.plots.layer_role_counts`), with the busiest role and layer in words.

Rows without a ranking artifact (written by hand or by an older ESA) are listed with every stored metric
(:func:`esa.report.study_report.generic_section`); a ranking file that has gone missing is named, and the
tables that need it leave that run out.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from esa.report.html import Block, Bullets, Figure, Heading, Paragraph, Table
from esa.report.study_plots import layer_role_heatmap_png
from esa.report.study_report import Run, fmt_agg, fnum, generic_section
from esa.core.files import as_float
from esa.sensitivity.plots import layer_role_counts
from esa.sensitivity.ranking import read_ranking
from esa.sensitivity.stability import compare_rankings, seed_overlap
from esa.stats import aggregate_seeds


@dataclass(frozen=True)
class Ranked:
    """A completed sensitivity run and its ranking table (None when the artifact file is missing)."""

    run: Run
    table: pd.DataFrame | None

    @property
    def setting(self) -> tuple:
        """What a seed must share to be compared: model, scorer, mode, k and the calibration set."""
        c = self.run.config
        return (self.run.model_name, str(c.get("scorer")), str(c.get("mode")), c.get("k"), c.get("dataset"),
                c.get("context_len"), c.get("max_samples"))

    @property
    def direction(self) -> str:
        return "bottom" if self.run.config.get("bottom") else "top"

    @property
    def seed(self) -> int:
        return int(self.run.config.get("seed") or 0)

    @property
    def invariant(self) -> bool:
        return bool(self.run.metrics.get("seed_invariant"))


def load_rankings(runs: list[Run]) -> tuple[list[Ranked], list[Run], list[str]]:
    """(runs with a ranking artifact, completed runs without one, artifact paths that are missing)."""
    ranked, bare, missing = [], [], []
    for r in runs:
        if r.status != "completed":
            continue
        rel = r.metrics.get("ranking_file")
        if not rel or not r.config.get("scorer"):
            bare.append(r)
            continue
        path = (r.root or Path(".")) / rel
        table = read_ranking(path) if path.is_file() else None
        if table is None:
            missing.append(str(path))
        ranked.append(Ranked(r, table))
    return ranked, bare, missing


def _bucket(items: list[Ranked], key) -> dict[tuple, list[Ranked]]:
    """``items`` by ``key(item)``, groups and items in first-seen order."""
    out: dict[tuple, list[Ranked]] = {}
    for x in items:
        out.setdefault(key(x), []).append(x)
    return out


def _groups(items: list[Ranked], key) -> dict[tuple, list[Ranked]]:
    """As :func:`_bucket`, keeping the first run of each seed, sorted by seed."""
    return {k: sorted({x.seed: x for x in reversed(xs)}.values(), key=lambda x: x.seed)
            for k, xs in _bucket(items, key).items()}


# ------------------------------------------------------------------------------------------ heavy tails
TAIL_HEADER = ("model", "scorer", "mode", "k", "rankings", "seeds", "calibration", "weights scored",
               "top 0.1% share (%)", "top 1% share (%)", "Gini", "Gini bounds")


def _calibration(x: Ranked) -> str:
    c = x.run.config
    if x.run.metrics.get("calibration") is None:
        return "none (data-free)"
    return f"{Path(str(c.get('dataset'))).name}: {c.get('max_samples')} × {c.get('context_len')} tokens"


def tail_rows(ranked: list[Ranked]) -> list[dict]:
    """One dict per setting: tail statistics aggregated over its seeds (top run of a seed preferred)."""
    rows = []
    for setting, xs in _groups(sorted(ranked, key=lambda x: x.direction != "top"), lambda x: x.setting).items():
        tails = [x.run.metrics.get("tail") or {} for x in xs]
        vals = {k: [as_float(t.get(k)) for t in tails] for k in
                ("top_0.1pct_share", "top_1pct_share", "gini", "gini_low", "gini_high", "n_weights")}
        rows.append({"model": setting[0], "scorer": setting[1], "mode": setting[2], "k": setting[3],
                     "directions": sorted({x.direction for x in ranked if x.setting == setting}, reverse=True),
                     "seeds": [x.seed for x in xs], "invariant": all(x.invariant for x in xs),
                     "calibration": _calibration(xs[0]), "n_weights": max(vals["n_weights"]),
                     "top_0.1": aggregate_seeds([100 * v for v in vals["top_0.1pct_share"]]),
                     "top_1": aggregate_seeds([100 * v for v in vals["top_1pct_share"]]),
                     "gini": aggregate_seeds(vals["gini"]),
                     "gini_bounds": (min(vals["gini_low"]), max(vals["gini_high"]))})
    return rows


def _seeds(seeds: list[int], invariant: bool) -> str:
    return ", ".join(map(str, seeds)) + (" (seed-invariant)" if invariant else "")


def tail_table(rows: list[dict]) -> Table:
    return Table(TAIL_HEADER, tuple(
        (r["model"], r["scorer"], r["mode"], str(r["k"]), ", ".join(r["directions"]),
         _seeds(r["seeds"], r["invariant"]), r["calibration"], f"{r['n_weights']:,.0f}",
         fmt_agg(r["top_0.1"], 2), fmt_agg(r["top_1"], 2),
         fmt_agg(r["gini"], 4), f"[{fnum(r['gini_bounds'][0], 4)}, {fnum(r['gini_bounds'][1], 4)}]")
        for r in rows))


# -------------------------------------------------------------------------------------------- stability
SEED_HEADER = ("model", "scorer", "ranking", "k", "seeds", "Jaccard mean", "Jaccard min", "pairs")


def seed_rows(ranked: list[Ranked]) -> tuple[list[dict], list[str]]:
    """Seed overlap per setting × direction with ≥ 2 rankings; a sentence for each one that has fewer."""
    rows, notes = [], []
    for (setting, direction), xs in _groups(ranked, lambda x: (x.setting, x.direction)).items():
        xs = [x for x in xs if x.table is not None]
        what = f"{setting[0]} · {setting[1]} {direction}-{setting[3]}"
        if len(xs) >= 2:
            rows.append({"model": setting[0], "scorer": setting[1], "direction": direction, "k": setting[3],
                         **seed_overlap({x.seed: x.table for x in xs})})
        elif xs and xs[0].invariant:
            notes.append(f"{what}: seed-invariant (one ranking serves every seed), so there is no seed overlap "
                         "to measure.")
        else:
            notes.append(f"{what}: {len(xs)} seed(s) with a ranking file; run at least 2 seeds to measure stability.")
    return rows, notes


def seed_table(rows: list[dict]) -> Table:
    return Table(SEED_HEADER, tuple(
        (r["model"], r["scorer"], r["direction"], str(r["k"]), ", ".join(map(str, r["seeds"])),
         fnum(r["jaccard_mean"]), fnum(r["jaccard_min"]),
         "; ".join(f"{pair}: {fnum(j)}" for pair, j in r["jaccard_pairs"].items())) for r in rows))


def _paired_seeds(a: list[Ranked], b: list[Ranked]) -> list[tuple[int, Ranked, Ranked]]:
    """(seed, ranking of a, ranking of b) for the seeds both have; a seed-invariant side serves every seed."""
    def pick(xs: list[Ranked], seed: int) -> Ranked | None:
        if len(xs) == 1 and xs[0].invariant:
            return xs[0]
        return next((x for x in xs if x.seed == seed), None)

    pairs = [(s, pick(a, s), pick(b, s)) for s in sorted({x.seed for x in a + b})]
    return [(s, xa, xb) for s, xa, xb in pairs if xa is not None and xb is not None]


SCORER_HEADER = ("model", "ranking", "scorer A", "scorer B", "seeds", "Jaccard", "Spearman ρ (union)")


def scorer_rows(ranked: list[Ranked]) -> list[dict]:
    """Agreement of every pair of scorers per model × direction × mode, averaged over the paired seeds."""
    have = [x for x in ranked if x.table is not None]
    rows = []
    for (model, direction, _), xs in _bucket(have, lambda x: (x.setting[0], x.direction, x.setting[2])).items():
        for (sa, a), (sb, b) in itertools.combinations(_groups(xs, lambda x: x.setting).items(), 2):
            pairs = _paired_seeds(a, b)
            if not pairs:
                continue
            comps = [compare_rankings(xa.table, xb.table) for _, xa, xb in pairs]
            rows.append({"model": model, "direction": direction, "a": f"{sa[1]} (k={sa[3]})",
                         "b": f"{sb[1]} (k={sb[3]})", "seeds": [s for s, _, _ in pairs],
                         "jaccard": aggregate_seeds([c["jaccard"] for c in comps]),
                         "spearman": aggregate_seeds([c["spearman_union"] for c in comps])})
    return rows


def scorer_table(rows: list[dict]) -> Table:
    return Table(SCORER_HEADER, tuple(
        (r["model"], r["direction"], r["a"], r["b"], ", ".join(map(str, r["seeds"])), fmt_agg(r["jaccard"]),
         fmt_agg(r["spearman"])) for r in rows))


# ------------------------------------------------------------------------------------------- heatmaps
def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in text).strip("_.")[-40:]


def heatmaps(ranked: list[Ranked]) -> tuple[list[Figure], list[str]]:
    """One layer × role heatmap per setting (its first seed's top ranking, else bottom) and a sentence each."""
    figs, lines = [], []
    usable = sorted((x for x in ranked if x.table is not None and len(x.table)), key=lambda x: x.direction != "top")
    for i, (setting, xs) in enumerate(_groups(usable, lambda x: x.setting).items()):
        x = min(xs, key=lambda x: (x.direction != "top", x.seed))
        counts = layer_role_counts(x.table)  # (layers, roles)
        roles, layers = counts.sum(axis=0), counts.sum(axis=1)
        what = f"{setting[1]} {x.direction}-{setting[3]} ({setting[2]}) on {setting[0]}, seed {x.seed}"
        figs.append(Figure(f"sensitivity_topk_{i:02d}_{_slug(setting[0])}_{_slug(setting[1])}.png",
                           layer_role_heatmap_png(x.table, f"{setting[1]} "
                                                  f"{x.direction}-{setting[3]}, seed {x.seed}"),
                           f"Top-k weights per decoder layer × module role: {what}"))
        lines.append(f"The {len(x.table)} weights of {what} sit mostly in {roles.idxmax()} ({int(roles.max())} of "
                     f"{len(x.table)}) and in layer {layers.idxmax()} ({int(layers.max())} of {len(x.table)}).")
    return figs, lines


# -------------------------------------------------------------------------------------------- section
def headlines(tails: list[dict], seeds: list[dict]) -> list[str]:
    """One sentence per setting: how much of the score the top 1 % hold, and how well the seeds agree."""
    out = []
    for t in tails:
        n = len(t["seeds"])
        text = (f"On {t['model']}, the top 1 % of weights hold {fnum(t['top_1'].mean, 2)} % of the total "
                f"{t['scorer']} score (top 0.1 %: {fnum(t['top_0.1'].mean, 2)} %; Gini {fnum(t['gini'].mean, 4)}"
                f"{f', means of {n} seeds' if n > 1 else ''})")
        agree = [s for s in seeds if (s["model"], s["scorer"], s["direction"], s["k"]) ==
                 (t["model"], t["scorer"], "top", t["k"])]
        if agree:
            s = agree[0]
            text += (f"; seeds {', '.join(map(str, s['seeds']))} agree on {fnum(s['jaccard_mean'])} of the top-"
                     f"{s['k']} (mean Jaccard, min {fnum(s['jaccard_min'])})")
        out.append(text + ".")
    return out


def sensitivity_section(runs: list[Run]) -> list[Block]:
    """Blocks of the Sensitivity section (no heading): tails, stability, scorer agreement, heatmaps."""
    ranked, bare, missing = load_rankings(runs)
    blocks: list[Block] = []
    if ranked:
        tails = tail_rows(ranked)
        seeds, seed_notes = seed_rows(ranked)
        agree = scorer_rows(ranked)
        figs, where = heatmaps(ranked)
        blocks += [Paragraph(f"{len(ranked)} completed sensitivity run(s) of {len(runs)}, {len(tails)} model × "
                             "scorer setting(s). Shares are the percentage of the summed score over all scored "
                             "weights held by the top 0.1 % / 1 % of them; Gini 0 = uniform, 1 = one weight "
                             "holds everything. Values are mean ± half-width of the t-based 95 % CI across seeds "
                             "(a seed picks the calibration windows); Gini bounds hold every seed's exact Gini."),
                   tail_table(tails), Bullets(tuple(headlines(tails, seeds)))]
        blocks += [Heading(3, "Stability across seeds"),
                   Paragraph("Jaccard overlap |A ∩ B| / |A ∪ B| of the top-k weight sets of two calibration seeds "
                             "(1 = the same weights).")]
        blocks += ([seed_table(seeds)] if seeds else []) + ([Bullets(tuple(seed_notes))] if seed_notes else [])
        if agree:
            blocks += [Heading(3, "Agreement across scorers"),
                       Paragraph("Jaccard of the two top-k sets and Spearman ρ of the ranks over their union (a "
                                 "weight missing from one ranking is ranked last there), mean over the seeds "
                                 "both scorers have (± 95 % CI with ≥ 2 seeds)."), scorer_table(agree)]
        blocks += [Heading(3, "Where the top-k weights sit"), Bullets(tuple(where)), *figs] if figs else []
    if missing:
        blocks.append(Bullets(tuple(f"ranking artifact missing: {p} — its run is left out of the stability "
                                    "tables and heatmaps" for p in missing), callout=True))
    if bare:
        blocks += [Paragraph(f"{len(bare)} sensitivity run(s) carry no ranking artifact (written by hand or by an "
                             "older ESA); their stored metrics:"), *generic_section(bare)]
    return blocks or generic_section(runs)
