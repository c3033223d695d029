"""Run kind ``scaling_point``: one model of a size ladder, measured with the protocol of :mod:`esa.scaling.fits`.

Study section ``scaling:`` (:class:`ScalingSection`): every model of the study's ``models`` list is one point.
Example (``studies/scaling.yaml``)::

    scaling:
      statistics: [bits_per_byte, sw_count, sw_delta_nll, magnitude_top_share]   # omit: all of them
      tail_fraction: 0.001
      context_len: 512          # omit: the study's first context length
      max_eval_tokens: 65536    # omit: the study's max_eval_tokens

The fields mirror :class:`esa.scaling.fits.ScalingConfig` and its :class:`~esa.perturb.protocols.EvalConfig`;
``models``, ``dtype``, ``device`` and ``batch_tokens`` come from the study. Resolution of the defaults:
``dataset`` → the study's first dataset, ``context_len`` → its first context length, ``seed`` → its first seed
(one point per model, not per seed: a ladder compares models on one protocol), ``max_eval_tokens`` → the
study's (null: every window), ``statistics`` → all, in :data:`esa.scaling.fits.STATISTICS` order.

Execution: :func:`esa.scaling.fits.measure_model` — the same function ``esa scaling`` uses — baseline, super weights,
super weights vs ``random_k`` perturbed, heavy-tail share, on the point's own seeded ``chunks`` windows. Metrics:
the scaling row (model, n_params, perplexity, bits_per_byte, super-weight count/layer/depth, sw_/random_ ΔNLL
with CIs and PPL ratios, sw_over_random, magnitude_top_share, data, notes) plus ``perturbation``: the full
perturb.json document (or null). Arrays: ``window_index``, ``n_scored``, ``baseline_nll`` and, when the
perturbation ran, the arms' NLLs and ``delta__<comparison>``, as in ``perturb.npz``. No dependencies: the paired
ΔNLL needs the unperturbed NLL on exactly its windows, which the protocol computes while building its prefix
cache. The trends across models are fitted when reporting (:mod:`esa.report.study_scaling`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from esa.core.errors import EsaError
from esa.kinds.base import KindRun, ReportSection, RunContext, RunKind
from esa.models import LoadedModel, ModelSpec
from esa.perturb.protocols import STOCHASTIC_OPS, EvalConfig
from esa.core.registry import suggest
from esa.report.study_scaling import scaling_section
from esa.scaling.fits import X_AXES, ScalingConfig, measurements, resolve_statistics
from esa.study import Study, check_dataset, model_specs, require

DETECTION_PASSES = 2  # super-weight searches per point: the row's own and the perturbation's target resolution


@dataclass(frozen=True)
class ScalingSection:
    """One scaling point per model of the study; ``None`` fields take the study's value."""

    statistics: tuple[str, ...] = ()  # esa.scaling.fits.STATISTICS keys to measure and fit; empty → all
    op: str = "zero"  # perturbation of the super weights and of the size-matched random_k control
    control_seeds: tuple[int, ...] = (0, 1, 2)  # random_k draws
    tail_fraction: float = 0.001  # heavy-tail share: the top 0.1 % of |W|
    x_axis: str = "n_params"  # n_params (tied embeddings once) | n_params_non_embedding
    dataset: str | None = None  # None → the study's first dataset
    context_len: int | None = None  # chunks window length T; None → the study's first context length
    seed: int | None = None  # picks evaluation and calibration windows; None → the study's first seed
    max_eval_tokens: int | None = None  # scored tokens per model, in its own tokens; None → the study's
    calib_samples: int = 4  # windows for super-weight detection, drawn from those not evaluated
    n_boot: int = 10_000  # bootstrap resamples per ΔNLL CI


def check(s: ScalingSection, study: Study, at: str) -> None:
    """Semantic checks of the scaling section (types were checked while parsing)."""
    from esa.perturb.ops import parse_op

    try:
        resolve_statistics(s.statistics)
    except EsaError as exc:
        raise EsaError(f"{at}.statistics: {exc}") from exc
    try:
        parse_op(s.op)
    except (EsaError, TypeError, ValueError) as exc:
        raise EsaError(f"{at}.op: {exc}") from exc
    require(bool(s.control_seeds), f"{at}.control_seeds: give at least one random_k seed, e.g. [0, 1, 2]")
    require(len(set(s.control_seeds)) == len(s.control_seeds) and min(s.control_seeds) >= 0,
             f"{at}.control_seeds: {list(s.control_seeds)} must be distinct and ≥ 0")
    require(0 < s.tail_fraction < 1, f"{at}.tail_fraction: {s.tail_fraction} must be in (0, 1), e.g. 0.001")
    require(s.x_axis in X_AXES, f"{at}.x_axis: " + suggest(s.x_axis, list(X_AXES), "x axis"))
    if s.dataset is not None:
        check_dataset(s.dataset, f"{at}.dataset")
    require(s.context_len is None or s.context_len >= 2, f"{at}.context_len must be ≥ 2 (or omitted)")
    require(s.seed is None or s.seed >= 0, f"{at}.seed must be ≥ 0 (or omitted)")
    require(s.max_eval_tokens is None or s.max_eval_tokens >= 1,
             f"{at}.max_eval_tokens must be ≥ 1 (omit it to use the study's)")
    require(s.calib_samples >= 1 and s.n_boot >= 1, f"{at}: calib_samples and n_boot must be ≥ 1")


@dataclass(frozen=True)
class ScalingPointRun(KindRun):
    """One model of a size ladder, measured with the scaling protocol; the fields are its resolved config."""

    kind: ClassVar[str] = "scaling_point"
    CONSTANT_CONFIG: ClassVar[dict] = {"method": "chunks"}  # every window of this kind is a chunks window
    model: ModelSpec
    dataset: str
    context_len: int  # chunks window length T
    seed: int  # picks the evaluation and calibration windows
    max_eval_tokens: int | None  # scored tokens, in this model's own tokens; None → every window
    batch_tokens: int
    calib_samples: int  # windows for super-weight detection
    n_boot: int
    op: str  # applied to the super weights and to the random_k control
    control_seeds: tuple[int, ...]
    tail_fraction: float
    statistics: tuple[str, ...]  # resolved: STATISTICS order, never empty
    x_axis: str  # the ladder's trend axis (what the report fits against)

    def label(self) -> str:
        return f"{self.model.name} scaling point {self.dataset} ctx={self.context_len} seed={self.seed}"


    def scaling_config(self) -> ScalingConfig:
        """The :class:`ScalingConfig` of a one-model ladder that :func:`esa.scaling.fits.measure_model` runs."""
        data = EvalConfig(self.dataset, self.context_len, self.max_eval_tokens, self.seed, self.batch_tokens,
                          self.calib_samples, self.n_boot)
        return ScalingConfig((self.model.name,), data, self.op, self.control_seeds, self.tail_fraction,
                             self.x_axis, self.model.dtype, self.model.device, self.statistics)

    def cost(self) -> tuple[int | None, float]:
        """(scored tokens, forward-equivalent passes over them) for ``esa plan``: the baseline pass, every
        perturbed trial (the op's repeats and one per random_k seed; an upper bound, the prefix cache saves
        some), and the super-weight searches on the calibration windows, converted to passes."""
        needs = measurements(self.statistics)
        passes = 1.0
        if "perturbation" in needs:
            stochastic = self.op.partition(":")[0] in STOCHASTIC_OPS
            passes += (len(self.control_seeds) if stochastic else 1) + len(self.control_seeds)
        if "superweights" in needs and self.max_eval_tokens:
            searches = DETECTION_PASSES if "perturbation" in needs else 1
            passes += searches * self.calib_samples * self.context_len / self.max_eval_tokens
        return self.max_eval_tokens, passes


def expand(study: Study) -> list[ScalingPointRun]:
    """One scaling point per model, in the study's model order (see the module docstring)."""
    s = study.section("scaling")
    if s is None:
        return []
    dataset, ctx = s.dataset or study.datasets[0], s.context_len or study.context_lens[0]
    seed = s.seed if s.seed is not None else study.seeds[0]
    tokens = s.max_eval_tokens if s.max_eval_tokens is not None else study.max_eval_tokens
    return [ScalingPointRun(spec, dataset, ctx, seed, tokens, study.batch_tokens, s.calib_samples, s.n_boot, s.op,
                            s.control_seeds, s.tail_fraction, resolve_statistics(s.statistics), s.x_axis)
            for spec in model_specs(study)]


def execute(lm: LoadedModel, run, ctx: RunContext) -> tuple[dict, dict[str, np.ndarray]]:
    """Measure one model of the ladder with ``run``'s protocol (``ctx`` is unused: the bench loads its own
    corpus, and a scaling point depends on no other run)."""
    from esa.scaling.fits import measure_model

    row, doc, arrays = measure_model(lm, run.scaling_config())
    return {**row, "perturbation": doc}, arrays


def summary(record) -> str:
    """One progress line of a finished point: bits per byte, super weights and their ΔNLL vs random_k."""
    metrics = record.metrics
    def g(key: str) -> str:
        v = metrics.get(key)
        return "—" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    return f"bpb {g('bits_per_byte')} (ppl {g('perplexity')}), {g('sw_count')} super weight(s), " \
           f"ΔNLL super weights {g('sw_delta_nll')} vs random_k {g('random_delta_nll')}"



KIND = RunKind(
    name="scaling_point", version=2, about="one model of a size ladder measured with the scaling protocol",
    section="scaling", schema=ScalingSection, check=check, expand=expand, depends_on=(), execute=execute,
    cost=lambda run: run.cost(), summary=summary, report=ReportSection("Scaling", 3, scaling_section))
