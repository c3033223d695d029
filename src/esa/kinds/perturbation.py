"""Run kind ``perturbation``: protocol 1 of :mod:`esa.perturb.protocols` — a target set against size-matched
controls, paired on the same fixed windows — for one target and one op setting.

Study section ``perturbation:`` (:class:`PerturbationSection`). Runs — one per model × eval dataset × context ×
seed × target × op grid point, with control seeds ``0 … trials-1``. A ranking target depends on the sensitivity
run of its scorer with the *same seed* (seed 0's run for a data-free scorer): the run's config then names that
run's id (``depends_on``), so a new ranking means a new perturbation run. Controls actually applied:

* ranking target (top k): ``random_k``; ``bottom_k`` = per target tensor, as many of its lowest-scoring
  non-zero weights under the same scorer (the ranking's floor table, :func:`esa.perturb.targets.lowest_of`);
* ranking target with ``bottom: true``: ``random_k`` only (the target *is* the bottom);
* ``spec: superweights``: ``random_k``; ``bottom_k`` = the k smallest non-zero |W| of the same tensors;
* any other spec: ``random_k`` only (a glob or coordinate set has no ranking to take a floor from);
* any target: ``largest_k`` = per target tensor, as many of its largest-|W| other weights (super weights vs as
  many of the largest non-super weights, the super-weight paper's comparison at matched count).

Metrics: every paired comparison (mean ΔNLL, bootstrap-t CI, Wilcoxon/t-test p-values with Holm and BH, PPL
ratio, collapsed), separation ratios, per-arm sizes and seeds, the baseline, notes; ``perplexity`` is the target
arm's perturbed PPL. Arrays: perturb.npz's (window_index, n_scored, baseline_nll, ``<arm>_nll``,
``<arm>_nll_per_seed``, ``delta__<comparison>``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from esa.core.errors import EsaError
from esa.kinds.base import ReportSection, RunContext, RunKind
from esa.kinds.causal import (CausalRun, ProtocolSettings, _cells, _check_places, _check_settings, causal_fields,
                              check_files, eval_config, execute_protocol)
from esa.kinds.sensitivity import sensitivity_run
from esa.models import LoadedModel, ModelSpec
from esa.perturb.protocols.common import CONTROLS
from esa.core.registry import suggest
from esa.report.study_perturbation import causal_section
from esa.core.files import as_float
from esa.study import Study, require



# ------------------------------------------------------------------------------------------------- section
@dataclass(frozen=True)
class TargetEntry:
    """A named set of weights to perturb: a target string, or the top/bottom k of a scorer's ranking."""

    name: str
    spec: str | None = None  # esa.perturb.targets.parse_targets string (rows:/cols:/tensor: glob, coords, file)
    ranking: str | None = None  # scorer whose ranking gives the targets
    k: int | None = None  # with ranking: how many
    bottom: bool = False  # with ranking: the least sensitive k instead of the top k
    bottom_ranking: str | None = None  # a ranking file (esa sensitivity) whose floor table gives bottom_k


@dataclass(frozen=True)
class OpEntry:
    """A perturbation op and a grid over its parameters (a scalar is a one-point axis)."""

    op: str  # name in esa.perturb.ops.OPS
    grid: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PerturbationSection(ProtocolSettings):
    targets: tuple[TargetEntry, ...]
    ops: tuple[OpEntry, ...]
    controls: tuple[str, ...] = ()  # see CONTROLS
    trials: int = 1  # control seeds 0…trials-1: random_k draws, and op seeds of random ops
    control_seeds: tuple[int, ...] = ()  # explicit control seeds instead of 0…trials-1
    datasets: tuple[str, ...] = ()  # evaluation corpora; empty → the study's datasets
    context_lens: tuple[int, ...] = ()  # evaluation window lengths; empty → the study's context_lens
    seeds: tuple[int, ...] = ()  # a subset of the study's seeds; empty → all of them


def grid_points(entry: OpEntry) -> list[dict]:
    """Every parameter combination of an op's grid (a scalar value is a one-point axis)."""
    axes = {k: v if isinstance(v, list) else [v] for k, v in entry.grid.items()}
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def check(p: PerturbationSection, study: Study, where: str) -> None:
    from esa.perturb.ops import OPS, make_op
    from esa.sensitivity.scorers import SCORERS

    sens = study.section("sensitivity")
    require(bool(p.targets) and bool(p.ops), f"{where}: give at least one target and one op")
    require(p.trials >= 1, f"{where}.trials must be ≥ 1")
    require(len(set(p.control_seeds)) == len(p.control_seeds), f"{where}.control_seeds: distinct seeds, got "
             f"{list(p.control_seeds)}")
    _check_settings(p, where)
    scorers = sens.scorers if sens else tuple(SCORERS.names())
    names = [t.name for t in p.targets]
    require(len(set(names)) == len(names), f"{where}.targets: duplicate target names in {names}")
    for i, t in enumerate(p.targets):
        at = f"{where}.targets[{i}]"
        require((t.spec is None) != (t.ranking is None), f"{at}: give exactly one of 'spec' or 'ranking'")
        check_files(t.spec, t.bottom_ranking, at)
        if t.ranking is not None:
            require(t.ranking in scorers, f"{at}.ranking: " + suggest(t.ranking, list(scorers), "scorer")
                     + (" (list it under sensitivity.scorers)" if sens else ""))
            require(sens is not None, f"{at}.ranking: a ranking target needs a sensitivity: section that "
                     f"scores {t.ranking!r}; add one, or give a spec: instead")
            require(t.k is not None and 1 <= t.k <= sens.k,
                     f"{at}: a ranking target needs 1 ≤ k ≤ sensitivity.k ({sens.k}), got {t.k}")
    for i, op in enumerate(p.ops):
        if op.op not in OPS:
            raise EsaError(f"{where}.ops[{i}].op: " + suggest(op.op, OPS.names(), "perturbation op"))
        for point in grid_points(op):
            try:
                make_op(op.op, **point)
            except (EsaError, TypeError, ValueError) as exc:
                raise EsaError(f"{where}.ops[{i}] {op.op} {point}: {exc}") from exc
    for i, c in enumerate(p.controls):
        require(c in CONTROLS, f"{where}.controls[{i}]: " + suggest(c, list(CONTROLS), "control"))
    _check_places(p, study.seeds, where)


# ----------------------------------------------------------------------------------------------- expansion
@dataclass(frozen=True, kw_only=True)
class PerturbationRun(CausalRun):
    """Protocol 1 for one target set and one op setting, on one model's fixed evaluation windows."""

    kind: ClassVar[str] = "perturbation"
    bottom: bool  # the target is a ranking's bottom k
    op: str  # parse_op spec of one grid point, e.g. "scale:factor=0.5"
    controls: tuple[str, ...]  # the controls applied (see the module docstring)
    control_seeds: tuple[int, ...]
    bottom_ranking: str | None = None  # a ranking file whose floor table gives bottom_k (sha256 in inputs)

    def what(self) -> str:
        return f"perturb {self.target} {self.op}"



def op_spec(name: str, point: dict) -> str:
    """``name:key=value,…`` that :func:`esa.perturb.ops.parse_op` reads back into the same op."""
    def fmt(v) -> str:
        return "[" + ",".join(fmt(x) for x in v) + "]" if isinstance(v, list) else str(v)

    return name + (":" + ",".join(f"{k}={fmt(v)}" for k, v in sorted(point.items())) if point else "")


def _controls_for(study: Study, t: TargetEntry) -> tuple[str, ...]:
    spec = (t.spec or "").strip()
    keep_bottom = (t.ranking is not None and not t.bottom) or spec == "superweights" or spec.startswith("topk:") \
        or t.bottom_ranking is not None
    return tuple(c for c in study.section("perturbation").controls if c != "bottom_k" or keep_bottom)


def _perturbation_runs(study: Study, spec: ModelSpec, t: TargetEntry, dataset: str, ctx: int,
                       seed: int) -> list[PerturbationRun]:
    p = study.section("perturbation")
    controls = _controls_for(study, t)
    ranking_run = sensitivity_run(study, spec, t.ranking, seed, t.bottom) if t.ranking is not None else None
    cell = causal_fields(study, p, spec, t, t.k, dataset, ctx, seed, ranking_run, t.bottom_ranking)
    return [PerturbationRun(**cell, bottom=t.bottom, op=op_spec(entry.op, point), controls=controls,
                            control_seeds=p.control_seeds or tuple(range(p.trials)), bottom_ranking=t.bottom_ranking)
            for entry in p.ops for point in grid_points(entry)]


def expand(study: Study) -> list[PerturbationRun]:
    """model × dataset × ctx × seed × target × op setting, model-major.

    With ``max_eval_tokens: null`` every window is scored, so only the first seed is expanded (as for
    baselines).
    """
    p = study.section("perturbation")
    if p is None:
        return []
    return [run for spec, d, ctx, seed in _cells(study, p) for t in p.targets
            for run in _perturbation_runs(study, spec, t, d, ctx, seed)]


# ----------------------------------------------------------------------------------------------- execution
def perturb_config(run, ranking_file: str | None = None):
    """The :class:`PerturbConfig` of a perturbation run, given its ranking file (for ranking targets).

    A top-ranking target's bottom_k control comes from the floor table written beside that file, a spec
    target's from ``bottom_ranking`` when given."""
    from esa.perturb.protocols import PerturbConfig

    targets = run.spec if run.spec is not None else f"topk:{ranking_file}:{run.k}"
    return PerturbConfig(targets, run.op, run.controls, run.bottom_ranking, run.control_seeds, eval_config(run))


def _metrics(doc: dict) -> dict:
    """The stored metrics: the comparisons by name, separation, per-arm sizes and seeds, baseline, data, notes
    (the whole document, with element lists and trial records, is the run's ``protocol`` document)."""
    comps = {c["name"]: c for c in doc["comparisons"]}
    target = comps.get("target vs baseline", {})
    arms = [{k: a[k] for k in ("name", "op", "n_elements", "seeds", "tensors", "source", "seed_spread")}
            for a in doc["arms"]]
    data = {k: v for k, v in doc["data"].items() if k not in ("window_indices", "calibration_indices")}
    return {"perplexity": target.get("ppl_perturbed"), "baseline_perplexity": doc["baseline"]["perplexity"],
            "mean_delta_nll": target.get("mean_delta_nll"), "collapsed": target.get("collapsed"),
            "comparisons": comps, "separation": doc["separation"], "arms": arms, "baseline": doc["baseline"],
            "data": data, "targets": {k: v for k, v in doc["targets"].items() if k not in ("spec", "ranking")},
            "notes": doc["notes"], "wall_seconds": doc["wall_seconds"],
            **({"downstream": doc["downstream"]} if "downstream" in doc else {})}


def execute(lm: LoadedModel, run, ctx: RunContext) -> tuple[dict, dict[str, np.ndarray]]:
    """Protocol 1 (targets vs controls, paired on the same windows) for one target and one op setting."""
    from esa.perturb.protocols import perturb_experiment

    return execute_protocol(lm, run, ctx, perturb_experiment, perturb_config, _metrics)


# ------------------------------------------------------------------------------------------ cost, summary
def cost(run: PerturbationRun) -> tuple[int | None, float]:
    """(scored tokens, passes): the baseline pass + every trial (upper bound: the prefix cache saves some)."""
    from esa.perturb.protocols import STOCHASTIC_OPS

    repeats = len(run.control_seeds) if run.op.partition(":")[0] in STOCHASTIC_OPS else 1
    arms = repeats + (len(run.control_seeds) if "random_k" in run.controls else 0) \
        + (repeats if "bottom_k" in run.controls else 0)
    return run.max_eval_tokens, 1.0 + arms


def summary(record) -> str:
    m = record.metrics
    vs = m["comparisons"].get("target vs random_k")
    return f"ΔNLL {as_float(m['mean_delta_nll']):.4g} (ppl {as_float(m['baseline_perplexity']):.4g} → " \
        f"{as_float(m['perplexity']):.4g})" + (f"; target − random_k {as_float(vs['mean_delta_nll']):+.4g} "
                                               "nats/token" if vs else "")


KIND = RunKind(
    name="perturbation", version=2, about="a target set vs size-matched controls, paired on the same windows",
    section="perturbation", schema=PerturbationSection, check=check, expand=expand, depends_on=("sensitivity",),
    execute=execute, cost=cost, summary=summary, report=ReportSection("Causal validation", 2, causal_section))
