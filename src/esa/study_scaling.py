"""Expansion of a study's ``scaling:`` section (:mod:`esa.study_scaling_schema`) into ``scaling_point`` runs.

One run per model of the study's ``models`` list, in the study's order (smallest first, by convention). Each
runs :func:`esa.scaling.measure_model` — baseline, super weights, super weights vs ``random_k`` perturbed,
heavy-tail share — on its own seeded ``chunks`` windows (:mod:`esa.executors.scaling_points`); the trends
across models are computed when reporting (:mod:`esa.report.study_scaling`), from the stored rows.

Resolution of the section's defaults: ``dataset`` → the study's first dataset, ``context_len`` → its first
context length, ``seed`` → its first seed (one point per model, not per seed: a ladder compares models on one
protocol), ``max_eval_tokens`` → the study's (null: every window), ``statistics`` → all, in
:data:`esa.scaling.STATISTICS` order (so ``[sw_count, perplexity]`` and ``[perplexity, sw_count]`` are the
same run).

No dependencies: a scaling point does not reuse the study's baseline runs. Its paired ΔNLL needs the
unperturbed per-window NLL on exactly its evaluation windows, and the perturbation protocol computes that in
the same pass that builds its prefix cache, so reading a baseline run would save nothing and would tie the
point to the study's ``method``/``bos`` settings (a ladder always uses ``chunks``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from esa.models import ModelSpec
from esa.perturb.protocols import STOCHASTIC_OPS, EvalConfig
from esa.scaling import ScalingConfig, measurements, resolve_statistics
from esa.study import EXPANDERS, Study, model_specs

DETECTION_PASSES = 2  # super-weight searches per point: the row's own and the perturbation's target resolution


@dataclass(frozen=True)
class ScalingPointRun:
    """One model of a size ladder, measured with the scaling protocol; the fields are its resolved config."""

    kind: ClassVar[str] = "scaling_point"
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

    def config(self) -> dict:
        """The resolved run config: with the model fingerprint, it determines the run id."""
        return {"kind": self.kind, **asdict(self), "method": "chunks"}

    def label(self) -> str:
        return f"{self.model.name} scaling point {self.dataset} ctx={self.context_len} seed={self.seed}"

    def dependencies(self) -> dict:
        return {}

    def scaling_config(self) -> ScalingConfig:
        """The :class:`ScalingConfig` of a one-model ladder that :func:`esa.scaling.measure_model` runs."""
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


def expand_scaling(study: Study) -> list[ScalingPointRun]:
    """One scaling point per model, in the study's model order (see the module docstring)."""
    s = study.scaling
    if s is None:
        return []
    dataset, ctx = s.dataset or study.datasets[0], s.context_len or study.context_lens[0]
    seed = s.seed if s.seed is not None else study.seeds[0]
    tokens = s.max_eval_tokens if s.max_eval_tokens is not None else study.max_eval_tokens
    return [ScalingPointRun(spec, dataset, ctx, seed, tokens, study.batch_tokens, s.calib_samples, s.n_boot, s.op,
                            s.control_seeds, s.tail_fraction, resolve_statistics(s.statistics), s.x_axis)
            for spec in model_specs(study)]


EXPANDERS.register("scaling_point", expand_scaling)
