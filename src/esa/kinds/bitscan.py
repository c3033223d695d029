"""Run kind ``bitscan``: protocol 3 of :mod:`esa.perturb.protocols` — each listed bit of each of the first
``top_n`` target weights flipped alone, then a greedy search for the fewest flips that collapse the model.

Study section ``bitscan:`` (:class:`BitscanSection`). Runs — one per model × eval dataset × context × seed ×
target. A ranking target without ``k`` takes ``k = top_n``. Example::

    bitscan:
      targets: [{name: top_gxw, ranking: grad_x_weight, k: 4}]
      top_n: 4                                      # the first 4 target weights, in ranking order
      bits: [sign, exponent_msb, 30]
      max_flips: 8                                  # greedy collapse search gives up after this many
      greedy_pool: 64
      order: predicted                              # optional: measure predicted-first, stop by the bound
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from esa.kinds.base import ReportSection, RunContext, RunKind
from esa.kinds.causal import (CausalRun, CausalTarget, ProtocolSettings, _cells, _check_bits, _check_places,
                              _check_settings, _check_targets, _common, _ranking_run, _targets, causal_fields,
                              eval_config, execute_protocol, model_dtypes, severity)
from esa.models import LoadedModel
from esa.perturb.protocols.bitscan import greedy_verdict
from esa.report.study_causal import bitscan_section
from esa.core.files import as_float
from esa.study import Study, require


@dataclass(frozen=True)
class BitscanSection(ProtocolSettings):
    targets: tuple[CausalTarget, ...]
    top_n: int = 4  # scanned weights: the first top_n target elements (ranking / super-weight order)
    bits: tuple[int | str, ...] = ("sign", "exponent_msb", "exponent_lsb", "mantissa_msb")
    max_flips: int = 8  # greedy collapse search: give up after this many flips
    greedy_pool: int = 64  # … choosing among this many of the most damaging single flips (64: all of 4 × 4)
    order: str = "listed"  # listed: measure every flip | predicted: predicted-first screening (esa.predict)
    screen_n: int = 10  # predicted: stop once no unmeasured flip can beat the measured screen_n-th worst
    calib_flips: int = 16  # predicted: random flips measured first, setting the prediction's error bound
    estimator: str = "grad_squared"  # predicted: diagonal curvature grad_squared | fisher | hutchinson
    datasets: tuple[str, ...] = ()
    context_lens: tuple[int, ...] = ()
    seeds: tuple[int, ...] = ()  # a subset of the study's seeds; empty → all of them


def check(b: BitscanSection, study: Study, where: str) -> None:
    """Semantic checks of a bitscan section."""
    sens, dtypes, seeds = study.section("sensitivity"), model_dtypes(study), study.seeds
    _check_targets(b.targets, sens, where, "top_n")
    for i, t in enumerate(b.targets):
        require(t.ranking is None or t.k is not None or b.top_n <= sens.k,
                 f"{where}.targets[{i}]: without k the target is the top top_n={b.top_n} weights, more than "
                 f"sensitivity.k ({sens.k if sens else None}) keeps; give k or lower top_n")
    from esa.predict.taylor import ESTIMATORS

    for name in ("top_n", "max_flips", "greedy_pool", "screen_n", "calib_flips"):
        require(getattr(b, name) >= 1, f"{where}.{name} must be ≥ 1, got {getattr(b, name)}")
    require(b.order in ("listed", "predicted"), f"{where}.order: {b.order!r} is not listed or predicted")
    require(b.estimator in ESTIMATORS, f"{where}.estimator: {b.estimator!r} is not one of {', '.join(ESTIMATORS)}")
    require(bool(b.bits), f"{where}.bits: give at least one bit, e.g. [sign, exponent_msb]")
    _check_bits(b.bits, dtypes, f"{where}.bits")
    _check_settings(b, where)
    _check_places(b, seeds, where)


@dataclass(frozen=True, kw_only=True)
class BitscanRun(CausalRun):
    """Protocol 3 for one target set: single bit flips of its first ``top_n`` weights, then greedy collapse."""

    kind: ClassVar[str] = "bitscan"
    top_n: int
    bits: tuple[str, ...]  # positions or names, as written in the study (as strings)
    max_flips: int
    greedy_pool: int
    order: str = "listed"
    screen_n: int = 10
    calib_flips: int = 16
    estimator: str = "grad_squared"

    def what(self) -> str:
        order = "" if self.order == "listed" else " predicted-first"
        return f"bitscan{order} {self.target} top-{self.top_n} bits={list(self.bits)}"



def expand(study: Study) -> list[BitscanRun]:
    """model × dataset × ctx × seed × target, model-major (after the sensitivity runs)."""
    b = study.section("bitscan")
    if b is None:
        return []
    bits = tuple(str(x) for x in b.bits)
    return [BitscanRun(**causal_fields(study, b, spec, t, (t.k or b.top_n) if t.ranking else None, dataset, ctx,
                                       seed, _ranking_run(study, spec, t, seed)),
                       top_n=b.top_n, bits=bits, max_flips=b.max_flips, greedy_pool=b.greedy_pool, order=b.order,
                       screen_n=b.screen_n, calib_flips=b.calib_flips, estimator=b.estimator)
            for spec, dataset, ctx, seed in _cells(study, b) for t in b.targets]


def bitscan_config(run, ranking_file: str | None = None):
    """The :class:`BitscanConfig` of a bit-scan run, given its ranking file (ranking targets)."""
    from esa.perturb.protocols import BitscanConfig

    return BitscanConfig(_targets(run, ranking_file), run.top_n, tuple(run.bits), run.max_flips, run.greedy_pool,
                         eval_config(run), run.order, run.screen_n, run.calib_flips, run.estimator)


def _bitscan_metrics(doc: dict) -> dict:
    comps = {c["label"]: {**{k: v for k, v in c.items() if k != "label"}, "name": c["label"]} for c in doc["cells"]}
    weights = [{k: w[k] for k in ("param", "row", "col", "flat", "value", "label") if k in w}
               for w in doc["weights"]]
    return {"weights": weights, "bits": doc["bits"], "comparisons": comps, "greedy": doc["greedy"],
            **_common(doc), **({"downstream": doc["downstream"]} if "downstream" in doc else {}),
            **({"screening": doc["screening"]} if "screening" in doc else {})}


def execute(lm: LoadedModel, run, ctx: RunContext) -> tuple[dict, dict[str, np.ndarray]]:
    """Protocol 3 (single bit flips of the top weights, then the greedy collapse search) for one target."""
    from esa.perturb.protocols import bitscan_experiment

    return execute_protocol(lm, run, ctx, bitscan_experiment, bitscan_config, _bitscan_metrics)



def cost(run: BitscanRun) -> tuple[int | None, float]:
    """(tokens, passes): the baseline, every single flip, and the greedy steps after the first (upper bound)."""
    singles = run.top_n * len(run.bits)
    pool = min(run.greedy_pool, singles)
    greedy = sum(pool - step for step in range(1, min(run.max_flips, pool)))
    return run.max_eval_tokens, 1.0 + singles + greedy


def summary(record) -> str:
    m = record.metrics
    worst = max(m["comparisons"].values(), key=severity)
    return f"worst single flip ΔNLL {as_float(worst['mean_delta_nll']):.4g} ({worst['name']}); " \
        + greedy_verdict(m["greedy"])


KIND = RunKind(
    name="bitscan", version=3, about="ΔNLL of single bit flips of the top target weights; fewest flips to collapse",
    section="bitscan", schema=BitscanSection, check=check, expand=expand, depends_on=("sensitivity",),
    execute=execute, cost=cost, summary=summary, report=ReportSection("Causal validation: bit scans", 2,
                                                                      bitscan_section))
