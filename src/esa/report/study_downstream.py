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
from esa.core.files import as_float

FEW_ITEMS = 100  # below this, the report warns that accuracy differences of a few points cannot be resolved
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
             "repeat-averaged items (several), Holm-adjusted across the run's task tests (the ΔNLL tests are "
             "their own family). Non-finite: "
             "items whose gold log-likelihood became non-finite (a collapse, counted, not hidden).")
    fewest = min(int(r[3]) for r in rows)
    if fewest < FEW_ITEMS:
        intro += (f" ⚠ Some tasks have only {fewest} items: a 95 % CI of Δ accuracy is then about "
                  f"±{1.96 * (0.5 / fewest) ** 0.5:.2f} wide at best, too wide to resolve a few points of accuracy; "
                  "use ≥ 500 items (corpus-derived tasks give them offline) for a real measurement.")
    return [Paragraph(intro), Table(HEADER, tuple(rows)), *paper_table(runs)]


PAPER_ARMS = (("target", "super weights"), ("largest_k", "as many largest-|W| non-super weights"),
              ("random_k", "as many random weights"))


def _comparisons_by_name(run: Run) -> dict:
    comps = run.metrics.get("comparisons") or {}
    return comps if isinstance(comps, dict) else {c["name"]: c for c in comps}


def _paper_rows(run: Run) -> list[tuple]:
    """One row per arm of a super-weight run: PPL with ΔNLL CI and p, then per task acc with Δ CI and p."""
    comps, down = _comparisons_by_name(run), run.metrics.get("downstream") or {}
    tasks = [t["task"] for t in down.get("tasks", [])]
    sizes = {a["name"]: a["n_elements"] for a in run.metrics.get("arms", [])}
    rows = []
    for arm, label in PAPER_ARMS:
        c = comps.get(f"{arm} vs baseline")
        if c is None:
            continue
        p_ppl = as_float(c.get("p_wilcoxon_holm", c.get("p_wilcoxon")))
        ppl = (f"{fnum(as_float(c['ppl_perturbed']))} (ΔNLL {as_float(c['mean_delta_nll']):+.3f} "
               f"[{as_float(c['ci_low']):+.3f}, {as_float(c['ci_high']):+.3f}], p {p_ppl:.2g})")
        cells = []
        for task in tasks:
            d = next((x for x in down["comparisons"] if x["arm"] == arm and x["task"] == task), None)
            if d is None:
                cells.append("—")
                continue
            a = d["acc"]
            _, p = _p(a)
            cells.append(f"{fnum(as_float(a['acc_perturbed']))} (Δ {as_float(a['delta_acc']):+.3f} "
                         f"[{as_float(a['ci_low']):+.3f}, {as_float(a['ci_high']):+.3f}], p {p:.2g})")
        rows.append((run_label(run), f"{label} ({sizes.get(arm, '?')})", ppl, *cells))
    return rows


def paper_table(runs: list[Run]) -> list[Block]:
    """The super-weight paper's table: super weights vs as many largest-magnitude non-super weights vs random
    weights, perplexity and accuracy per task — for every completed ``spec: superweights`` run with tasks."""
    chosen = [r for r in runs if r.status == "completed" and (r.config.get("spec") or "").strip() == "superweights"
              and (r.metrics.get("downstream") or {}).get("tasks")]
    blocks: list[Block] = []
    for r in chosen:
        tasks = [t["task"] for t in r.metrics["downstream"]["tasks"]]
        refs = {t["task"]: t["reference"]["acc"] for t in r.metrics["downstream"]["tasks"]}
        header = ("run", "weights perturbed (count)", "perplexity (ΔNLL [95% CI], p)",
                  *[f"{task_label(t)} acc, unperturbed {refs[t]:.3f} (Δ [95% CI], p)" for t in tasks])
        blocks.append(Table(header, tuple(_paper_rows(r))))
    if not blocks:
        return []
    intro = ("Super weights against the same number of the largest-magnitude *other* weights of the same tensors "
             "(largest_k) and of random weights (random_k), under the same op, on the same windows and items — "
             "the comparison of the super-weight paper at matched count. p: Holm-adjusted within the run — perplexity "
             "(Wilcoxon) among the run's ΔNLL tests, accuracy (McNemar, or Wilcoxon over repeat-averaged items) "
             "among its task tests.")
    return [Paragraph(intro), *blocks]


def accuracy_dose_panels(runs: list[Run]) -> list[dict]:
    """Per dose-response run and task: Δ accuracy (95 % CI) vs the swept value for target and random_k — the
    rows :func:`esa.report.study_causal_plots.dose_plot` draws."""
    panels = []
    for r in runs:
        down = r.metrics.get("downstream") if r.status == "completed" else None
        if not down:
            continue
        value_of = {row[arm]: row["value"] for row in r.metrics.get("rows", []) for arm in ("target", "random_k")
                    if arm in row}
        for t in down["tasks"]:
            rows = [{"value": value_of[c["arm"]], "arm": c["arm"].split(" @ ")[0],
                     "mean": as_float(c["acc"]["delta_acc"]), "ci_low": as_float(c["acc"]["ci_low"]),
                     "ci_high": as_float(c["acc"]["ci_high"])}
                    for c in down["comparisons"] if c["task"] == t["task"] and c["arm"] in value_of]
            panels.append({"title": f"{run_label(r)} · {task_label(t['task'])}",
                           "parameter": str(r.metrics.get("parameter")), "rows": rows})
    return panels
