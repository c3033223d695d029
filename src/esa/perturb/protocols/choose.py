"""Target specs → :class:`~esa.perturb.targets.TargetSet`, and the controls they are compared with."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import torch

from esa.core.errors import EsaError
from esa.perturb.protocols.common import CONTROLS, Bench, PerturbConfig
from esa.perturb.targets import (TargetSet, from_coordinates, from_ranking, lowest_of, param_table,
                                 parse_targets, resolve_param)
from esa.core.registry import suggest

log = logging.getLogger(__name__)

# ---- targets and controls ----------------------------------------------------------------------------------

@dataclass
class Resolved:
    """A resolved target spec."""

    targets: TargetSet
    kind: str  # superweights | topk | glob | file | coordinates
    order: pd.DataFrame  # param, row, col, flat in the spec's order (super-weight or ranking order)
    ranking: pd.DataFrame | None = None  # the table named by a topk: spec
    extra: dict = field(default_factory=dict)  # written to the JSON: super-weight candidates, ranking and k


def _ordered(model, ts: TargetSet, picked: pd.DataFrame) -> pd.DataFrame:
    """``ts.to_frame`` rows in the order of ``picked`` (param, row, col); col NA/-1 for 1-D tensors."""
    frame = ts.to_frame(model)
    keys = picked[["param", "row", "col"]].copy()
    keys["row"] = keys["row"].astype(np.int64)
    keys["col"] = pd.to_numeric(keys["col"]).fillna(-1).astype(np.int64)
    merged = keys.merge(frame, on=["param", "row", "col"], how="left")
    return frame if merged["flat"].isna().any() else merged.astype({"flat": np.int64})


def _superweights(bench: Bench) -> Resolved:
    from esa.sensitivity.superweights import find_super_weights

    report = find_super_weights(bench.model, bench.calib)
    if not report.candidates:
        raise EsaError(f"no super-weight candidates in {bench.lm.fingerprint.model_id} on {len(bench.calib)} "
                       "calibration windows; inspect with `esa superweights --spike-ratio …` or give explicit "
                       "targets, e.g. --targets 'model.layers.2.mlp.down_proj.weight[3,7]'")
    coords = pd.DataFrame([(w.param_name, w.row, w.col) for w in report.candidates], columns=["param", "row", "col"])
    ts = from_coordinates(bench.model, coords.to_dict("records"))
    return Resolved(ts, "superweights", _ordered(bench.model, ts, coords),
                    extra={"superweights": [asdict(w) for w in report.candidates]})


def _identity(model: dict) -> str:
    return (f"{model.get('model_id', '?')} (revision {model.get('revision')}, {model.get('n_params')} params, "
            f"model_type {model.get('model_type')})")


def load_ranking(bench: Bench, path: str, floor: bool = False) -> pd.DataFrame:
    """Read a ranking file (``floor=True``: the floor table beside it) and check it fits the loaded model.

    The ranking's stored fingerprint (:func:`esa.sensitivity.ranking.write_ranking`) must agree with the loaded
    model's on revision, parameter count and model_type (dtype and device may differ: the same weights loaded
    in bf16 keep their ranking). A ranking without a fingerprint (written before they were stored, or by hand)
    is used with a logged warning and a note in the run's JSON.
    """
    from esa.sensitivity.ranking import MATCH_KEYS, read_floor, read_ranking

    table = read_ranking(path)  # the floor is written with the ranking and carries the same fingerprint
    stored, loaded = table.attrs.get("model"), bench.lm.fingerprint.to_dict()
    if stored is None:
        msg = (f"ranking {path} carries no model fingerprint, so it cannot be checked against "
               f"{loaded['model_id']}; rewrite it with `esa sensitivity` to make it checkable")
        log.warning(msg)
        bench.notes.append(msg)
    elif any(stored.get(k) != loaded.get(k) for k in MATCH_KEYS):
        raise EsaError(f"ranking {path} was computed on {_identity(stored)}, not on the loaded model "
                       f"{_identity(loaded)}; rerun `esa sensitivity --model {loaded['model_id']}` or load the "
                       "model the ranking was made for")
    return read_floor(path) if floor else table


def resolve_targets(bench: Bench, spec: str) -> Resolved:
    """``superweights`` | ``topk:<ranking file>:<k>`` | anything :func:`~esa.perturb.targets.parse_targets` takes.

    ``superweights`` runs :func:`~esa.sensitivity.superweights.find_super_weights` on the calibration windows
    and targets every candidate. ``topk:runs/sens/ranking.parquet:100`` takes the 100 highest-scoring rows.
    """
    spec = spec.strip()
    if spec == "superweights":
        return _superweights(bench)
    if spec.startswith("topk:"):
        path, _, k = spec[len("topk:"):].rpartition(":")
        if not path or not k.strip().isdigit():
            raise EsaError(f"cannot read target {spec!r}: write topk:<ranking file>:<k>, e.g. "
                           "topk:runs/sensitivity/ranking.parquet:100")
        table = load_ranking(bench, path)
        ts = from_ranking(bench.model, table, int(k))
        picked = table.sort_values("score", ascending=False, kind="stable", na_position="last").head(int(k))
        return Resolved(ts, "topk", _ordered(bench.model, ts, picked), table, {"ranking": path, "k": int(k)})
    if re.fullmatch(r"[A-Za-z_]\w*", spec):  # a bare word: a misspelt keyword, not a coordinate
        raise EsaError(suggest(spec, ["superweights", "topk:<ranking>:<k>", "rows:<glob>:<i>", "cols:<glob>:<j>",
                                      "tensor:<glob>", "<param>[row,col]", "<file>.json", "<file>.csv"],
                               "target spec"))
    kind = ("glob" if spec.split(":", 1)[0] in ("rows", "cols", "tensor")
            else "file" if spec.lower().endswith((".json", ".csv")) else "coordinates")
    ts = parse_targets(bench.model, spec)
    return Resolved(ts, kind, ts.to_frame(bench.model))


def _magnitude_matched(model, like: TargetSet, largest: bool) -> TargetSet:
    """Per tensor, as many of the smallest non-zero (or the largest) |W| as ``like`` has there, none of
    ``like``'s own.

    Smallest: exact zeros are skipped (while enough others remain): zeroing or scaling them would change
    nothing, making the control a no-op rather than "the least important weights".
    """
    table, entries = param_table(model), []
    for name, idx in like.items():
        mag = resolve_param(table, name)[1].detach().reshape(-1).abs().float().clone()  # (numel,)
        if largest:
            mag[idx.to(mag.device)] = -math.inf  # never one of the targets themselves
        else:
            mag[mag == 0] = math.inf
            mag[idx.to(mag.device)] = math.nan  # topk(largest=False) ranks NaN last, after the zeros
        entries.append((name, torch.topk(mag, len(idx), largest=largest).indices.cpu()))
    return TargetSet(entries)


def largest_k(bench: Bench, res: Resolved) -> tuple[TargetSet, str]:
    """The largest_k control: per target tensor, as many of its largest-|W| weights as it holds targets, none
    of the targets — for super weights, "as many of the largest non-super weights" (the super-weight paper's
    comparison at matched count)."""
    return (_magnitude_matched(bench.model, res.targets, largest=True),
            "per target tensor, as many of its largest-|W| weights as it holds targets, none of them a target")


def bottom_k(bench: Bench, res: Resolved, ranking: str | None) -> tuple[TargetSet, str]:
    """The bottom_k control and how it was chosen: per target tensor, as many of its lowest-scoring non-zero
    weights as it holds targets, under the scorer of ``ranking`` (or of the topk: spec's file), read from that
    ranking's floor table; without any ranking (super weights) the same under magnitude, |W|.

    Never the tail of a top table: those are among the *most* sensitive weights (rows 81–100 of a top-100).
    """
    path = ranking or res.extra.get("ranking")
    if path is None:  # check_controls allows this only for super weights
        return (_magnitude_matched(bench.model, res.targets, largest=False),
                "per target tensor, as many of its smallest non-zero |W| as it holds targets (magnitude bottom-k)")
    ts = lowest_of(bench.model, load_ranking(bench, path, floor=True), res.targets)
    return ts, (f"per target tensor, as many of its lowest-scoring non-zero weights as it holds targets, under "
                f"the scorer of the ranking {path} (its floor table)")


def parse_controls(controls) -> tuple[str, ...]:
    """``"random_k,bottom_k"`` or a sequence → validated names (``""``/``"none"``: no controls)."""
    items = controls.split(",") if isinstance(controls, str) else list(controls)
    names = tuple(c.strip() for c in items if c.strip() and c.strip() != "none")
    for name in names:
        if name not in CONTROLS:
            raise EsaError(suggest(name, list(CONTROLS), "control"))
    return names


def ranking_known(cfg: PerturbConfig) -> bool:
    """Whether a bottom_k control can be defined: a --ranking, a topk: target, or super weights (magnitude)."""
    spec = cfg.targets.strip()
    return bool(cfg.ranking) or spec == "superweights" or spec.startswith("topk:")


def resolve_controls(cfg: PerturbConfig) -> tuple[str, ...]:
    """The controls of ``cfg``; ``None`` (the default) means random_k, plus bottom_k when a ranking is known."""
    if cfg.controls is None:
        return ("random_k", "bottom_k") if ranking_known(cfg) else ("random_k",)
    return parse_controls(cfg.controls)


def check_controls(cfg: PerturbConfig) -> None:
    controls = resolve_controls(cfg)
    if "bottom_k" in controls and not ranking_known(cfg):
        raise EsaError("control bottom_k needs a ranking: pass --ranking ranking.parquet (from `esa sensitivity`),"
                       " use --targets topk:<ranking>:<k>, or drop it with --controls random_k")
    if "random_k" in controls and not cfg.control_seeds:
        raise EsaError("control random_k needs at least one --control-seeds value")
