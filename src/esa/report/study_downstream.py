"""Downstream damage in the study report: zero-shot accuracy of perturbed models, paired with the unperturbed one.

Perturbation and dose-response runs that name tasks store ``metrics["downstream"]``
(:mod:`esa.perturb.protocols.downstream`): per arm and task the accuracy before and after, Δ accuracy with its
paired item-bootstrap CI, the exact McNemar p (or the Wilcoxon p of repeat-averaged items for several repeats),
Holm-adjusted with every other test of the run, the mean Δ log-likelihood of the gold answer and the items whose
log-likelihood became non-finite. Corpus-derived tasks are named as such (``corpus_mc:…``), never as the
published benchmarks.
"""

from __future__ import annotations

from esa.report.html import Block, Paragraph, Table
from esa.report.study_report import Run, fnum, run_label
from esa.runs import as_float

HEADER = ("run", "arm", "task", "items", "acc before → after", "Δ acc", "95% CI", "test", "p (Holm)",
          "Δ gold log-lik", "non-finite")


def _p(stats: dict) -> tuple[str, float]:
    for key in ("p_mcnemar", "p_wilcoxon"):
        if key in stats:
            return ("McNemar" if key == "p_mcnemar" else "Wilcoxon"), as_float(stats.get(f"{key}_holm", stats[key]))
    return "—", float("nan")


def task_label(task: str) -> str:
    """A task's name, with corpus-derived tasks spelled out so no reader takes them for a benchmark."""
    return f"{task} (corpus-derived)" if task.startswith("corpus_") else task


def downstream_rows(runs: list[Run]) -> list[tuple]:
    rows = []
    for r in runs:
        down = r.metrics.get("downstream") if r.status == "completed" else None
        for c in (down or {}).get("comparisons", []):
            acc, ll = c["acc"], c["loglik"]
            test, p = _p(acc)
            rows.append((run_label(r), c["arm"], task_label(c["task"]), str(acc["n_items"]),
                         f"{fnum(as_float(acc['acc_baseline']))} → {fnum(as_float(acc['acc_perturbed']))}",
                         f"{as_float(acc['delta_acc']):+.3f}",
                         f"[{as_float(acc['ci_low']):+.3f}, {as_float(acc['ci_high']):+.3f}]", test, f"{p:.3g}",
                         f"{as_float(ll['mean_delta_loglik']):+.3f}", str(c.get("n_nonfinite", 0))))
    return rows


def downstream_blocks(runs: list[Run]) -> list[Block]:
    """The per-task table (empty when no run scored tasks)."""
    rows = downstream_rows(runs)
    if not rows:
        return []
    intro = (f"Zero-shot accuracy under perturbation: {len(rows)} arm × task comparison(s), paired item by item "
             "with the unperturbed model on the same items. Δ acc = perturbed − unperturbed with a 95 % paired "
             "item-bootstrap CI (percentile); p: exact McNemar on the discordant items (one repeat) or Wilcoxon on "
             "repeat-averaged items (several), Holm-adjusted with every ΔNLL and task test of the run. Non-finite: "
             "items whose gold log-likelihood became non-finite (a collapse, counted, not hidden).")
    return [Paragraph(intro), Table(HEADER, tuple(rows))]
