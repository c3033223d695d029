"""Protocol 3: the ΔNLL of single bit flips of the top target weights, and the fewest flips that collapse."""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from esa.core.errors import EsaError
from esa.models import LoadedModel
from esa.perturb.bits import flip_bit, layout, parse_bit
from esa.perturb.context import perturbed
from esa.perturb.ops import make_op
from esa.perturb.protocols.choose import Resolved, resolve_targets
from esa.perturb.protocols.downstream import downstream
from esa.perturb.protocols.common import (BitscanConfig, Bench, base_arrays, build_cache, compare, header,
                                          make_bench, trial, trials)
from esa.perturb.protocols.experiments import parse_value
from esa.perturb.targets import TargetSet
from esa.stats import perplexity

# ---- protocol 3: bit scan and greedy collapse search -------------------------------------------------------

@dataclass
class Flip:
    """One bit of one weight element."""

    weight: int  # row of the scanned weights
    param: str
    flat: int
    bit: int
    label: str
    nll: np.ndarray | None = None  # (W,) after this flip alone (None: not measured, predicted-first order)
    items: dict | None = None  # zero-shot outcomes after this flip alone (task → ItemOutcomes)
    predicted: float | None = None  # predicted ΔNLL per token (order="predicted")
    regime: str | None = None  # its regime (esa.predict.taylor)
    rank: float = 0.0  # position in the predicted order (larger: predicted worse)

    @property
    def targets(self) -> TargetSet:
        return TargetSet({self.param: torch.tensor([self.flat])})

    @property
    def op(self):
        return make_op("bit_flip", bit=self.bit)


def _severity(nll: np.ndarray) -> float:
    """Total NLL, NaN counted as +inf (a NaN loss is a collapse, the worst outcome)."""
    total = float(np.sum(nll))
    return math.inf if math.isnan(total) else total


def _collapsed(bench: Bench, nll: np.ndarray) -> tuple[float, bool]:
    ppl = perplexity(nll, bench.n_tokens)
    return ppl, bool(not np.isfinite(nll).all() or not ppl <= bench.data.collapse_ppl)


def greedy_collapse(bench: Bench, flips: list[Flip], max_flips: int, pool_size: int) -> dict:
    """Fewest flips that collapse the model, greedily: each step adds the flip that hurts most on top of
    those chosen (re-scored with them applied). Step 1 reuses the single-flip scan, so ``n_flips == 1`` is
    the exact minimum; larger counts are upper bounds. Only the ``pool_size`` most damaging single flips
    compete (cost: Σ_k (pool - k) trials).

    Every step must raise the damage (total NLL, NaN = +inf) above the previous step's; when the best
    remaining flip does not — e.g. the only candidates left are other bits of a weight already flipped, which
    can undo part of the damage — the search stops and says it stalled, instead of reporting a step backwards.
    """
    pool = sorted(flips, key=lambda f: -_severity(f.nll))[:pool_size]
    chosen: list[Flip] = []
    steps, n_evals, stalled = [], 0, None
    damage = _severity(bench.cache.baseline.nll)
    base_collapsed = _collapsed(bench, bench.cache.baseline.nll)[1]
    if base_collapsed:  # 0 flips needed: the threshold is below the baseline PPL
        bench.notes.append("the unperturbed model already exceeds collapse_ppl; raise --collapse-ppl")
        pool = []
    while pool and len(chosen) < max_flips:
        best, nll = _best_next(bench, chosen, pool)
        n_evals += len(pool) if chosen else 0
        if not _severity(nll) > damage:
            stalled = (f"stalled after {len(chosen)} flip(s): the most damaging remaining flip ({best.label}) "
                       f"leaves the total NLL at {_severity(nll):.6g}, not above {damage:.6g}")
            bench.notes.append(f"greedy collapse search {stalled}")
            break
        damage = _severity(nll)
        chosen.append(best)
        pool.remove(best)
        ppl, collapsed = _collapsed(bench, nll)
        steps.append({"flip": best.label, "weight": best.weight, "bit": best.bit, "ppl": ppl, "collapsed": collapsed})
        if collapsed:
            break
    done = base_collapsed or bool(steps and steps[-1]["collapsed"])
    return {"collapse_ppl": bench.data.collapse_ppl, "collapsed": done, "n_flips": len(chosen) if done else None,
            "exact_minimum": done and len(chosen) == 1, "flips": [s["flip"] for s in steps] if done else [],
            "steps": steps, "stalled": stalled, "pool_size": min(pool_size, len(flips)), "extra_trials": n_evals,
            "method": "greedy: add the most damaging flip given those already chosen; ranked by total NLL; "
                      "stops when no remaining flip raises the damage"}


def greedy_verdict(greedy: dict) -> str:
    """One phrase for a greedy search's outcome: collapse after n flips, or none within n — and why it stopped."""
    if greedy.get("collapsed"):
        return f"collapse after {greedy['n_flips']} flip(s)"
    verdict = f"no collapse within {len(greedy.get('steps', []))} flip(s)"
    return verdict + (" (search stalled: no remaining flip raised the damage)" if greedy.get("stalled") else "")


def _best_next(bench: Bench, chosen: list[Flip], pool: list[Flip]) -> tuple[Flip, np.ndarray]:
    """The pool's most damaging flip with ``chosen`` applied, and its (W,) NLLs (single flips: the scan's)."""
    with ExitStack() as stack:
        for f in chosen:
            stack.enter_context(perturbed(bench.model, f.targets, f.op))
        also = tuple(f.param for f in chosen)
        scored = [(f, f.nll if not chosen else trial(bench, f.targets, f.op, 0, also).nll) for f in pool]
    return max(scored, key=lambda s: _severity(s[1]))


def _weights(bench: Bench, res: Resolved, top_n: int) -> pd.DataFrame:
    if top_n < 1:
        raise EsaError(f"--top-n {top_n} must be ≥ 1")
    order = res.order.head(top_n).reset_index(drop=True)
    flat_params = [bench.model.get_parameter(p).detach().reshape(-1) for p in order["param"]]
    order["value"] = [float(t[int(i)]) for t, i in zip(flat_params, order["flat"])]
    order["label"] = [f"{p.removesuffix('.weight')}[{r},{c}]" if c >= 0 else f"{p}[{r}]"
                      for p, r, c in zip(order["param"], order["row"], order["col"])]
    return order


def _screen(bench: Bench, flips: list[Flip], cfg: BitscanConfig) -> dict:
    """Measure the flips predicted-first (esa.predict.verify) and return the screening record.

    Curvature on the run's calibration windows (disjoint from the evaluation windows) predicts every flip;
    ``calib_flips`` random ones are measured first and set the bound; the rest are measured in predicted order
    until no unmeasured flip can beat the measured ``screen_n``-th worst. Unmeasured flips keep ``nll`` None."""
    from esa.predict.taylor import curvature
    from esa.predict.verify import check_disjoint, error_floor, flip_rows, screen, screening_key
    from esa.sensitivity.calibration import batches_from_ids

    check_disjoint(bench)
    params = {p: bench.model.get_parameter(p) for p in dict.fromkeys(f.param for f in flips)}
    curv = curvature(bench.model, params, list(batches_from_ids(bench.calib, 4)), cfg.estimator,
                     seed=cfg.data.seed)
    picks = pd.DataFrame({"param": [f.param for f in flips], "flat": [f.flat for f in flips],
                          "bit": [f.bit for f in flips]})
    rows = flip_rows(bench.model, curv, picks, 1.0).assign(flip=range(len(flips)))
    for f, second, regime, rank in zip(flips, rows["second"], rows["regime"], screening_key(rows)):
        f.predicted, f.regime, f.rank = float(second), str(regime), float(rank)
    calib = set(np.random.default_rng(cfg.data.seed).permutation(len(flips))[: cfg.calib_flips].tolist())
    calib_rows = rows[rows["flip"].isin(calib)]
    calib_rows = calib_rows.assign(measured=[_per_token(bench, _measure(bench, flips[i])) for i in calib_rows["flip"]])
    floor = error_floor(calib_rows)
    out = screen(rows[~rows["flip"].isin(calib)],
                 lambda r: np.array([_per_token(bench, _measure(bench, flips[int(r["flip"].iloc[0])]))]),
                 cfg.screen_n, floor)
    return {"order": "predicted", "estimator": cfg.estimator, "n_candidates": len(flips),
            "n_measured": len(calib) + out["n_measured"], "calibration_flips": len(calib), "floor": floor,
            "bound_kind": out["bound_kind"], "stop": out["stop"], "screen_n": cfg.screen_n}


def _measure(bench: Bench, f: Flip) -> np.ndarray:
    """Score one flip alone — its (W,) NLLs and zero-shot outcomes, kept on the flip — unless it already was."""
    if f.nll is None:
        t = trial(bench, f.targets, f.op, 0, tasks=True)
        f.nll, f.items = t.nll, t.tasks
    return f.nll


def _per_token(bench: Bench, nll: np.ndarray) -> float:
    total = float(np.sum(nll) - np.sum(bench.cache.baseline.nll))
    return total / float(bench.n_tokens.sum()) if np.isfinite(total) else np.inf


CELL_STATS = ("mean_delta_nll", "ci_low", "ci_high", "ci_method", "n_windows", "few_windows", "delta_nll_per_token",
              "ppl_perturbed", "collapsed", "n_nonfinite_perturbed")


def _cell(bench: Bench, weights: pd.DataFrame, f: Flip) -> dict:
    """One (weight, bit) cell: the flip's paired statistics, or NaN and ``measured: False`` when the
    predicted-first screening never needed it (its prediction is kept either way)."""
    value = torch.tensor([weights.loc[f.weight, "value"]], dtype=bench.model.get_parameter(f.param).dtype)
    cell = {"weight": f.weight, "bit": f.bit, "label": f.label, "value_after": float(flip_bit(value, f.bit)),
            "measured": f.nll is not None}
    if f.predicted is not None:
        cell |= {"predicted_delta_nll_per_token": f.predicted, "regime": f.regime}
    if f.nll is None:
        return cell | {k: (False if k in ("collapsed", "few_windows") else None if k == "ci_method" else math.nan)
                       for k in CELL_STATS}
    c = compare(bench, f.label, f.nll, bench.cache.baseline.nll)
    return cell | {k: c[k] for k in CELL_STATS}


def bitscan_experiment(lm: LoadedModel, cfg: BitscanConfig) -> tuple[dict, dict[str, np.ndarray]]:
    """ΔNLL of every single (weight, bit) flip — or, ``order="predicted"``, of those the predicted-first
    screening measures — then the greedy collapse search over them."""
    start = time.perf_counter()
    if not cfg.bits or cfg.max_flips < 1 or cfg.greedy_pool < 1:
        raise EsaError("bitscan needs --bits, and --max-flips and --greedy-pool ≥ 1")
    if cfg.order not in ("listed", "predicted"):
        raise EsaError(f"--order {cfg.order!r}: use listed (measure every flip) or predicted (screening)")
    bench = make_bench(lm, cfg.data)
    res = resolve_targets(bench, cfg.targets)
    weights = _weights(bench, res, cfg.top_n)
    flips = []
    for i, w in weights.iterrows():
        dtype = bench.model.get_parameter(w["param"]).dtype
        positions = [parse_bit(dtype, parse_value(b)) for b in cfg.bits]
        if len(set(positions)) < len(positions):
            raise EsaError(f"--bits {' '.join(cfg.bits)} name the same {dtype} bit twice ({positions}); drop one")
        for pos in positions:
            flips.append(Flip(i, w["param"], int(w["flat"]), pos, f"{w['label']} bit {layout(dtype).name_of(pos)}"))
    build_cache(bench, [f.targets for f in flips])
    screening = _screen(bench, flips, cfg) if cfg.order == "predicted" else None
    candidates = flips  # of the greedy search; predicted order: the flips predicted worst, measured alone first
    if screening is not None:
        candidates = sorted(flips, key=lambda f: -f.rank)[: cfg.greedy_pool]
        screening["greedy_extra_single_trials"] = sum(f.nll is None for f in candidates)
    todo = [f for f in candidates if f.nll is None]
    for f, t in zip(todo, trials(bench, [(f.targets, f.op, 0) for f in todo], "flips")):
        f.nll, f.items = t.nll, t.tasks
    cells = [_cell(bench, weights, f) for f in flips]
    grid = np.array([c["mean_delta_nll"] for c in cells], dtype=float).reshape(len(weights), len(cfg.bits))
    items = [(f.label, [f.items] if f.items is not None else []) for f in flips if f.nll is not None]
    down, task_arrays = downstream(bench, items)  # single flips only, not the greedy steps
    greedy = greedy_collapse(bench, candidates, cfg.max_flips, cfg.greedy_pool)
    doc = {**header(bench, "esa.bitscan/1", cfg),
           "targets": {"spec": cfg.targets, "kind": res.kind, **res.extra},
           "weights": weights.to_dict("records"),
           "bits": [{"spec": b, "position": f.bit} for b, f in zip(cfg.bits, flips)],
           "cells": cells, "greedy": greedy, **({"downstream": down} if down else {}),
           **({"screening": screening} if screening else {}), "notes": bench.notes,
           "wall_seconds": time.perf_counter() - start}
    return doc, {**base_arrays(bench), **task_arrays, "grid_mean_delta_nll": grid,
                 "flip_nll": np.stack([f.nll if f.nll is not None else np.full(len(bench.windows), np.nan)
                                       for f in flips])}


