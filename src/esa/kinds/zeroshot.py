"""Run kind ``zeroshot``: lm-evaluation-harness 0.4.x zero-shot accuracy of each model on each task.

A study asks for it per model with a ``zeroshot:`` section::

    zeroshot:
      tasks: [piqa, arc_easy]            # names in esa.evals.tasks.TASKS
      task_data: {piqa: piqa.jsonl}      # offline: a task's split as local JSONL in the dataset's own schema
      limit: 200                         # items per task (a seeded subsample); omit: every item
      seeds: [0, 1]                      # omit: the study's seeds; only the first when every item is scored

One :class:`ZeroShotRun` per model × task × seed, where the seed picks *which* ``limit`` items are scored
(:func:`esa.evals.tasks.subsample`). Without ``limit`` every item is scored and a seed would change nothing,
so only the first seed is expanded; a run whose ``limit`` reaches the split's size says ``seed_invariant:
true`` in its metrics. A task without ``task_data`` is read from the hub at execution: offline, that run fails
with the remedy (give ``task_data``) while the study's other runs go on.

Execution is exactly ``esa zeroshot``'s: :func:`esa.evals.zeroshot.evaluate_task` on
:func:`esa.evals.tasks.load_task_data`. Metrics: the task's metrics as lm-eval names them (``acc``,
``acc_stderr``, ``acc_norm``, ``acc_norm_stderr``; lambada ``perplexity`` and its bootstrap stderr;
``n_nonfinite_items``, ``higher_is_better``), ``n_items``, ``n_total``, ``seed_invariant`` and ``task_config``
(source, split, limit, seed, max_length, token budget …). Arrays, one row per scored item so that a perturbed
run pairs with this one on ``item_index``:

* ``item_index`` (N,) int64 — the item's row in the full split (lm-eval's ``doc_id``);
* ``loglikelihoods`` (N, C) float64 — summed continuation log-likelihood per option, nats; C is the most
  options of any item, missing options are NaN (arc items have 3 to 5);
* ``is_greedy`` (N, C) bool — every continuation token was the argmax (False where padded);
* ``n_choices``, ``gold`` (N,) int64; ``correct`` (N,) bool; ``correct_norm`` (N,) bool, only for tasks that
  report ``acc_norm``. ``correct.mean() == acc``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from esa.core.errors import EsaError
from esa.evals.tasks.corpus import is_corpus_task
from esa.evals.tasks import TASKS, load_task_data
from esa.evals.zeroshot import ItemScore, TaskResult, evaluate_task
from esa.core.hashing import sha256_file
from esa.kinds.base import KindRun, ReportSection, RunContext, RunKind
from esa.models import LoadedModel, ModelSpec
from esa.core.registry import suggest
from esa.report.html import Block, Paragraph, Table
from esa.report.study_report import Run, fnum
from esa.core.files import as_float
from esa.study import Study, model_specs, require

KIND_NAME = "zeroshot"
CHARS_PER_TOKEN = 4.0  # typical English BPE rate, for `esa plan`'s token estimate of a local task file


@dataclass(frozen=True)
class ZeroShotSection:
    """The ``zeroshot:`` section of a study file (0-shot only: lm-eval's ``num_fewshot: 0``)."""

    tasks: tuple[str, ...]  # names in esa.evals.tasks.TASKS
    task_data: dict[str, str] = field(default_factory=dict)  # task → local JSONL; absent tasks come from the hub
    limit: int | None = None  # items per task, a seeded subsample; None → every item (seed-invariant)
    seeds: tuple[int, ...] = ()  # which items when limit < split size; empty → the study's seeds
    token_budget: int | None = None  # padded tokens per forward micro-batch; None → the study's batch_tokens


@dataclass(frozen=True)
class ZeroShotRun(KindRun):
    """One model on one task's (seeded subsample of) items."""

    kind: ClassVar[str] = KIND_NAME
    model: ModelSpec
    task: str
    task_data: str | None  # local JSONL; None → the hub split the task names
    limit: int | None  # None → every item
    seed: int  # picks the items when limit < the split's size
    token_budget: int  # padded tokens per forward micro-batch (B · T); moves numbers only at float rounding

    def label(self) -> str:
        items = "all items" if self.limit is None else f"limit={self.limit} seed={self.seed}"
        return f"{self.model.name} zeroshot {self.task} ({items})"



# ------------------------------------------------------------------------------------------------ checks
def check_tasks(tasks: tuple[str, ...], task_data: dict[str, str], where: str) -> None:
    """Task names known (or well-formed corpus-derived names), listed once, and ``task_data`` only for them."""
    for i, name in enumerate(tasks):
        require(name in TASKS, f"{where}.tasks[{i}]: " + suggest(name, TASKS.names(), "task"))
    require(len(set(tasks)) == len(tasks), f"{where}.tasks: a task is listed twice")
    for name, path in task_data.items():
        require(name in tasks, f"{where}.task_data.{name}: not one of the section's tasks; "
                 + suggest(name, list(tasks), "task") + " Add it to tasks, or remove its task_data")
        require(bool(path.strip()), f"{where}.task_data.{name}: give the path of a JSONL file")


def check(section: ZeroShotSection, study: Study, where: str) -> None:
    """Names and numbers only: no task data is read (a hub-only task may be cached, or fail at execution)."""
    require(bool(section.tasks), f"{where}.tasks: list at least one task, e.g. [piqa, arc_easy]")
    check_tasks(section.tasks, section.task_data, where)
    require(section.limit is None or section.limit >= 1, f"{where}.limit: ≥ 1 item, or omit it for every item")
    require(len(set(section.seeds)) == len(section.seeds) and all(s >= 0 for s in section.seeds),
             f"{where}.seeds: distinct seeds ≥ 0, got {list(section.seeds)}")
    require(section.token_budget is None or section.token_budget >= 1, f"{where}.token_budget must be ≥ 1")


# --------------------------------------------------------------------------------------------- expansion
def expand(study: Study) -> list[ZeroShotRun]:
    """model × task × seed, model-major; one seed when every item is scored (the seed would change nothing)."""
    s: ZeroShotSection | None = study.section(KIND_NAME)
    if s is None:
        return []
    seeds = s.seeds or tuple(study.seeds)
    if s.limit is None:
        seeds = seeds[:1]
    budget = s.token_budget or study.batch_tokens
    return [ZeroShotRun(spec, task, s.task_data.get(task), s.limit, seed, budget)
            for spec in model_specs(study) for task in s.tasks for seed in seeds]


# --------------------------------------------------------------------------------------------- execution
def item_arrays(result: TaskResult) -> dict[str, np.ndarray]:
    """A :class:`~esa.evals.zeroshot.TaskResult`'s per-item scores as padded arrays (see the module doc)."""
    items = result.items
    n_choices = np.array([len(s.loglikelihoods) for s in items], dtype=np.int64)  # (N,)
    C = int(n_choices.max())
    ll = np.full((len(items), C), np.nan)  # (N, C)
    greedy = np.zeros((len(items), C), dtype=bool)  # (N, C)
    for i, s in enumerate(items):
        ll[i, : n_choices[i]], greedy[i, : n_choices[i]] = s.loglikelihoods, s.is_greedy
    arrays = {"item_index": np.array([s.item_id for s in items], dtype=np.int64), "loglikelihoods": ll,
              "is_greedy": greedy, "n_choices": n_choices, "gold": np.array([s.gold for s in items], np.int64),
              "correct": np.array([s.correct for s in items], dtype=bool)}
    if all(s.correct_norm is not None for s in items):
        arrays["correct_norm"] = np.array([s.correct_norm for s in items], dtype=bool)
    return arrays


ADDED_METRICS = ("n_items", "n_total", "seed_invariant", "task_config", "task_data_sha256")  # beside lm-eval's


def _decoded(value):
    """A stored metric as computed: the store writes non-finite floats as "nan"/"inf" strings."""
    return as_float(value) if value in ("nan", "inf", "-inf") else value


def task_result(run: Run, arrays: dict[str, np.ndarray]) -> TaskResult:
    """The :class:`~esa.evals.zeroshot.TaskResult` a stored run was made from — :func:`execute`'s inverse:
    lm-eval's metrics, the task config and every item's scores (from the per-item arrays)."""
    metrics = {k: _decoded(v) for k, v in run.metrics.items() if k not in ADDED_METRICS}
    norm = arrays.get("correct_norm")
    items = [ItemScore(int(arrays["item_index"][i]), tuple(float(x) for x in arrays["loglikelihoods"][i, :n]),
                       tuple(bool(g) for g in arrays["is_greedy"][i, :n]), int(arrays["gold"][i]),
                       bool(arrays["correct"][i]), None if norm is None else bool(norm[i]))
             for i, n in enumerate(arrays["n_choices"])]
    return TaskResult(run.config["task"], metrics, items, run.metrics["task_config"])


def execute(lm: LoadedModel, run: ZeroShotRun, ctx: RunContext) -> tuple[dict, dict[str, np.ndarray]]:
    """``esa zeroshot`` for one task: load (and subsample) its items, score them, keep per-item arrays."""
    try:
        data = load_task_data(run.task, run.task_data, run.limit, run.seed)
    except EsaError as exc:
        if run.task_data is not None or is_corpus_task(run.task):  # a corpus-derived task reads no task data
            raise
        raise EsaError(f"{exc}; in a study file: zeroshot: {{task_data: {{{run.task}: PATH}}}}") from exc
    result = evaluate_task(lm.model, lm.tokenizer, data, token_budget=run.token_budget)
    metrics = {**result.metrics, "n_items": result.config["n"], "n_total": result.config["n_total"],
               "seed_invariant": result.config["seed_invariant"], "task_config": result.config,
               "task_data_sha256": sha256_file(Path(run.task_data).expanduser()) if run.task_data else None}
    return metrics, item_arrays(result)


def cost(run: ZeroShotRun) -> tuple[int | None, float]:
    """(forward tokens, 1 pass): every option's context + continuation is one row of a forward.

    Estimated from the characters of a local task file's chosen items (÷ :data:`CHARS_PER_TOKEN`); None for
    a hub task, whose items are not read before execution.
    """
    if run.task_data is None or not Path(run.task_data).expanduser().is_file():
        return None, 1.0
    data = load_task_data(run.task, run.task_data, run.limit, run.seed)
    chars = sum(len(c) + len(k) for it in data.items for c, k in zip(it.prompt.contexts, it.prompt.continuations))
    return math.ceil(chars / CHARS_PER_TOKEN), 1.0


# ------------------------------------------------------------------------------------- summary and report
def _pm(value, stderr, digits: int = 3) -> str:
    """``value ± stderr``; the bare value when lm-eval defines no stderr (fewer than 2 items)."""
    v = fnum(as_float(value), digits)
    return v if stderr is None else f"{v} ± {fnum(as_float(stderr), digits)}"


def _items(m: dict) -> str:
    return f"n={m['n_items']}, all items" if m.get("seed_invariant") else f"n={m['n_items']} of {m['n_total']}"


def summary(record) -> str:
    """``piqa acc 0.610 ± 0.021, acc_norm 0.630 ± 0.021 (n=200 of 1838)``."""
    m = record.metrics
    parts = [f"{key} {_pm(m[key], m.get(f'{key}_stderr'))}" for key in ("acc", "acc_norm", "perplexity") if key in m]
    return f"{record.config['task']} {', '.join(parts)} ({_items(m)})"


REPORT_HEADER = ("model", "dtype", "task", "items", "seed", "acc ± stderr", "acc_norm ± stderr",
                 "perplexity ± stderr", "non-finite items")


def _row(run: Run) -> tuple[str, ...]:
    c, m = run.config, run.metrics

    def cell(key: str) -> str:
        return _pm(m[key], m.get(f"{key}_stderr"), 4) if key in m else "—"

    seed = "— (every item)" if m.get("seed_invariant") else str(c.get("seed"))
    return (run.model_name, str((c.get("model") or {}).get("dtype")), str(c.get("task")),
            f"{m.get('n_items')} of {m.get('n_total')}", seed, cell("acc"), cell("acc_norm"), cell("perplexity"),
            str(m.get("n_nonfinite_items", 0)))


def render(runs: list[Run]) -> list[Block]:
    """One row per completed run (model × task × seed): accuracies with lm-eval's standard errors."""
    done = sorted((r for r in runs if r.status == "completed"),
                  key=lambda r: (r.model_name, str(r.config.get("task")), r.config.get("seed") or 0))
    text = (f"{len(done)} completed zero-shot run(s) of {len(runs)}: lm-evaluation-harness 0.4.x semantics, "
            "0-shot; ± is lm-eval's standard error (sample standard deviation / √n; perplexity: its bootstrap). "
            "A seed picks which items are scored when a limit is below the split's size.")
    return [Paragraph(text)] + ([Table(REPORT_HEADER, tuple(_row(r) for r in done))] if done else [])


def warnings(run: Run) -> list[str]:
    n_bad = int(run.metrics.get("n_nonfinite_items") or 0)
    return [f"zeroshot {run.config.get('task')} on {run.model_name}: {n_bad} item(s) with a non-finite "
            "log-likelihood (kept in its accuracy)"] if n_bad else []


KIND = RunKind(
    name=KIND_NAME, version=1,
    about="zero-shot multiple-choice accuracy per model × task, lm-evaluation-harness 0.4.x semantics",
    section=KIND_NAME, schema=ZeroShotSection, check=check, expand=expand, depends_on=(), execute=execute,
    cost=cost, summary=summary,
    report=ReportSection("Zero-shot tasks", 0, render), warnings=warnings)
