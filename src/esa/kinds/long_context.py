"""Run kind ``long_context``: perplexity at extra (long) context lengths, one window per forward.

A study asks for it with a ``long_context:`` section::

    long_context:
      context_lens: [8192, 16384]        # window length T, each at batch size 1
      datasets: [wikitext-2]             # omit: the study's datasets
      max_eval_tokens: 262144            # scored tokens per run; omit: the study's; null: the whole split

One :class:`LongContextRun` per model × dataset × context length — what ``esa baseline --long-context`` runs:
:func:`esa.evals.baseline.score_cell` with ``long_context=True`` (micro-batch budget = T,
so one window per forward and the peak memory is that of a single window), with the study's method, stride
and BOS. The length is checked against the model's positions by :func:`esa.models.check_context`.

Metrics and arrays are a baseline run's: :func:`esa.evals.perplexity.perplexity_metrics` (perplexity, token
accuracy, bits per byte, scored tokens/bytes/words, tokens/s …) with ``corpus_source``, ``bos_resolved``,
``seed_invariant``, ``windows_available``, ``peak_memory``, ``mfu``, ``sanity`` and ``long_context: true``;
per-window arrays ``nll``, ``n_scored``, ``n_correct``, ``window_index`` (W,) each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from esa.evals.baseline import BaselineConfig
from esa.kinds.base import ReportSection, RunContext, RunKind
from esa.kinds.baseline import WindowCell, evaluate_stored_cell
from esa.models import LoadedModel
from esa.report.html import Block, Paragraph, Table
from esa.report.study_report import Run, fnum
from esa.core.files import as_float
from esa.study import Study, check_dataset, model_specs, require

KIND_NAME = "long_context"
FROM_STUDY = -1  # max_eval_tokens left out: the study's value (null already means the whole split)


@dataclass(frozen=True)
class LongContextSection:
    """The ``long_context:`` section of a study file."""

    context_lens: tuple[int, ...]  # window lengths T, each evaluated at batch size 1
    datasets: tuple[str, ...] = ()  # corpus names or .txt/.jsonl paths; empty → the study's datasets
    max_eval_tokens: int | None = FROM_STUDY  # scored tokens per run; -1 (omitted) → the study's; None → all


@dataclass(frozen=True)
class LongContextRun(WindowCell):
    """One model on one dataset at one long context length, with the study's first seed.

    Only the first seed, as ``esa baseline --long-context``: a long window costs a whole forward on its own,
    so a run scores few of them, and the spread across seeds is what the baseline grid's shorter contexts
    measure. When the budget covers the whole split the seed changes nothing (``seed_invariant`` says so).
    """

    kind: ClassVar[str] = KIND_NAME

    def label(self) -> str:
        return f"{self.model.name} {self.dataset} long ctx={self.context_len} seed={self.seed}"



# ------------------------------------------------------------------------------------------------ checks
def check(section: LongContextSection, study: Study, where: str) -> None:
    """Lengths and budgets; a length above a model's positions fails at execution (the model says how many)."""
    lens = section.context_lens
    require(bool(lens) and len(set(lens)) == len(lens) and min(lens) >= 2,
            f"{where}.context_lens: give distinct lengths ≥ 2, e.g. [8192, 16384]; got {list(lens)}")
    for i, name in enumerate(section.datasets):
        check_dataset(name, f"{where}.datasets[{i}]")
    m = section.max_eval_tokens
    require(m is None or m == FROM_STUDY or m >= 1,
            f"{where}.max_eval_tokens: ≥ 1, null for the whole split, or omit it for the study's")


# --------------------------------------------------------------------------------------------- expansion
def expand(study: Study) -> list[LongContextRun]:
    """model × dataset × context length, model-major, each with the study's first seed (see LongContextRun)."""
    s: LongContextSection | None = study.section(KIND_NAME)
    if s is None:
        return []
    budget = study.max_eval_tokens if s.max_eval_tokens == FROM_STUDY else s.max_eval_tokens
    return [LongContextRun(spec, d, ctx, study.seeds[0], study.method, study.stride, study.bos, budget)
            for spec in model_specs(study) for d in (s.datasets or study.datasets) for ctx in s.context_lens]


# --------------------------------------------------------------------------------------------- execution
def execute(lm: LoadedModel, run: LongContextRun, ctx: RunContext) -> tuple[dict, dict[str, np.ndarray]]:
    """``esa baseline --long-context`` for one cell; returns (metrics, per-window arrays)."""
    cfg = BaselineConfig(run.model, "study", (run.dataset,), (), (run.seed,), run.method, run.stride, run.bos,
                         run.max_eval_tokens, run.context_len, long_context=(run.context_len,))
    metrics, arrays = evaluate_stored_cell(lm, run, ctx, cfg, long_context=True)
    return {**metrics, "long_context": True}, arrays


def cost(run: LongContextRun) -> tuple[int | None, float]:
    """(scored tokens — an upper bound, the corpus may hold fewer; None = the whole split, 1 forward pass)."""
    return run.max_eval_tokens, 1.0


# ------------------------------------------------------------------------------------- summary and report
def peak_bytes(peak: dict) -> float | None:
    """The peak memory a run reports: CUDA max allocated, else the process's peak RSS (CPU)."""
    value = (peak or {}).get("cuda_max_allocated_bytes", (peak or {}).get("process_peak_rss_bytes"))
    return None if value is None else float(value)


def _gib(peak: dict) -> str:
    b = peak_bytes(peak)
    if b is None:
        return "—"
    where = "CUDA allocated" if "cuda_max_allocated_bytes" in peak else "process RSS"
    return f"{b / 2**30:.2f} GiB ({where})"


def _rate(m: dict) -> str:
    tps = m.get("tokens_per_second")
    return "—" if tps is None else f"{float(tps):,.0f}"


def summary(record) -> str:
    """``python-docs ctx=8192 ppl 12.34, 1,234 tok/s, peak 2.10 GiB (CUDA allocated)``."""
    m, c = record.metrics, record.config
    return (f"{c['dataset']} ctx={c['context_len']} ppl {fnum(as_float(m['perplexity']), 2)}, "
            f"{_rate(m)} tok/s, peak {_gib(m.get('peak_memory'))}")


REPORT_HEADER = ("model", "dtype", "dataset", "ctx", "method", "scored tokens", "windows", "perplexity",
                 "token accuracy", "tokens/s", "peak memory")


def _row(run: Run) -> tuple[str, ...]:
    c, m = run.config, run.metrics
    windows = f"{m.get('n_windows')} of {m.get('windows_available')}"
    return (run.model_name, str((c.get("model") or {}).get("dtype")), str(c.get("dataset")),
            str(c.get("context_len")), str(c.get("method")), f"{int(m.get('scored_tokens') or 0):,}", windows,
            fnum(as_float(m.get("perplexity"))), fnum(as_float(m.get("token_accuracy")), 4), _rate(m),
            _gib(m.get("peak_memory")))


def render(runs: list[Run]) -> list[Block]:
    """One row per completed run, grouped by model and dataset, in increasing context length."""
    done = sorted((r for r in runs if r.status == "completed"),
                  key=lambda r: (r.model_name, str(r.config.get("dataset")), r.config.get("context_len") or 0))
    text = (f"{len(done)} completed long-context run(s) of {len(runs)}: one window per forward (batch size 1), "
            "the study's first seed. Peak memory on CPU is the process's high-water mark (it includes loading).")
    return [Paragraph(text)] + ([Table(REPORT_HEADER, tuple(_row(r) for r in done))] if done else [])


KIND = RunKind(
    name=KIND_NAME, version=1,
    about="perplexity, tokens/s and peak memory at extra long context lengths, one window per forward",
    section=KIND_NAME, schema=LongContextSection, check=check, expand=expand, depends_on=(), execute=execute,
    cost=cost, summary=summary,
    report=ReportSection("Long context", 0, render))
