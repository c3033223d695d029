"""Expansion of a study's ``sensitivity:`` and ``perturbation:`` sections into runs.

Sensitivity runs — one per model × scorer × calibration seed × direction:

* a data-free scorer (``magnitude``) runs for the first seed only (the seed would change nothing);
* direction ``top`` always; ``bottom`` (the k *least* sensitive weights) only where the perturbation section
  needs it: a ``bottom: true`` target (a top ranking also keeps its floor table, for ``bottom_k``);
* ``calibration_tokens`` becomes ``ceil(tokens / context_len)`` chunks windows. Example: 65 536 tokens at
  context 512 → 128 windows (127 scored tokens each: the first token of a window is never predicted).

Perturbation runs — one per model × eval dataset × context × seed × target × op grid point. Each is protocol 1
of :mod:`esa.perturb.protocols` (the target set vs its controls, paired on the same windows) with control
seeds ``0 … trials-1``. A ranking target depends on the sensitivity run of its scorer with the *same seed*
(seed 0's run for a data-free scorer): the run's config then names that run's id (``depends_on``), so a new
ranking means a new perturbation run. Controls actually applied, per target kind:

* ranking target (top k): ``random_k``; ``bottom_k`` = per target tensor, as many of its lowest-scoring
  non-zero weights under the same scorer (the ranking's floor table, :func:`esa.perturb.targets.lowest_of`);
* ranking target with ``bottom: true``: ``random_k`` only (the target *is* the bottom);
* ``spec: superweights``: ``random_k``; ``bottom_k`` = the k smallest non-zero |W| of the same tensors;
* any other spec: ``random_k`` only (a glob or coordinate set has no ranking to take a tail from).

Order: every sensitivity run of a model precedes its perturbation runs (executors keep the order per model).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

from esa.models import ModelSpec
from esa.sensitivity.scorers import SCORERS
from esa.study import EXPANDERS, Study, TargetEntry, grid_points, model_specs


@dataclass(frozen=True)
class SensitivityRun:
    """Score every selected weight of one model with one scorer and keep the top (or bottom) k."""

    kind: ClassVar[str] = "sensitivity"
    model: ModelSpec
    scorer: str
    k: int
    mode: str  # global | per_layer
    bottom: bool  # True: the k least sensitive weights
    dataset: str  # calibration corpus
    context_len: int  # calibration window length T
    max_samples: int  # calibration windows
    seed: int  # picks the calibration windows (and Hutchinson probes)
    params: tuple[str, ...]  # fnmatch globs; ("*",) → every 2-D weight but embeddings and norms

    def config(self) -> dict:
        return {"kind": self.kind, **asdict(self)}

    def label(self) -> str:
        side = "bottom" if self.bottom else "top"
        return f"{self.model.name} sensitivity {self.scorer} {side}-{self.k} ({self.mode}) seed={self.seed}"

    def dependencies(self) -> dict:
        return {}


@dataclass(frozen=True)
class PerturbationRun:
    """Protocol 1 for one target set and one op setting, on one model's fixed evaluation windows."""

    kind: ClassVar[str] = "perturbation"
    model: ModelSpec
    target: str  # the target's name in the study
    spec: str | None  # target spec (esa.perturb.protocols.resolve_targets), or None for a ranking target
    ranking: str | None  # scorer whose ranking gives the targets
    k: int | None
    bottom: bool
    op: str  # parse_op spec of one grid point, e.g. "scale:factor=0.5"
    controls: tuple[str, ...]  # the controls applied (see the module docstring)
    control_seeds: tuple[int, ...]
    dataset: str
    context_len: int
    seed: int  # picks the evaluation windows
    max_eval_tokens: int | None
    batch_tokens: int
    ranking_run: SensitivityRun | None = None  # gives the targets and, for top targets, the bottom_k floor

    def config(self) -> dict:
        """Without the dependency runs: executors add their run ids as ``depends_on``."""
        cfg = {"kind": self.kind, **asdict(self), "method": "chunks"}
        del cfg["ranking_run"]
        return cfg

    def label(self) -> str:
        return f"{self.model.name} perturb {self.target} {self.op} {self.dataset} ctx={self.context_len} " \
               f"seed={self.seed}"

    def dependencies(self) -> dict:
        return {"ranking": self.ranking_run} if self.ranking_run is not None else {}


def op_spec(name: str, point: dict) -> str:
    """``name:key=value,…`` that :func:`esa.perturb.ops.parse_op` reads back into the same op."""
    def fmt(v) -> str:
        return "[" + ",".join(fmt(x) for x in v) + "]" if isinstance(v, list) else str(v)

    return name + (":" + ",".join(f"{k}={fmt(v)}" for k, v in sorted(point.items())) if point else "")


def _calib(study: Study) -> tuple[str, int]:
    s = study.sensitivity
    return s.calibration_dataset or study.datasets[0], s.context_len or study.context_lens[0]


def _needs_tail(study: Study, scorer: str) -> bool:
    p = study.perturbation
    if p is None:
        return False
    return any(t.ranking == scorer and t.bottom for t in p.targets)


def sensitivity_run(study: Study, spec: ModelSpec, scorer: str, seed: int, bottom: bool) -> SensitivityRun:
    s = study.sensitivity
    dataset, ctx = _calib(study)
    if not SCORERS.get(scorer).needs_data:
        seed = study.seeds[0]
    return SensitivityRun(spec, scorer, s.k, s.mode, bottom, dataset, ctx, math.ceil(s.calibration_tokens / ctx),
                          seed, s.params or ("*",))


def expand_sensitivity(study: Study) -> list[SensitivityRun]:
    """model × scorer × seed (first seed only for data-free scorers) × direction, model-major."""
    s = study.sensitivity
    if s is None:
        return []
    runs = []
    for spec in model_specs(study):
        for scorer in s.scorers:
            seeds = study.seeds if SCORERS.get(scorer).needs_data else study.seeds[:1]
            for bottom in (False, True) if _needs_tail(study, scorer) else (False,):
                runs += [sensitivity_run(study, spec, scorer, seed, bottom) for seed in seeds]
    return runs


def _controls_for(study: Study, t: TargetEntry) -> tuple[str, ...]:
    keep_bottom = (t.ranking is not None and not t.bottom) or (t.spec or "").strip() == "superweights"
    return tuple(c for c in study.perturbation.controls if c != "bottom_k" or keep_bottom)


def _perturbation_runs(study: Study, spec: ModelSpec, t: TargetEntry, dataset: str, ctx: int,
                       seed: int) -> list[PerturbationRun]:
    p = study.perturbation
    controls = _controls_for(study, t)
    ranking_run = sensitivity_run(study, spec, t.ranking, seed, t.bottom) if t.ranking is not None else None
    return [PerturbationRun(spec, t.name, t.spec, t.ranking, t.k, t.bottom, op_spec(entry.op, point), controls,
                            tuple(range(p.trials)), dataset, ctx, seed, study.max_eval_tokens, study.batch_tokens,
                            ranking_run)
            for entry in p.ops for point in grid_points(entry)]


def expand_perturbation(study: Study) -> list[PerturbationRun]:
    """model × dataset × ctx × seed × target × op setting, model-major.

    With ``max_eval_tokens: null`` every window is scored, so only the first seed is expanded (as for
    baselines).
    """
    p = study.perturbation
    if p is None:
        return []
    seeds = study.seeds if study.max_eval_tokens is not None else study.seeds[:1]
    return [run for spec in model_specs(study) for d in (p.datasets or study.datasets)
            for ctx in (p.context_lens or study.context_lens) for seed in seeds for t in p.targets
            for run in _perturbation_runs(study, spec, t, d, ctx, seed)]


EXPANDERS.register("sensitivity", expand_sensitivity)
EXPANDERS.register("perturbation", expand_perturbation)
