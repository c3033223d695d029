"""Run kind ``superweights``: one super-weight search (Yu et al. 2024) of one model on seeded windows — the
scalar weights of the MLP output projections whose products create massive activations.

Study section ``superweights:`` (:class:`SuperWeightsSection`); one run per model × seed of ``seeds`` (default:
the study's first seed — the seed picks the ``max_samples`` chunks windows of the single forward pass).
Execution: :func:`esa.sensitivity.superweight_run.window_batch` then
:func:`esa.sensitivity.superweights.find_super_weights`, restoring every weight it zeroes between rounds.
Metrics: the detector's report (candidates with layer, row, col, weight, output activation, share and round;
massive activations; thresholds), the windows and the decoded tokens of the candidates and massive activations
— everything ``esa superweights`` exports as ``superweights.json`` (and draws as ``superweights.png``, through
:func:`esa.sensitivity.superweights.report_from_dict`). No arrays. The section's ``spike_ratio`` …
``massive_floor`` are the detector's :class:`~esa.sensitivity.superweights.Thresholds`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

from esa.kinds.base import KindRun, ReportSection, RunContext, RunKind
from esa.models import LoadedModel, ModelSpec
from esa.report.html import Block, Paragraph, Table
from esa.report.study_report import Run, fnum, run_label
from esa.core.errors import EsaError
from esa.core.files import as_float
from esa.sensitivity.superweights import Thresholds
from esa.study import Study, check_dataset, model_specs, require

_DEFAULT = Thresholds()


@dataclass(frozen=True)
class SuperWeightsSection:
    dataset: str | None = None  # calibration corpus; None → the study's first dataset
    context_len: int = 128  # tokens per window (chunks, the super-weight paper's convention)
    max_samples: int = 4  # windows in the single forward pass
    iterations: int = 1  # search rounds; > 1 zeroes what was found and searches again
    seeds: tuple[int, ...] = ()  # a subset of the study's seeds; empty → its first seed
    # The detector's thresholds (esa.sensitivity.superweights.Thresholds; magnitudes are |activation| values):
    spike_ratio: float = _DEFAULT.spike_ratio  # spike: a channel's max > ratio × its layer's median channel max
    spike_floor: float = _DEFAULT.spike_floor  # … and > this absolute value
    min_share: float = _DEFAULT.min_share  # the weight's product must carry ≥ this fraction of the output
    require_input_spike: bool = _DEFAULT.require_input_spike  # paper-strict: the input channel spikes as well
    massive_ratio: float = _DEFAULT.massive_ratio  # residual |h| massive: > ratio × its layer's median |h|
    massive_floor: float = _DEFAULT.massive_floor  # … and > this absolute value


def thresholds(s: SuperWeightsSection) -> Thresholds:
    return Thresholds(s.spike_ratio, s.spike_floor, s.min_share, s.require_input_spike, s.massive_ratio,
                      s.massive_floor)


def check(s: SuperWeightsSection, study: Study, where: str) -> None:
    require(s.context_len >= 2 and s.max_samples >= 1 and s.iterations >= 1,
            f"{where}: context_len ≥ 2, max_samples ≥ 1 and iterations ≥ 1")
    if s.dataset is not None:
        check_dataset(s.dataset, f"{where}.dataset")
    extra = [x for x in s.seeds if x not in study.seeds]
    require(not extra, f"{where}.seeds: {extra} not among the study's seeds {list(study.seeds)}")
    try:
        thresholds(s)
    except EsaError as exc:
        raise EsaError(f"{where}.{exc}") from None


@dataclass(frozen=True)
class SuperWeightsRun(KindRun):
    kind: ClassVar[str] = "superweights"
    CONSTANT_CONFIG: ClassVar[dict] = {"method": "chunks"}  # every window of this kind is a chunks window
    model: ModelSpec
    dataset: str
    context_len: int
    max_samples: int
    iterations: int
    seed: int  # picks the windows
    thresholds: Thresholds = _DEFAULT  # the detector's thresholds

    def label(self) -> str:
        return f"{self.model.name} superweights {self.dataset} ctx={self.context_len} seed={self.seed}"



def expand(study: Study) -> list[SuperWeightsRun]:
    s = study.section("superweights")
    if s is None:
        return []
    return [SuperWeightsRun(spec, s.dataset or study.datasets[0], s.context_len, s.max_samples, s.iterations, seed,
                            thresholds(s))
            for spec in model_specs(study) for seed in (s.seeds or study.seeds[:1])]


def execute(lm: LoadedModel, run: SuperWeightsRun, ctx: RunContext) -> tuple[dict, dict]:
    """The search of ``esa superweights`` on ``run``'s windows; (metrics, no arrays)."""
    from esa.sensitivity.superweight_run import SuperWeightRun, window_batch
    from esa.sensitivity.superweights import find_super_weights

    start = time.perf_counter()
    cfg = SuperWeightRun(run.dataset, run.context_len, run.max_samples, run.seed, run.iterations, run.thresholds)
    ids, sel, corpus = window_batch(lm, cfg)
    report = find_super_weights(lm.model, ids, thresholds=cfg.thresholds, iterate=run.iterations > 1,
                                max_iterations=run.iterations)
    tokens = sorted({w.token_id for w in report.candidates} | {t for m in report.massive_activations
                                                                for t in m.token_ids})
    return {**report.to_dict(), "n_candidates": len(report.candidates),
            "data": {"dataset": corpus.name, "source": corpus.source, "method": sel.windows.method,
                     "bos": sel.windows.bos, "context_len": run.context_len, "seed": run.seed,
                     "seed_invariant": bool(sel.seed_invariant), "window_indices": sel.indices[: len(ids)].tolist()},
            "tokens": {str(t): lm.tokenizer.decode([t]) for t in tokens},  # token id → text, for reading
            "wall_seconds": time.perf_counter() - start}, {}


def summary(record) -> str:
    cands = record.metrics.get("candidates", [])
    shown = ", ".join(f"L{c['layer']}[{c['row']},{c['col']}]" for c in cands[:4])
    return f"{len(cands)} candidate(s)" + (f": {shown}" + (" …" if len(cands) > 4 else "") if cands else "")


HEADER = ("run", "round", "weight", "value", "|output activation|", "share of the spike", "token")


def report(runs: list[Run]) -> list[Block]:
    done = [r for r in runs if r.status == "completed"]
    rows = tuple((run_label(r), str(c["iteration"]), f"L{c['layer']} {c['param_name']}[{c['row']},{c['col']}]",
                  fnum(as_float(c["weight"]), 4), fnum(as_float(c["output_activation"]), 1),
                  fnum(as_float(c["share"]), 3), repr(r.metrics.get("tokens", {}).get(str(c.get("token_id")), "")))
                 for r in done for c in r.metrics.get("candidates", []))
    text = (f"{len(done)} search(es) of super weights — single weights of an MLP output projection whose product "
            "with one input channel creates a massive activation (Yu et al. 2024); one forward pass over the "
            "run's windows per round.")
    return [Paragraph(text), Table(HEADER, rows)] if rows else [Paragraph(text + " No candidates were found.")]


KIND = RunKind(
    name="superweights", version=1, about="locate super weights from massive activations (one forward pass)",
    section="superweights", schema=SuperWeightsSection, check=check, expand=expand, depends_on=(),
    execute=execute, cost=lambda run: (run.max_samples * (run.context_len - 1), float(run.iterations)),
    summary=summary, report=ReportSection("Super weights", 1, report), split_by_replicas=False)
