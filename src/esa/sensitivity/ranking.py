"""Score → top-k → ranking table, for one calibration set; and reading/writing ranking files.

A ranking table has one row per selected weight and the columns

=========  ==============================================================================================
``param``  the ``named_parameters()`` name
``layer``  decoder-layer index (null for embeddings and other non-layer parameters)
``role``   module role from :func:`esa.models.architectures.module_role` (``mlp_down``, ``attn_q`` …)
``row``    output index in the (out, in) convention — GPT-2 ``Conv1D`` weights, stored (in, out), are
           transposed here, so ``row``/``col`` always mean W[out, in] as in ``nn.Linear``
``col``    input index (null for 1-D parameters such as biases and norms, whose index is ``row``)
``score``  the scorer's value (fp32 computed, stored float64)
``weight`` the weight's value at scoring time
``rank``   1-based; over the model in ``global`` mode, within the tensor in ``per_layer`` mode
=========  ==============================================================================================

Example: GPT-2 ``transformer.h.0.mlp.c_proj.weight`` has storage shape (in=256, out=64); its storage entry
[i=10, o=3] is reported as row=3, col=10.

A ranking file carries the fingerprint of the model it was computed on (parquet key-value metadata
``esa.model``; for the CSV the sidecar ``<stem>.meta.json``), so the perturbation protocols can refuse a ranking
of another model (:mod:`esa.perturb.protocols.choose`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from esa.core import progress
from esa.models.architectures import layer_index, module_role
from esa.core.errors import EsaError
from esa.sensitivity.calibration import Batch
from esa.sensitivity.scorers import ScoreOptions, is_conv1d, linear_consumers, score_parameters
from esa.sensitivity.stability import TailStats
from esa.sensitivity.topk import Candidates, MatchedFloor, TopK, check_k

COLUMNS = ["param", "layer", "role", "row", "col", "score", "weight", "rank"]


def stored_transposed(model: nn.Module, params: dict[str, nn.Parameter]) -> set[str]:
    """Names of the selected weights stored (in, out), i.e. consumed by a GPT-2 ``Conv1D``."""
    consumers = linear_consumers(model)
    return {n for n, p in params.items() if id(p) in consumers and is_conv1d(consumers[id(p)][1])}


def out_in_coords(flat: np.ndarray, shape: tuple[int, ...], transposed: bool) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) in the (out, in) convention of flat storage indices; col = -1 for 1-D parameters."""
    if len(shape) < 2:
        return flat, np.full_like(flat, -1)
    inner = int(np.prod(shape[1:]))
    r, c = flat // inner, flat % inner
    return (c, r) if transposed else (r, c)


def ranking_table(model: nn.Module, params: dict[str, nn.Parameter], cand: Candidates) -> pd.DataFrame:
    """Turn candidates into the ranking table (see module docstring), keeping the candidates' order."""
    names = list(params)
    transposed = stored_transposed(model, params)
    rows, cols = np.zeros(len(cand), np.int64), np.zeros(len(cand), np.int64)
    for pid in np.unique(cand.param):
        sel = cand.param == pid
        name = names[pid]
        rows[sel], cols[sel] = out_in_coords(cand.flat[sel], tuple(params[name].shape), name in transposed)
    param_names = [names[i] for i in cand.param]
    table = pd.DataFrame({
        "param": param_names,
        "layer": pd.array([layer_index(n) for n in param_names], dtype="Int64"),
        "role": [module_role(model, n) for n in param_names],
        "row": rows,
        "col": pd.array(np.where(cols < 0, None, cols), dtype="Int64"),
        "score": cand.score, "weight": cand.weight, "rank": cand.rank,
    })
    return table[COLUMNS]


@dataclass
class RankingResult:
    table: pd.DataFrame
    floor: pd.DataFrame | None  # top rankings: per tensor of the table, its lowest-scoring non-zero weights
    tail: dict  # TailStats.result()
    sample: np.ndarray  # random sample of scores, for the histogram only
    score_seconds: float  # time inside the scorer (forward/backward passes and score tensors)
    topk_seconds: float  # time added by top-k selection
    stats_seconds: float  # time added by the heavy-tail statistics


def score_and_rank(model: nn.Module, params: dict[str, nn.Parameter], batches: tuple[Batch, ...], scorer: str,
                   k: int, mode: str = "global", largest: bool = True,
                   options: ScoreOptions | None = None, sample_size: int = 200_000,
                   tail_stats: bool = True) -> RankingResult:
    """Run one scorer and stream its per-parameter scores through top-k (and the tail statistics)."""
    options = options or ScoreOptions()
    check_k(k, mode, {n: p.numel() for n, p in params.items()})
    topk = TopK(k, mode, largest)
    floor = MatchedFloor(topk) if largest else None  # what a bottom_k control of these top weights draws from
    tail = TailStats(sum(p.numel() for p in params.values()), sample_size, options.seed)
    index = {n: i for i, n in enumerate(params)}
    timer = {"score": 0.0, "topk": 0.0, "stats": 0.0}
    stream = score_parameters(scorer, model, params, batches, options)
    with progress.bar(len(params), f"{scorer} scores") as advance:
        while True:
            t0 = time.perf_counter()
            item = next(stream, None)
            _sync(model)
            t1 = time.perf_counter()
            timer["score"] += t1 - t0
            if item is None:
                break
            name, score = item
            topk.add(index[name], score, params[name])
            _sync(model)
            t2 = time.perf_counter()
            timer["topk"] += t2 - t1
            if tail_stats:
                tail.add(score)
            t3 = time.perf_counter()
            timer["stats"] += t3 - t2
            if floor is not None:
                floor.add(index[name], score, params[name])  # masks the score in place: after the statistics
            del score, item  # at most one full-size score tensor alive at a time
            timer["topk"] += time.perf_counter() - t3
            advance()
    table = ranking_table(model, params, topk.result())
    floor_table = ranking_table(model, params, floor.result()) if floor is not None else None
    return RankingResult(table, floor_table, tail.result() if tail_stats else {}, tail.sample(), timer["score"],
                         timer["topk"], timer["stats"])


def _sync(model: nn.Module) -> None:
    device = model.get_input_embeddings().weight.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


MODEL_KEY = b"esa.model"  # parquet key-value metadata: the JSON fingerprint of the model that was scored
MATCH_KEYS = ("revision", "n_params", "model_type")  # what must agree for a ranking to fit a loaded model


def meta_path(path: str | Path) -> Path:
    """The sidecar of a ranking file: ``runs/s/ranking.csv`` → ``runs/s/ranking.meta.json``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.meta.json")


def floor_path(path: str | Path) -> Path:
    """The floor table of a ranking file: ``runs/s/ranking.csv`` → ``runs/s/ranking.floor.parquet``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.floor.parquet")


def _write_parquet(table: pd.DataFrame, path: Path, model: dict | None) -> None:
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    if model is not None:
        meta = {**(arrow.schema.metadata or {}), MODEL_KEY: json.dumps(model, sort_keys=True).encode()}
        arrow = arrow.replace_schema_metadata(meta)
    pq.write_table(arrow, path)


def write_ranking(table: pd.DataFrame, stem: Path, model: dict | None = None,
                  floor: pd.DataFrame | None = None) -> list[Path]:
    """Write ``<stem>.parquet`` and ``<stem>.csv`` (+ ``<stem>.meta.json`` when ``model`` is given).

    ``model`` is the scored model's ``Fingerprint.to_dict()``. It goes into the parquet key-value metadata
    (key ``esa.model``) and, since CSV has no metadata, into the sidecar ``<stem>.meta.json`` as
    ``{"model": {...}}``; :func:`read_ranking` reads it back so a ranking is never applied to another model.
    ``floor`` (:attr:`RankingResult.floor`, the bottom_k control's source) goes to ``<stem>.floor.parquet``.
    Returns the written paths.
    """
    stem.parent.mkdir(parents=True, exist_ok=True)
    parquet, csv = stem.with_suffix(".parquet"), stem.with_suffix(".csv")
    _write_parquet(table, parquet, model)
    table.to_csv(csv, index=False)
    paths = [parquet, csv]
    if floor is not None:
        paths.append(floor_path(parquet))
        _write_parquet(floor, paths[-1], model)
    if model is not None:
        paths.append(meta_path(csv))
        paths[-1].write_text(json.dumps({"model": model}, indent=1, sort_keys=True))
    return paths


def ranking_model(path: str | Path) -> dict | None:
    """The fingerprint stored with a ranking file (parquet metadata, else the sidecar), or None (older files)."""
    path = Path(path)
    if path.suffix == ".parquet":
        raw = (pq.read_schema(path).metadata or {}).get(MODEL_KEY)
        if raw is not None:
            return json.loads(raw)
    sidecar = meta_path(path)
    if sidecar.is_file():
        try:
            return json.loads(sidecar.read_text())["model"]
        except (ValueError, KeyError, TypeError) as exc:
            raise EsaError(f"{sidecar} is not a ranking sidecar ({{\"model\": {{...}}}}): {exc}; "
                           "delete it or rewrite the ranking with `esa sensitivity`") from exc
    return None


def read_ranking(path: str | Path) -> pd.DataFrame:
    """Read a ranking written by :func:`write_ranking` (.parquet or .csv); check its columns.

    The scored model's fingerprint, when the file carries one, is in ``table.attrs["model"]`` (else None);
    files written before fingerprints were stored read as before.
    """
    path = Path(path)
    if not path.is_file():
        raise EsaError(f"ranking file {str(path)!r} does not exist; give a ranking.parquet or ranking.csv "
                       "written by `esa sensitivity`")
    if path.suffix == ".parquet":
        table = pd.read_parquet(path)
    elif path.suffix == ".csv":
        table = pd.read_csv(path, dtype={"layer": "Int64", "col": "Int64"})
    else:
        raise EsaError(f"ranking file {str(path)!r} must end in .parquet or .csv")
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise EsaError(f"{str(path)!r} is not a ranking table: missing columns {', '.join(missing)}")
    table.attrs["model"] = ranking_model(path)
    return table


def read_floor(path: str | Path) -> pd.DataFrame:
    """The floor table written beside the ranking ``path`` (per tensor, its lowest-scoring non-zero weights).

    Rankings written before floors existed (or bottom rankings, which have none) are refused with the fix, so a
    bottom_k control is never taken from the tail of a top table.
    """
    floor = floor_path(path)
    if not floor.is_file():
        raise EsaError(f"ranking {path} has no floor table ({floor.name}), so no bottom_k control can be matched "
                       "to its tensors: rerun `esa sensitivity` (it writes one beside every top ranking) or use "
                       "--controls random_k")
    return read_ranking(floor)
