"""Expansion of a study's ``dose_response:`` and ``bitscan:`` sections (:mod:`esa.study_causal_schema`) into runs.

Dose-response runs — one per model × eval dataset × context × seed × target × k × op. Each is protocol 2 of
:mod:`esa.perturb.protocols` (:func:`~esa.perturb.protocols.dose_experiment`): for every value of the op's
strength parameter, the target arm and the ``random_k`` arm (control seeds ``0 … trials-1``) against the
unperturbed model on the same windows. Two dose axes:

* **strength** — the op's values (``scale`` factors, noise sigmas, bit positions) within one run;
* **size** — a ranking target without its own ``k`` expands into one run per value of ``ks``, so the report
  can draw ΔNLL vs k. Example: ``{name: top, ranking: wanda}`` with ``ks: [1, 10, 100]`` and two ops → 6 runs
  per model × dataset × context × seed.

Bit-scan runs — one per model × eval dataset × context × seed × target: protocol 3
(:func:`~esa.perturb.protocols.bitscan_experiment`): each listed bit of each of the first ``top_n`` target
weights flipped alone, then a greedy search for the fewest flips that collapse the model. A ranking target
without ``k`` takes ``k = top_n``.

A ranking target depends on the top-k sensitivity run of its scorer with the *same seed* (seed 0's run for a
data-free scorer), exactly as a perturbation run does (:mod:`esa.study_sections`): its id is part of the run's
resolved config (``depends_on``), so a new ranking means a new run. With ``max_eval_tokens: null`` only the
first seed is expanded (every window is scored, so seeds would repeat the same result).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from esa.models import ModelSpec
from esa.perturb.protocols import DOSE_PARAM
from esa.study import EXPANDERS, Study, model_specs
from esa.study_causal_schema import CausalTarget, op_string
from esa.study_sections import SensitivityRun, sensitivity_run


@dataclass(frozen=True)
class DoseResponseRun:
    """Protocol 2 for one target set and one op swept over its values, on one model's fixed windows."""

    kind: ClassVar[str] = "dose_response"
    model: ModelSpec
    target: str  # the target's name in the study
    spec: str | None  # target spec (esa.perturb.protocols.resolve_targets), or None for a ranking target
    ranking: str | None  # scorer whose top-k gives the targets
    k: int | None  # with ranking
    op: str  # op name with its fixed parameters, e.g. "gauss_noise:relative_to=tensor_std"
    parameter: str  # the swept parameter (esa.perturb.protocols.DOSE_PARAM), e.g. "factor"
    values: tuple  # its values, in the study's order
    control_seeds: tuple[int, ...]  # random_k draws (empty: no control arm)
    collapse_ppl: float | None  # None → esa.stats.DEFAULT_COLLAPSE_PPL
    dataset: str
    context_len: int
    seed: int  # picks the evaluation windows
    max_eval_tokens: int | None
    batch_tokens: int
    ranking_run: SensitivityRun | None = None  # gives the targets (ranking targets)

    def config(self) -> dict:
        """Without the dependency run: executors add its run id as ``depends_on``."""
        cfg = {"kind": self.kind, **asdict(self), "method": "chunks"}
        del cfg["ranking_run"]
        return cfg

    def label(self) -> str:
        size = f" k={self.k}" if self.k is not None else ""
        return f"{self.model.name} dose {self.target}{size} {self.op} {self.parameter}={list(self.values)} " \
               f"{self.dataset} ctx={self.context_len} seed={self.seed}"

    def dependencies(self) -> dict:
        return {"ranking": self.ranking_run} if self.ranking_run is not None else {}


@dataclass(frozen=True)
class BitscanRun:
    """Protocol 3 for one target set: single bit flips of its first ``top_n`` weights, then greedy collapse."""

    kind: ClassVar[str] = "bitscan"
    model: ModelSpec
    target: str
    spec: str | None
    ranking: str | None
    k: int | None
    top_n: int
    bits: tuple[str, ...]  # positions or names, as written in the study (as strings)
    max_flips: int
    greedy_pool: int
    collapse_ppl: float | None  # None → esa.stats.DEFAULT_COLLAPSE_PPL
    dataset: str
    context_len: int
    seed: int
    max_eval_tokens: int | None
    batch_tokens: int
    ranking_run: SensitivityRun | None = None

    def config(self) -> dict:
        cfg = {"kind": self.kind, **asdict(self), "method": "chunks"}
        del cfg["ranking_run"]
        return cfg

    def label(self) -> str:
        return f"{self.model.name} bitscan {self.target} top-{self.top_n} bits={list(self.bits)} {self.dataset} " \
               f"ctx={self.context_len} seed={self.seed}"

    def dependencies(self) -> dict:
        return {"ranking": self.ranking_run} if self.ranking_run is not None else {}


def _cells(study: Study, section) -> list[tuple[ModelSpec, str, int, int]]:
    """(model, dataset, ctx, seed), model-major; the first seed only when the whole split is scored."""
    seeds = section.seeds or study.seeds
    seeds = seeds if study.max_eval_tokens is not None else seeds[:1]
    return [(spec, d, ctx, seed) for spec in model_specs(study) for d in (section.datasets or study.datasets)
            for ctx in (section.context_lens or study.context_lens) for seed in seeds]


def _ranking_run(study: Study, spec: ModelSpec, t: CausalTarget, seed: int) -> SensitivityRun | None:
    return sensitivity_run(study, spec, t.ranking, seed, False) if t.ranking is not None else None


def expand_dose_response(study: Study) -> list[DoseResponseRun]:
    """model × dataset × ctx × seed × target × k × op, model-major (after the sensitivity runs)."""
    d = study.dose_response
    if d is None:
        return []
    seeds = tuple(range(d.trials)) if "random_k" in d.controls else ()
    runs = []
    for spec, dataset, ctx, seed in _cells(study, d):
        for t in d.targets:
            ks = [None] if t.ranking is None else ([t.k] if t.k is not None else list(d.ks))
            for k in ks:
                runs += [DoseResponseRun(spec, t.name, t.spec, t.ranking, k, op_string(op), DOSE_PARAM[op.op],
                                         tuple(op.values), seeds, d.collapse_ppl, dataset, ctx, seed,
                                         study.max_eval_tokens, study.batch_tokens, _ranking_run(study, spec, t, seed))
                         for op in d.ops]
    return runs


def expand_bitscan(study: Study) -> list[BitscanRun]:
    """model × dataset × ctx × seed × target, model-major (after the sensitivity runs)."""
    b = study.bitscan
    if b is None:
        return []
    bits = tuple(str(x) for x in b.bits)
    return [BitscanRun(spec, t.name, t.spec, t.ranking, (t.k or b.top_n) if t.ranking else None, b.top_n, bits,
                       b.max_flips, b.greedy_pool, b.collapse_ppl, dataset, ctx, seed, study.max_eval_tokens,
                       study.batch_tokens, _ranking_run(study, spec, t, seed))
            for spec, dataset, ctx, seed in _cells(study, b) for t in b.targets]


EXPANDERS.register("dose_response", expand_dose_response)
EXPANDERS.register("bitscan", expand_bitscan)
