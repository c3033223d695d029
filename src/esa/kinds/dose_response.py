"""Run kind ``dose_response``: protocol 2 of :mod:`esa.perturb.protocols` — for every value of an op's strength,
the target arm and the ``random_k`` arm (control seeds ``0 … trials-1``) against the unperturbed model on the
same windows.

Study section ``dose_response:`` (:class:`DoseResponseSection`). Runs — one per model × eval dataset × context ×
seed × target × k × op. Two dose axes:

* **strength** — the op's values (``scale`` factors, noise sigmas, bit positions) within one run;
* **size** — a ranking target without its own ``k`` expands into one run per value of ``ks``, so the report
  can draw ΔNLL vs k. Example: ``{name: top, ranking: wanda}`` with ``ks: [1, 10, 100]`` and two ops → 6 runs
  per model × dataset × context × seed.

Example section::

    dose_response:
      targets:
        - {name: top_gxw, ranking: grad_x_weight}   # no k: one run per value of ks
        - {name: super, spec: superweights}
      ks: [1, 10, 100]
      ops:
        - {op: scale, values: [0.0, 0.5, 2.0, 10.0]}
        - {op: gauss_noise, values: [0.01, 0.1, 1.0], params: {relative_to: tensor_std}}
      controls: [random_k]
      trials: 3

Ops without a strength parameter (``zero``, ``sign_flip``) have no dose to sweep: write ``{op: scale, values:
[0.0]}`` to zero the targets at each k, ``[-1.0]`` to flip their signs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from esa.core.errors import EsaError
from esa.kinds.base import ReportSection, RunContext, RunKind
from esa.kinds.causal import (CausalRun, CausalTarget, ProtocolSettings, _cells, _check_bits, _check_places,
                              _check_settings, _check_targets, _common, _ranking_run, _targets, causal_fields,
                              eval_config, execute_protocol, model_dtypes, severity)
from esa.kinds.perturbation import op_spec
from esa.models import LoadedModel
from esa.perturb.protocols import DOSE_PARAM
from esa.core.registry import suggest
from esa.report.study_causal import dose_section
from esa.core.files import as_float
from esa.study import Study, require


@dataclass(frozen=True)
class DoseOp:
    """An op with a strength parameter, and the values it is swept over (one run covers every value)."""

    op: str  # scale (factor) | gauss_noise (sigma) | uniform_noise (width) | bit_flip (bit) | set (value) | …
    values: tuple[Any, ...]  # the swept parameter, in plotting order; bit_flip: positions or names
    params: dict[str, Any] = field(default_factory=dict)  # fixed parameters, e.g. {relative_to: tensor_std}


@dataclass(frozen=True)
class DoseResponseSection(ProtocolSettings):
    targets: tuple[CausalTarget, ...]
    ops: tuple[DoseOp, ...]
    ks: tuple[int, ...] = ()  # top-k sizes of ranking targets without their own k
    controls: tuple[str, ...] = ("random_k",)  # random_k, or [] for the target arm alone
    trials: int = 1  # control seeds 0…trials-1: random_k draws, and noise seeds of a random op
    control_seeds: tuple[int, ...] = ()  # explicit control seeds instead of 0…trials-1
    datasets: tuple[str, ...] = ()  # evaluation corpora; empty → the study's datasets
    context_lens: tuple[int, ...] = ()  # evaluation window lengths; empty → the study's context_lens
    seeds: tuple[int, ...] = ()  # a subset of the study's seeds; empty → all of them


def op_string(entry: DoseOp) -> str:
    """``name[:fixed=…]``: the DoseConfig.op of a dose op (the swept parameter is added per value)."""
    return op_spec(entry.op, entry.params)


def check(d: DoseResponseSection, study: Study, where: str) -> None:
    """Semantic checks of a dose_response section (types were checked while parsing)."""
    from esa.perturb.ops import OPS
    from esa.perturb.protocols import dose_ops

    sens, dtypes, seeds = study.section("sensitivity"), model_dtypes(study), study.seeds
    _check_targets(d.targets, sens, where, "ks" if d.ks else "")
    top = sens.k if sens else None
    require(len(set(d.ks)) == len(d.ks) and all(1 <= k and (top is None or k <= top) for k in d.ks),
             f"{where}.ks: distinct sizes with 1 ≤ k ≤ sensitivity.k ({top}), got {list(d.ks)}")
    require(bool(d.ops), f"{where}.ops: give at least one op, e.g. {{op: scale, values: [0.0, 0.5, 2.0]}}")
    for i, entry in enumerate(d.ops):
        at = f"{where}.ops[{i}]"
        if entry.op not in OPS:
            raise EsaError(f"{at}.op: " + suggest(entry.op, OPS.names(), "perturbation op"))
        require(entry.op in DOSE_PARAM, f"{at}.op: {entry.op!r} has no strength to sweep; use one of "
                 f"{', '.join(f'{k} ({v})' for k, v in DOSE_PARAM.items())} — e.g. scale with values [0.0] zeroes")
        require(bool(entry.values) and len(set(map(str, entry.values))) == len(entry.values),
                 f"{at}.values: give distinct values of {DOSE_PARAM[entry.op]}, got {list(entry.values)}")
        require(DOSE_PARAM[entry.op] not in entry.params,
                 f"{at}.params: {DOSE_PARAM[entry.op]!r} is the swept parameter; list it under values only")
        try:
            dose_ops(op_string(entry), list(entry.values))
        except (EsaError, TypeError, ValueError) as exc:
            raise EsaError(f"{at} {entry.op} {entry.params or ''}: {exc}") from exc
        if entry.op == "bit_flip":
            _check_bits(entry.values, dtypes, f"{at}.values")
    for i, c in enumerate(d.controls):
        require(c == "random_k", f"{where}.controls[{i}]: " + suggest(c, ["random_k"], "dose-response control"))
    require(d.trials >= 1, f"{where}.trials must be ≥ 1")
    require(len(set(d.control_seeds)) == len(d.control_seeds), f"{where}.control_seeds: distinct seeds, got "
             f"{list(d.control_seeds)}")
    _check_settings(d, where)
    _check_places(d, seeds, where)


@dataclass(frozen=True, kw_only=True)
class DoseResponseRun(CausalRun):
    """Protocol 2 for one target set and one op swept over its values, on one model's fixed windows."""

    kind: ClassVar[str] = "dose_response"
    op: str  # op name with its fixed parameters, e.g. "gauss_noise:relative_to=tensor_std"
    parameter: str  # the swept parameter (esa.perturb.protocols.DOSE_PARAM), e.g. "factor"
    values: tuple  # its values, in the study's order
    control_seeds: tuple[int, ...]  # random_k draws (empty: no control arm)

    def what(self) -> str:
        size = f" k={self.k}" if self.k is not None else ""
        return f"dose {self.target}{size} {self.op} {self.parameter}={list(self.values)}"



def expand(study: Study) -> list[DoseResponseRun]:
    """model × dataset × ctx × seed × target × k × op, model-major (after the sensitivity runs)."""
    d = study.section("dose_response")
    if d is None:
        return []
    seeds = (d.control_seeds or tuple(range(d.trials))) if "random_k" in d.controls else ()
    runs = []
    for spec, dataset, ctx, seed in _cells(study, d):
        for t in d.targets:
            ks = [None] if t.ranking is None else ([t.k] if t.k is not None else list(d.ks))
            for k in ks:
                cell = causal_fields(study, d, spec, t, k, dataset, ctx, seed, _ranking_run(study, spec, t, seed))
                runs += [DoseResponseRun(**cell, op=op_string(op), parameter=DOSE_PARAM[op.op],
                                         values=tuple(op.values), control_seeds=seeds)
                         for op in d.ops]
    return runs


def dose_config(run, ranking_file: str | None = None):
    """The :class:`DoseConfig` of a dose-response run, given its ranking file (ranking targets)."""
    from esa.perturb.protocols import DoseConfig

    return DoseConfig(_targets(run, ranking_file), run.op, tuple(run.values), run.control_seeds,
                      eval_config(run))


def _dose_metrics(doc: dict) -> dict:
    comps, rows = {}, []
    for r in doc["rows"]:  # r[arm]: that arm's comparison, Holm/BH-adjusted across the whole run
        row = {"value": r["value"], "op": r["op"]}
        for arm in ("target", "random_k"):
            if arm in r:
                comps[r[arm]["name"]] = r[arm]
                row[arm] = r[arm]["name"]
                row[f"{arm}_seeds"] = r[f"{arm}_seeds"]
                row[f"{arm}_n_changed"] = [t["n_changed"] for t in r[f"{arm}_trials"]]
        rows.append(row)
    return {"parameter": doc["parameter"], "op": doc["config"]["op"], "rows": rows, "comparisons": comps,
            "n_elements": doc["targets"]["n_elements"], **_common(doc),
            **({"downstream": doc["downstream"]} if "downstream" in doc else {})}


def execute(lm: LoadedModel, run, ctx: RunContext) -> tuple[dict, dict[str, np.ndarray]]:
    """Protocol 2 (target and random_k arms at each op strength) for one target, k and op."""
    from esa.perturb.protocols import dose_experiment

    return execute_protocol(lm, run, ctx, dose_experiment, dose_config, _dose_metrics)



def cost(run: DoseResponseRun) -> tuple[int | None, float]:
    """(tokens, forward-equivalent passes) for `esa plan` (an upper bound: the prefix cache re-runs only the
    layers from the first perturbed one)."""
    from esa.perturb.protocols import STOCHASTIC_OPS

    target = len(run.control_seeds) if run.op.partition(":")[0] in STOCHASTIC_OPS and run.control_seeds else 1
    return run.max_eval_tokens, 1.0 + len(run.values) * (target + len(run.control_seeds))


def summary(record) -> str:
    m = record.metrics
    worst = max(m["rows"], key=lambda r: severity(m["comparisons"][r["target"]]))
    c = m["comparisons"][worst["target"]]
    ctrl = m["comparisons"].get(worst.get("random_k") or "", {})
    return (f"largest target ΔNLL {as_float(c['mean_delta_nll']):.4g} at {m['parameter']}={worst['value']} "
            f"(ppl {as_float(m['baseline_perplexity']):.4g} → {as_float(c['ppl_perturbed']):.4g})"
            + (f", random_k {as_float(ctrl['mean_delta_nll']):.4g}" if ctrl else ""))


KIND = RunKind(
    name="dose_response", version=2, about="ΔNLL of a target set and a random control as an op's strength grows",
    section="dose_response", schema=DoseResponseSection, check=check, expand=expand, depends_on=("sensitivity",),
    execute=execute, cost=cost, summary=summary,
    report=ReportSection("Causal validation: dose-response", 2, dose_section))
