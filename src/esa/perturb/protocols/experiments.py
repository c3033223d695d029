"""Protocol 1 (a target set vs size-matched controls) and protocol 2 (dose-response)."""

from __future__ import annotations

import time

import numpy as np

from esa.core.errors import EsaError
from esa.models import LoadedModel
from esa.perturb.bits import parse_bit
from esa.perturb.ops import OPS, make_op, parse_op
from esa.perturb.protocols.choose import bottom_k, largest_k, check_controls, resolve_controls, resolve_targets
from esa.perturb.protocols.downstream import downstream
from esa.perturb.protocols.common import (DOSE_PARAM, MAX_LISTED, Arm, DoseConfig, PerturbConfig, adjust,
                                          base_arrays, build_cache, compare, header, make_bench, ratio, repeats,
                                          seed_spread, split_arrays)
from esa.perturb.targets import random_k

# ---- protocol 1: target set vs controls --------------------------------------------------------------------

def perturb_experiment(lm: LoadedModel, cfg: PerturbConfig) -> tuple[dict, dict[str, np.ndarray]]:
    """Run ``cfg`` on a loaded model; returns the perturb.json document and the per-window arrays."""
    start = time.perf_counter()
    op = parse_op(cfg.op)
    check_controls(cfg)
    controls = resolve_controls(cfg)
    bench = make_bench(lm, cfg.data)
    res = resolve_targets(bench, cfg.targets)
    arms = [Arm("target", repeats(res.targets, op, cfg.control_seeds, cfg.data.seed), op, f"--targets {cfg.targets}")]
    if "random_k" in controls:
        arms.append(Arm("random_k", [(s, random_k(bench.model, res.targets, s)) for s in cfg.control_seeds], op,
                        "size-matched random elements of the same tensors, none of the targets; one draw per seed"))
    if "bottom_k" in controls:
        ts, how = bottom_k(bench, res, cfg.ranking)
        arms.append(Arm("bottom_k", repeats(ts, op, cfg.control_seeds, cfg.data.seed), op, how))
        bench.notes.append(f"bottom_k: {how}")
    if "largest_k" in controls:
        ts, how = largest_k(bench, res)
        arms.append(Arm("largest_k", repeats(ts, op, cfg.control_seeds, cfg.data.seed), op, how))
    build_cache(bench, [ts for arm in arms for _, ts in arm.sets])
    by = {arm.name: arm.run(bench) for arm in arms}
    for arm in arms:
        if any(r["n_changed"] == 0 for r in arm.records):
            bench.notes.append(f"{arm.name}: the op changed none of its elements in some trial, so its ΔNLL is "
                               "exactly 0 there by construction")
    base = bench.cache.baseline.nll
    comps = [compare(bench, f"{a} vs baseline", by[a].nll, base) for a in by]
    for pert, ref in (("target", "random_k"), ("random_k", "bottom_k"), ("target", "largest_k")):
        if {pert, ref} <= set(by):  # e.g. --controls bottom_k alone has no random_k arm
            comps.append(compare(bench, f"{pert} vs {ref}", by[pert].nll, by[ref].nll, against=ref))
    comps, deltas = split_arrays(adjust(comps))
    down, task_arrays = downstream(bench, [(a, by[a].task_outcomes) for a in by])
    mean = {c["name"].split(" vs ")[0]: c["mean_delta_nll"] for c in comps if c["against"] == "baseline"}
    ratios = {"target_over_random": ratio(mean["target"], mean["random_k"]) if "random_k" in mean else None,
              "random_over_bottom": (ratio(mean["random_k"], mean["bottom_k"])
                                     if {"random_k", "bottom_k"} <= set(mean) else None)}
    doc = {**header(bench, "esa.perturb/1", cfg),
           "targets": {"spec": cfg.targets, "kind": res.kind, **res.extra},
           "arms": [{**a.describe(bench.model), "seed_spread": seed_spread(bench, a)} for a in by.values()],
           "comparisons": comps, "separation": ratios, **({"downstream": down} if down else {}),
           "notes": bench.notes, "wall_seconds": time.perf_counter() - start}
    arrays = {**base_arrays(bench), **deltas, **task_arrays, **{f"{a}_nll": by[a].nll for a in by},
              **{f"{a}_nll_per_seed": by[a].per_seed for a in by}}
    return doc, arrays


# ---- protocol 2: dose-response -----------------------------------------------------------------------------

def parse_value(text) -> int | float | str:
    """CLI value → int, float or string (bit names such as ``exponent_msb``); numbers pass through unchanged.

    ``int`` is tried first only on strings: ``int(0.5)`` would silently truncate a float value to 0.
    """
    if isinstance(text, (int, float)):
        return text
    for conv in (int, float):
        try:
            return conv(text)
        except (TypeError, ValueError):
            pass
    return str(text)


def dose_ops(spec: str, values) -> tuple[str, list]:
    """(swept parameter, one op per value) for ``--op name[:fixed=…]`` and ``--values``."""
    name = spec.strip().partition(":")[0]
    OPS.get(name)  # unknown op → EsaError with suggestions
    if name not in DOSE_PARAM:
        raise EsaError(f"op {name!r} has no dose parameter to sweep; use one of {', '.join(DOSE_PARAM)}")
    if not values:
        raise EsaError("dose-response needs --values, e.g. --values 0 0.5 1 2")
    param = DOSE_PARAM[name]
    probe = f"{spec.strip()}{',' if ':' in spec else ':'}{param}={values[0]}"  # parse the fixed parameters
    fixed = {k: v for k, v in parse_op(probe).params().items() if k != param}
    return param, [make_op(name, **fixed, **{param: parse_value(v)}) for v in values]


def dose_experiment(lm: LoadedModel, cfg: DoseConfig) -> tuple[dict, dict[str, np.ndarray]]:
    """Per value: target and random_k arms vs baseline (mean ΔNLL with bootstrap-t CI)."""
    start = time.perf_counter()
    param, ops = dose_ops(cfg.op, cfg.values)
    bench = make_bench(lm, cfg.data)
    res = resolve_targets(bench, cfg.targets)
    if param == "bit":
        for v in cfg.values:
            for name in res.targets:
                parse_bit(bench.model.get_parameter(name).dtype, parse_value(v))
    controls = [(s, random_k(bench.model, res.targets, s)) for s in cfg.control_seeds]
    build_cache(bench, [res.targets] + [ts for _, ts in controls])
    rows, comps, arrays, named = [], [], base_arrays(bench), []
    for i, op in enumerate(ops):
        arms = [Arm("target", repeats(res.targets, op, cfg.control_seeds, cfg.data.seed), op).run(bench)]
        if controls:
            arms.append(Arm("random_k", controls, op).run(bench))
        row = {"value": getattr(op, param), "op": op.describe()}
        for arm in arms:
            comps.append(compare(bench, f"{arm.name} @ {param}={row['value']}", arm.nll, bench.cache.baseline.nll))
            named.append((comps[-1]["name"], arm.task_outcomes))
            row[arm.name] = comps[-1]
            row[f"{arm.name}_seeds"] = seed_spread(bench, arm)
            row[f"{arm.name}_trials"] = arm.records
            arrays[f"{arm.name}_nll__{i}"] = arm.per_seed
        rows.append(row)
    comps, deltas = split_arrays(adjust(comps))
    down, task_arrays = downstream(bench, named)
    doc = {**header(bench, "esa.dose_response/1", cfg), "parameter": param,
           "targets": {"spec": cfg.targets, "kind": res.kind, "n_elements": res.targets.n_elements,
                       "elements": res.order.head(MAX_LISTED).to_dict("records"), **res.extra},
           "rows": rows, **({"downstream": down} if down else {}), "notes": bench.notes,
           "wall_seconds": time.perf_counter() - start}
    return doc, {**arrays, **deltas, **task_arrays}


