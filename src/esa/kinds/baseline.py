"""Run kind ``baseline``: one model on one dataset at one context length with one seed — the perplexity family,
token accuracy, throughput and peak memory of the unperturbed model (:func:`esa.evals.baseline.score_cell`).

Built from the study's own top-level fields (``models × datasets × context_lens × seeds``, ``method``,
``bos``, ``max_eval_tokens``, ``batch_tokens``); it has no section. With ``max_eval_tokens: null`` every window
is scored, so every seed would give the same number: only the first seed is expanded and the result is marked
seed-invariant. Arrays: per-window ``nll``, ``n_scored``, ``n_correct``, ``window_index``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from esa.evals.baseline import BaselineConfig, cell_metrics, score_cell
from esa.data.corpora import Corpus, load_corpus
from esa.kinds.base import KindRun, ReportSection, RunContext, RunKind, no_check
from esa.models import LoadedModel, ModelSpec, check_context
from esa.report.study_baseline import baseline_section
from esa.core.files import as_float
from esa.study import Study, model_specs


@dataclass(frozen=True)
class WindowCell(KindRun):
    """What a run scoring one model's windows of one corpus holds: where (dataset, context length, seed) and
    how the windows are cut (method, stride, BOS) and how many tokens are scored. ``long_context`` runs too."""

    model: ModelSpec
    dataset: str
    context_len: int
    seed: int
    method: str
    stride: int | None
    bos: str
    max_eval_tokens: int | None  # None → the whole split


@dataclass(frozen=True)
class BaselineRun(WindowCell):
    """One baseline cell: one model on one dataset at one context length with one seed."""

    kind: ClassVar[str] = "baseline"
    batch_tokens: int

    def label(self) -> str:
        return f"{self.model.name} {self.dataset} ctx={self.context_len} seed={self.seed}"



def expand(study: Study) -> list[BaselineRun]:
    """model × dataset × ctx × seed, model-major (executors load each model once).

    With ``max_eval_tokens: null`` every window is scored, so every seed would give the same number: only
    the first seed is expanded and the result is marked seed-invariant.
    """
    seeds = study.seeds if study.max_eval_tokens is not None else study.seeds[:1]
    return [BaselineRun(spec, d, ctx, s, study.method, study.stride, study.bos, study.max_eval_tokens,
                        study.batch_tokens)
            for spec in model_specs(study) for d in study.datasets for ctx in study.context_lens for s in seeds]


def corpus(ctx: RunContext, name: str) -> Corpus:
    """The corpus ``name``, read once per model group."""
    if name not in ctx.corpora:
        ctx.corpora[name] = load_corpus(name)
    return ctx.corpora[name]


def evaluate_stored_cell(lm: LoadedModel, run, ctx: RunContext, cfg: BaselineConfig, long_context: bool = False
                         ) -> tuple[dict, dict[str, np.ndarray]]:
    """One cell of ``esa baseline`` (:func:`esa.evals.baseline.score_cell`) as a run's (metrics, arrays); the
    context length is checked against the model before any data is read."""
    check_context(lm, run.context_len)
    entry, arrays = score_cell(lm, corpus(ctx, run.dataset), cfg, run.context_len, run.seed,
                               long_context=long_context)
    return cell_metrics(entry), arrays  # arrays (W,) each: nll, n_scored, n_correct, window_index


def execute(lm: LoadedModel, run, ctx: RunContext) -> tuple[dict, dict[str, np.ndarray]]:
    """One baseline cell; returns (metrics, per-window arrays)."""
    cfg = BaselineConfig(run.model, "study", (run.dataset,), (run.context_len,), (run.seed,), run.method,
                         run.stride, run.bos, run.max_eval_tokens, run.batch_tokens)
    return evaluate_stored_cell(lm, run, ctx, cfg)


def summary(record) -> str:
    return f"ppl {as_float(record.metrics['perplexity']):.4g}"


def warnings(run) -> list[str]:
    """A non-finite perplexity although no window loss is non-finite (their sum overflowed) — the core already
    warns about non-finite windows."""
    ppl = as_float(run.metrics.get("perplexity"))
    if math.isfinite(ppl) or int(run.metrics.get("n_nonfinite_windows") or 0):
        return []
    return [f"perplexity {ppl} although every window loss is finite (their sum overflowed)"]


KIND = RunKind(
    name="baseline", version=2, about="the unperturbed model's perplexity family, accuracy, throughput, memory",
    section=None, schema=None, check=no_check, expand=expand, depends_on=(), execute=execute,
    cost=lambda run: (run.max_eval_tokens, 1.0), summary=summary, report=ReportSection("", 0, baseline_section),
    warnings=warnings)
