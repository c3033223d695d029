"""Downstream damage: zero-shot accuracy of perturbed models, paired item by item with the unperturbed one.

A protocol run may name zero-shot tasks (:attr:`~esa.perturb.protocols.EvalConfig.tasks`). Their items are
loaded once and become units of one prefix cache (:func:`task_units`): an item whose options share a context is
one packed sequence (:mod:`esa.evals.shared_context`), any other request one plain window
(:func:`request_windows`: ``(context + continuation)[-(L+1):]``, only the continuation scored). Either way an
option's summed NLL is minus its log-likelihood and "every scored token is the argmax" is lm-eval's
``is_greedy``, so the numbers equal :func:`esa.evals.zeroshot.evaluate_task`'s (a test holds them to 1e-5). The
cache's build run is the unperturbed reference; each trial re-runs only the layers from the first perturbed
one, for the windows and the task items alike.

Per arm and task (:func:`task_comparison`): accuracy (and acc_norm) vs the reference with a paired item
bootstrap CI of Δ accuracy, the exact McNemar test on the discordant items (one repeat) or the Wilcoxon
signed-rank test on the per-item repeat-averaged differences (several repeats: control seeds, noise seeds), and
the mean Δ log-likelihood of the gold answer (bootstrap-t CI, Wilcoxon p). Items whose log-likelihood becomes
non-finite are counted (``n_nonfinite``): a collapse is a result. The task tests of a run are one
multiple-comparison family (``p_mcnemar_holm`` / ``_bh``, ``p_wilcoxon_holm`` / ``_bh``), apart from the ΔNLL
tests, so adding tasks never changes a run's perplexity p-values.

Packing is used only when the model honours custom 4-D masks: :func:`esa.evals.shared_context.agreement`
compares both layouts on the first items, and otherwise every option is a plain window; ``task_scoring`` in the
run's data record says which, why, and the tokens read either way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from esa.data.windows import Window
from esa.evals.shared_context import SharedContext, Unit, agreement, continuation_window, pack, unit_length
from esa.evals.tasks import TaskData, load_task_data
from esa.evals.zeroshot import DEFAULT_MAX_LENGTH, Request, build_requests, item_scores
from esa.models import max_positions
from esa.stats import (benjamini_hochberg, holm, macro_paired_accuracy, paired_accuracy, paired_bootstrap_diff,
                       paired_loglik, wilcoxon_p)


@dataclass
class TaskSet:
    """One task's items and requests; ``offset`` = index of its first request in the task cache's outputs."""

    data: TaskData
    requests: list[Request]
    offset: int


def request_windows(requests: list[Request], max_length: int) -> list[Window]:
    """One plain window per request: the last L+1 tokens of context + continuation, the continuation scored."""
    return [continuation_window(r.context, r.continuation, max_length) for r in requests]


def load_tasks(lm, tasks: tuple[tuple[str, str | None], ...], limit: int | None, seed: int) -> list[TaskSet]:
    """Each task's items (a seeded subsample of ``limit``) and their requests, task after task."""
    max_length = max_positions(lm.model) or DEFAULT_MAX_LENGTH
    sets, n = [], 0
    for name, path in tasks:
        data = load_task_data(name, path, limit, seed)
        requests = build_requests(lm.tokenizer, data, max_length)
        sets.append(TaskSet(data, requests, n))
        n += len(requests)
    return sets


def task_units(lm, sets: list[TaskSet], pad: int) -> tuple[list[Unit], dict]:
    """The task cache's units — shared contexts where the model honours them, else plain windows — and a
    provenance record: whether contexts were shared, how many items, and the tokens read either way."""
    max_length = max_positions(lm.model) or DEFAULT_MAX_LENGTH
    requests = [r for s in sets for r in s.requests]
    plain = request_windows(requests, max_length)
    units = pack([(r.item, r.context, r.continuation) for r in requests], max_length,
                 getattr(lm.model.config, "sliding_window", None))
    reason = agreement(lm.model, units, pad)
    chosen = plain if reason else units
    return chosen, {"shared_context": not reason and any(isinstance(u, SharedContext) for u in units),
                    "shared_items": sum(isinstance(u, SharedContext) for u in units), "reason": reason,
                    "tokens_plain": sum(unit_length(w) for w in plain),
                    "tokens_read": sum(unit_length(u) for u in chosen)}


@dataclass(frozen=True)
class ItemOutcomes:
    """Per item of one task under one model state: correct (N,), correct_norm (N,) or None, gold ll (N,)."""

    correct: np.ndarray
    correct_norm: np.ndarray | None
    gold_ll: np.ndarray


def outcomes(sets: list[TaskSet], nll: np.ndarray, n_scored: np.ndarray, n_correct: np.ndarray
             ) -> dict[str, ItemOutcomes]:
    """Task name → its items' outcomes, from the task windows' scores (summed NLL, scored and argmax counts)."""
    out = {}
    for s in sets:
        part = slice(s.offset, s.offset + len(s.requests))
        scores = item_scores(s.data, s.requests, -nll[part], n_correct[part] == n_scored[part])
        norm = [x.correct_norm for x in scores]
        out[s.data.task.name] = ItemOutcomes(
            np.array([x.correct for x in scores], dtype=bool),
            None if any(v is None for v in norm) else np.array(norm, dtype=bool),
            np.array([x.loglikelihoods[x.gold] for x in scores], dtype=float))
    return out


def _accuracy(ref: np.ndarray, repeats: list[np.ndarray], n_boot: int, seed: int) -> dict:
    """Δ accuracy of the repeat-averaged perturbed correctness vs the reference (paired over items)."""
    if len(repeats) == 1:
        return {**paired_accuracy(ref, repeats[0], n_boot=n_boot, seed=seed), "test": "mcnemar_exact"}
    pert = np.mean(np.stack(repeats).astype(float), axis=0)  # (N,) share of repeats correct
    low, high = paired_bootstrap_diff(ref.astype(float), pert, n_boot=n_boot, seed=seed)
    d = pert - ref.astype(float)
    return {"n_items": len(ref), "acc_baseline": float(ref.mean()), "acc_perturbed": float(pert.mean()),
            "delta_acc": float(pert.mean() - ref.mean()), "ci_low": low, "ci_high": high, "ci_method": "percentile",
            "p_wilcoxon": wilcoxon_p(d) if np.any(d != 0) else 1.0,  # no item changed: no evidence of a change
            "test": "wilcoxon (repeat-averaged items)",
            "repeats_acc": [float(r.mean()) for r in repeats]}


def task_comparison(name: str, task: str, ref: ItemOutcomes, repeats: list[ItemOutcomes], n_boot: int,
                    seed: int) -> dict:
    """One arm on one task vs the unperturbed model: acc, acc_norm, gold log-likelihood (module docstring)."""
    gold = np.mean(np.stack([r.gold_ll for r in repeats]), axis=0)
    out = {"name": f"{name} · {task}", "arm": name, "task": task,
           "acc": _accuracy(ref.correct, [r.correct for r in repeats], n_boot, seed),
           "loglik": paired_loglik(ref.gold_ll, gold, n_boot=n_boot, seed=seed)}
    if ref.correct_norm is not None:
        out["acc_norm"] = _accuracy(ref.correct_norm, [r.correct_norm for r in repeats], n_boot, seed)
    out["n_nonfinite"] = out["loglik"]["n_nonfinite_perturbed"]
    return out


def macro(bench, arm: str, per_repeat: list[dict]) -> dict | None:
    """Mean Δ accuracy over the run's tasks for one arm (each task weighs the same), with the percentile CI of
    :func:`esa.stats.macro_paired_accuracy` (items resampled within each task) for a single repeat; several
    repeats give the mean without a CI. None with fewer than two tasks."""
    tasks = [s.data.task.name for s in bench.tasks]
    if len(tasks) < 2 or not per_repeat:
        return None
    if len(per_repeat) == 1:
        pairs = {t: (bench.task_reference[t].correct, per_repeat[0][t].correct) for t in tasks}
        m = macro_paired_accuracy(pairs, n_boot=bench.data.n_boot, seed=bench.data.seed)
        return {"arm": arm, "n_tasks": m["n_tasks"], "delta_acc": m["delta_acc"], "ci_low": m["ci_low"],
                "ci_high": m["ci_high"], "ci_method": m["ci_method"], "tasks": tasks}
    deltas = [np.mean([r[t].correct.mean() for r in per_repeat]) - bench.task_reference[t].correct.mean()
              for t in tasks]
    return {"arm": arm, "n_tasks": len(tasks), "delta_acc": float(np.mean(deltas)), "ci_low": None,
            "ci_high": None, "ci_method": None, "tasks": tasks}


def tests_of(comparisons: list[dict]) -> list[tuple[dict, str]]:
    """(statistics dict, p-value key) of every test the task comparisons made, for one correction family."""
    found = []
    for c in comparisons:
        for part in ("acc", "acc_norm", "loglik"):
            stats = c.get(part) or {}
            found += [(stats, key) for key in ("p_mcnemar", "p_wilcoxon") if key in stats]
    return found


def adjust_tasks(task_comparisons: list[dict]) -> None:
    """Holm and BH across every task test of the run (all arms × tasks × acc/acc_norm/log-lik) as one family.

    The ΔNLL tests keep their own family (:func:`esa.perturb.protocols.common.adjust`): adding tasks to a run
    never changes its perplexity p-values."""
    family = tests_of(task_comparisons)
    p = [float(stats[key]) for stats, key in family]
    if not p:
        return
    for suffix, fn in (("holm", holm), ("bh", benjamini_hochberg)):
        for (stats, key), q in zip(family, fn(p)):
            stats[f"{key}_{suffix}"] = float(q)


def task_info(bench) -> list[dict]:
    """What each task's items are: name, counts, source and the generator of a corpus-derived task."""
    return [{"task": s.data.task.name, "n_items": len(s.data.items), "n_total": s.data.n_total,
             "n_requests": len(s.requests), "limit": s.data.limit, "seed": s.data.seed, "source": s.data.source,
             "generator": getattr(s.data, "generator", None),
             "reference": {"acc": float(bench.task_reference[s.data.task.name].correct.mean())}}
            for s in bench.tasks]


def downstream(bench, arms: list[tuple[str, list[dict]]]) -> tuple[dict | None, dict[str, np.ndarray]]:
    """The ``downstream`` part of a protocol document for ``arms`` — (comparison name, per-repeat outcomes:
    task → :class:`ItemOutcomes`) pairs — with its per-item arrays; the task tests are Holm/BH-adjusted as one
    family (:func:`adjust_tasks`). (None, {}) when the run names no tasks."""
    if not bench.tasks:
        return None, {}
    d, comps, arrays = bench.data, [], {}
    for s in bench.tasks:
        task = s.data.task.name
        arrays[f"task__{task}__reference_gold_ll"] = bench.task_reference[task].gold_ll
        for name, per_repeat in arms:
            repeats = [rep[task] for rep in per_repeat]
            comps.append(task_comparison(name, task, bench.task_reference[task], repeats, d.n_boot, d.seed))
            key = re_key(name)
            arrays[f"task__{task}__{key}_gold_ll"] = np.stack([r.gold_ll for r in repeats])  # (S, N)
            arrays[f"task__{task}__{key}_correct"] = np.stack([r.correct for r in repeats])  # (S, N)
    adjust_tasks(comps)
    macros = [m for m in (macro(bench, name, per_repeat) for name, per_repeat in arms) if m is not None]
    return {"tasks": task_info(bench), "comparisons": comps, "macro": macros}, arrays


def re_key(name: str) -> str:
    """An array-name-safe form of a comparison name: ``target @ factor=2`` → ``target_factor_2``."""
    return re.sub(r"\W+", "_", name).strip("_")
