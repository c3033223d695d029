"""Which weight elements a perturbation touches: a :class:`TargetSet` maps parameter name → flat indices.

A parameter is named by its ``named_parameters()`` path. Indices are flat positions in ``weight.view(-1)``,
i.e. row-major over the tensor *as stored*: for an ``nn.Linear`` weight of shape (out, in), element
``[row, col]`` is ``row * in + col``. Coordinates (``[row, col]`` strings, ranking tables, ``rows:``/``cols:``
globs) use the (out, in) convention of the sensitivity ranking tables: ``row`` is the output index and ``col``
the input index, also for GPT-2's ``Conv1D`` weights, which are stored (in, out) and translated here.
Example: ``transformer.h.0.mlp.c_proj.weight`` is stored (256, 64); ``[3, 10]`` (out 3, in 10) is storage
``[10, 3]``, flat ``10 * 64 + 3``.

Builders, all validating names (unknown → EsaError listing similar names) and ranges before anything runs:

* :func:`from_coordinates` — ``"model.layers.2.mlp.down_proj.weight[123,456]"`` strings or tuples;
  :func:`from_file` reads a JSON list (strings or ``{"param", "row", "col"}`` objects) or a CSV
  (param,row,col).
* :func:`from_ranking` — top (or bottom) ``k`` rows of a sensitivity table (param, row, col, score).
* :func:`random_k` — a size-matched control: as many elements of the same tensors, none of the originals.
* :func:`lowest_of` — the bottom-k control: per tensor, as many of its lowest-scoring elements (a floor table).
* :func:`from_glob` — whole rows, columns or tensors by fnmatch pattern: ``rows:*.mlp.down_proj.weight:5``,
  ``cols:model.layers.*.self_attn.o_proj.weight:0-3``, ``tensor:model.norm.weight``.
* :func:`parse_targets` — one string that is any of the above (coordinates separated by ``;``).
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from esa.core.errors import EsaError

_COORD = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*\[\s*([^\]]*)\]\s*$")


class TargetSet(Mapping[str, torch.Tensor]):
    """Ordered mapping parameter name → (N,) int64 flat indices, unique and sorted within each tensor.

    Duplicates are merged on construction and empty entries dropped, so ``n_elements`` counts distinct
    elements. Build one with the functions of this module rather than by hand: they validate names and ranges.
    """

    def __init__(self, entries: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] = ()):
        items = entries.items() if isinstance(entries, Mapping) else entries
        merged: dict[str, list[torch.Tensor]] = {}
        for name, idx in items:
            merged.setdefault(name, []).append(torch.as_tensor(idx, dtype=torch.long).reshape(-1).cpu())
        self._data = {n: torch.unique(torch.cat(parts)) for n, parts in merged.items()}
        self._data = {n: idx for n, idx in self._data.items() if idx.numel()}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._data[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    @property
    def n_elements(self) -> int:
        return sum(int(idx.numel()) for idx in self._data.values())

    def union(self, other: Mapping[str, torch.Tensor]) -> TargetSet:
        return TargetSet([*self._data.items(), *other.items()])

    def to_frame(self, model: nn.Module) -> pd.DataFrame:
        """One row per element: param, row, col in the (out, in) convention (col = -1 for 1-D), flat."""
        params, transposed = param_table(model), transposed_params(model)
        frames = []
        for name, idx in self._data.items():
            shape = tuple(params[name][1].shape)
            flat = idx.numpy()
            rows, cols = (np.unravel_index(flat, shape) if len(shape) == 2
                          else (flat, np.full_like(flat, -1)))
            if name in transposed and len(shape) == 2:
                rows, cols = cols, rows
            frames.append(pd.DataFrame({"param": name, "row": rows, "col": cols, "flat": flat}))
        if not frames:
            return pd.DataFrame(columns=["param", "row", "col", "flat"])
        return pd.concat(frames, ignore_index=True)

    def __repr__(self) -> str:
        return f"TargetSet({len(self)} tensors, {self.n_elements} elements)"


# --- parameter lookup ---------------------------------------------------------------------------------------

def param_table(model: nn.Module) -> dict[str, tuple[str, nn.Parameter]]:
    """Every parameter path, tied aliases included (``lm_head.weight``), → (canonical name, parameter).

    The canonical name is the one ``named_parameters()`` reports; aliases resolve to it so a tied tensor is
    never perturbed (or restored) twice under two names.
    """
    canonical = {id(p): n for n, p in model.named_parameters()}
    return {n: (canonical[id(p)], p) for n, p in model.named_parameters(remove_duplicate=False)}


def resolve_param(table: Mapping[str, tuple[str, nn.Parameter]], name: str) -> tuple[str, nn.Parameter]:
    """(canonical name, parameter) for ``name``, or EsaError naming the closest parameter paths."""
    if name in table:
        return table[name]
    close = difflib.get_close_matches(name, list(table), n=5, cutoff=0.6)
    hint = f" Similar: {', '.join(close)}." if close else ""
    raise EsaError(f"the model has no parameter {name!r}.{hint} ({len(table)} parameters; list them with "
                   "model.named_parameters().)")


def transposed_params(model: nn.Module) -> set[str]:
    """Canonical names of weights stored (in, out): those of GPT-2 ``transformers.pytorch_utils.Conv1D``."""
    return {f"{path}.weight" if path else "weight" for path, mod in model.named_modules()
            if type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")}


def _out_in_shape(shape: tuple[int, ...], transposed: bool) -> tuple[int, ...]:
    return (shape[1], shape[0]) if transposed and len(shape) == 2 else shape


def _to_storage(flat_oi: np.ndarray, shape: tuple[int, ...], transposed: bool) -> np.ndarray:
    """Flat (out, in)-convention indices → flat storage indices (identity unless stored (in, out))."""
    if not transposed or len(shape) != 2:
        return flat_oi
    n_in, n_out = shape
    out_idx, in_idx = np.divmod(flat_oi, n_in)
    return in_idx * n_out + out_idx


def _flatten(name: str, shape: tuple[int, ...], coords: np.ndarray) -> np.ndarray:
    """Flat indices (N,) of integer coordinates (N, ndim) into a tensor of ``shape``; EsaError if invalid."""
    if coords.shape[1] != len(shape):
        raise EsaError(f"{name} has shape {list(shape)}: give {len(shape)} indices per coordinate, not "
                       f"{coords.shape[1]} (e.g. {name}[{', '.join('0' for _ in shape)}]).")
    bad = ((coords < 0) | (coords >= np.asarray(shape))).any(axis=1)
    if bad.any():
        first = coords[np.flatnonzero(bad)[0]].tolist()
        raise EsaError(f"coordinate {name}{first} is out of range for shape {list(shape)} "
                       f"({int(bad.sum())} such coordinates); indices start at 0.")
    return np.ravel_multi_index(tuple(coords.T), shape).astype(np.int64)


def _storage_flat(table: Mapping[str, tuple[str, nn.Parameter]], transposed: set[str], name: str,
                  coords) -> tuple[str, np.ndarray]:
    """(canonical name, (N,) flat storage indices) of (N, ndim) coordinates in the (out, in) convention, in order."""
    canon, param = resolve_param(table, name)
    shape, flip = tuple(param.shape), canon in transposed
    arr = np.asarray(coords, dtype=np.int64).reshape(len(coords), -1)  # (N, ndim), (out, in) convention
    return canon, _to_storage(_flatten(name, _out_in_shape(shape, flip), arr), shape, flip)


def _coordinate_columns(table: Mapping[str, tuple[str, nn.Parameter]], name: str) -> list[str]:
    return ["row", "col"] if resolve_param(table, name)[1].dim() == 2 else ["row"]


def _build(model: nn.Module, groups: Mapping[str, list[tuple[int, ...]] | np.ndarray]) -> TargetSet:
    table, transposed = param_table(model), transposed_params(model)
    entries = [_storage_flat(table, transposed, name, coords) for name, coords in groups.items()]
    return TargetSet([(canon, torch.from_numpy(flat)) for canon, flat in entries])


# --- explicit coordinates -----------------------------------------------------------------------------------

def parse_coordinate(text: str) -> tuple[str, tuple[int, ...]]:
    """``"model.norm.weight[7]"`` → ``("model.norm.weight", (7,))``; ``"w[12,34]"`` → ``("w", (12, 34))``."""
    match = _COORD.match(text)
    parts = match.group(2).split(",") if match else []
    if not match or not parts or not all(p.strip().isdigit() for p in parts):
        raise EsaError(f"cannot read coordinate {text!r}: write param[row,col] with non-negative integers, "
                       "e.g. model.layers.2.mlp.down_proj.weight[123,456] (1-D: model.norm.weight[7]).")
    return match.group(1), tuple(int(p) for p in parts)


def _as_coordinate(item) -> tuple[str, tuple[int, ...]]:
    if isinstance(item, str):
        return parse_coordinate(item)
    if isinstance(item, Mapping):
        if "param" not in item or "row" not in item:
            raise EsaError(f"coordinate object {item!r} needs keys param, row and (for 2-D tensors) col.")
        col = item.get("col")
        has_col = col is not None and not pd.isna(col) and int(col) >= 0  # 1-D: col missing, NA or -1
        return str(item["param"]), (int(item["row"]), int(col)) if has_col else (int(item["row"]),)
    name, *idx = item
    if len(idx) == 1 and isinstance(idx[0], (tuple, list)):
        idx = list(idx[0])
    return str(name), tuple(int(i) for i in idx)


def from_coordinates(model: nn.Module, coords: Iterable) -> TargetSet:
    """Targets from coordinate strings, ``(param, row, col)`` tuples or ``{"param", "row", "col"}`` dicts."""
    groups: dict[str, list[tuple[int, ...]]] = {}
    for item in coords:
        name, idx = _as_coordinate(item)
        groups.setdefault(name, []).append(idx)
    for name, idxs in groups.items():
        if len({len(i) for i in idxs}) > 1:
            raise EsaError(f"coordinates of {name} mix {sorted({len(i) for i in idxs})} indices; "
                           "use one form.")
    return _build(model, groups)


def read_coordinates(path: str | Path) -> list:
    """Coordinate items from a ``.json`` list (strings or objects) or a ``.csv`` (columns param,row,col)."""
    path = Path(path)
    if not path.is_file():
        raise EsaError(f"coordinate file {str(path)!r} does not exist.")
    if path.suffix.lower() == ".json":
        items = json.loads(path.read_text())
        if not isinstance(items, list):
            raise EsaError(f"{path} must hold a JSON list of coordinates, e.g. [\"model.norm.weight[3]\"].")
        return items
    if path.suffix.lower() == ".csv":
        frame = pd.read_csv(path)
        missing = {"param", "row"} - set(frame.columns)
        if missing:
            raise EsaError(f"{path} lacks column(s) {', '.join(sorted(missing))}; expected param,row,col.")
        return frame.to_dict("records")
    raise EsaError(f"coordinate file {str(path)!r} must end in .json or .csv.")


def from_file(model: nn.Module, path: str | Path) -> TargetSet:
    return from_coordinates(model, read_coordinates(path))


# --- ranking tables -----------------------------------------------------------------------------------------

def _check_ranking_model(model: nn.Module, stored: Mapping | None) -> None:
    """EsaError when a ranking's stored fingerprint names another architecture or size than ``model``."""
    if not stored:
        return
    n_params = sum(p.numel() for p in model.parameters())
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if stored.get("n_params") != n_params or stored.get("model_type") != model_type:
        raise EsaError(f"this ranking was computed on {stored.get('model_id', '?')} ({stored.get('n_params')} "
                       f"params, model_type {stored.get('model_type')}), not on this model ({n_params} params, "
                       f"model_type {model_type}); rank this model with `esa sensitivity` first")


def from_ranking(model: nn.Module, table: pd.DataFrame, k: int, bottom: bool = False) -> TargetSet:
    """The ``k`` highest-scoring elements of a sensitivity table (``bottom=True``: the ``k`` lowest).

    ``table`` has columns param, row, col, score — the ranking-table format of :mod:`esa.sensitivity`, in the
    (out, in) convention; col is ignored for 1-D tensors. Ties keep table order;
    NaN scores rank last in both directions, so they are taken only when ``k`` exceeds the finite scores.
    A table read by :func:`esa.sensitivity.ranking.read_ranking` carries the scored model's fingerprint in
    ``table.attrs["model"]``; its parameter count and model_type must match ``model`` (the protocols also
    compare the revision, which a bare module does not know).
    """
    _check_ranking_model(model, table.attrs.get("model"))
    missing = {"param", "row", "col", "score"} - set(table.columns)
    if missing:
        raise EsaError(f"ranking table lacks column(s) {', '.join(sorted(missing))}; "
                       "expected param,row,col,score.")
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= len(table):
        raise EsaError(f"k={k!r} must be an integer in 1 … {len(table)} (the table's rows).")
    picked = table.sort_values("score", ascending=bottom, kind="stable", na_position="last").head(int(k))
    table_p = param_table(model)
    groups = {name: part[_coordinate_columns(table_p, name)].to_numpy(dtype=np.int64)
              for name, part in picked.groupby("param", sort=False)}
    return _build(model, groups)


def lowest_of(model: nn.Module, floor: pd.DataFrame, like: Mapping[str, torch.Tensor]) -> TargetSet:
    """The bottom-k control of ``like``: per tensor, as many of its lowest-scoring elements, none of ``like``'s.

    ``floor`` is a ranking table (param, row, col, score) that holds, for each tensor, that tensor's
    lowest-scoring elements under one scorer (:func:`esa.sensitivity.ranking.score_and_rank` writes it beside
    the top table). The control is matched to the targets per tensor in count, as :func:`random_k` is, and
    never borrows elements of another tensor. Example: targets with 3 elements in ``layers.2.mlp.down_proj``
    and 1 in ``layers.5.self_attn.o_proj`` → the 3 lowest-scoring elements of the first tensor and the lowest
    one of the second that are not targets themselves.
    """
    table_p, transposed = param_table(model), transposed_params(model)
    entries = []
    for name, idx in like.items():
        rows = floor[floor["param"] == name].sort_values("score", kind="stable", na_position="last")
        _, flat = _storage_flat(table_p, transposed, name, rows[_coordinate_columns(table_p, name)].to_numpy())
        flat = flat[~np.isin(flat, idx.cpu().numpy())][: len(idx)]
        if len(flat) < len(idx):
            raise EsaError(f"bottom_k needs {len(idx)} lowest-scoring elements of {name} but the ranking's bottom "
                           f"table holds {len(flat)} besides the targets; rank with a larger --k (the bottom table "
                           "keeps per tensor as many as the tensor has in the top k) or use --controls random_k")
        entries.append((name, torch.from_numpy(flat.astype(np.int64))))
    return TargetSet(entries)


# --- size-matched random controls ---------------------------------------------------------------------------

def _sample_excluding(numel: int, k: int, exclude: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``k`` distinct uniformly drawn indices in [0, numel) that are not in ``exclude``, in draw order."""
    available = numel - len(exclude)
    if k > available:
        raise EsaError(f"cannot draw {k} new elements from a tensor of {numel} with {len(exclude)} excluded.")
    if 4 * k > available:  # dense: choose from the explicit complement
        keep = np.ones(numel, dtype=bool)
        keep[exclude] = False
        return rng.choice(np.flatnonzero(keep), size=k, replace=False)
    chosen = np.empty(0, dtype=np.int64)
    while len(chosen) < k:  # sparse: rejection sampling, order-preserving dedupe keeps the draw uniform
        draw = rng.integers(0, numel, size=2 * (k - len(chosen)) + 16)
        pool = np.concatenate([chosen, draw[~np.isin(draw, exclude)]])
        _, first = np.unique(pool, return_index=True)
        chosen = pool[np.sort(first)][:k]
    return chosen


def random_k(model: nn.Module, like: Mapping[str, torch.Tensor], seed: int) -> TargetSet:
    """A size-matched random control for ``like``: per tensor, as many distinct elements, none of ``like``'s.

    Each tensor's draw is seeded by ``(seed, crc32(name))``, so it does not depend on the other tensors in
    ``like`` or their order. Counts are of distinct elements (duplicates in ``like`` count once).
    """
    table = param_table(model)
    entries = []
    for name, idx in like.items():
        canon, param = resolve_param(table, name)
        exclude = np.unique(torch.as_tensor(idx).reshape(-1).cpu().numpy().astype(np.int64))
        if len(exclude) and (exclude[0] < 0 or exclude[-1] >= param.numel()):
            raise EsaError(f"target indices of {name} fall outside its {param.numel()} elements.")
        rng = np.random.default_rng([int(seed), zlib.crc32(canon.encode())])
        drawn = _sample_excluding(param.numel(), len(exclude), exclude, rng)
        entries.append((canon, torch.from_numpy(drawn.astype(np.int64))))
    return TargetSet(entries)


# --- globs --------------------------------------------------------------------------------------------------

def _index_list(text: str, spec: str) -> np.ndarray:
    """``"5"``, ``"1,4"``, ``"0-3"`` (inclusive) → int64 array."""
    out = []
    for part in text.split(","):
        lo, dash, hi = part.strip().partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise EsaError(f"cannot read indices {text!r} in {spec!r}: use 5, 1,4 or 0-3 (inclusive).")
        out.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
    return np.asarray(out, dtype=np.int64)


def _match(model: nn.Module, pattern: str, spec: str) -> list[tuple[str, nn.Parameter]]:
    params = list(model.named_parameters())
    hits = [(n, p) for n, p in params if fnmatch.fnmatchcase(n, pattern)]
    if not hits:
        close = difflib.get_close_matches(pattern, [n for n, _ in params], n=5, cutoff=0.5)
        hint = f" Similar names: {', '.join(close)}." if close else ""
        raise EsaError(f"pattern {pattern!r} in {spec!r} matches no parameter.{hint}")
    return hits


def from_glob(model: nn.Module, spec: str) -> TargetSet:
    """``rows:<glob>:<idx>``, ``cols:<glob>:<idx>`` (2-D tensors only) or ``tensor:<glob>`` (all elements)."""
    kind, _, rest = spec.partition(":")
    if kind == "tensor":
        return TargetSet([(n, torch.arange(p.numel())) for n, p in _match(model, rest, spec)])
    pattern, _, idx_text = rest.rpartition(":")
    if kind not in ("rows", "cols") or not pattern:
        raise EsaError(f"cannot read target {spec!r}: use rows:<glob>:<i>, cols:<glob>:<j> or tensor:<glob>, "
                       "e.g. rows:*.mlp.down_proj.weight:5.")
    idx = _index_list(idx_text, spec)
    transposed = transposed_params(model)
    entries = []
    for name, param in _match(model, pattern, spec):
        if param.dim() != 2:
            raise EsaError(f"{kind}: needs 2-D tensors but {pattern!r} matches {name} {list(param.shape)}; "
                           "narrow the pattern (e.g. end it in .weight of a projection).")
        shape, flip = tuple(param.shape), name in transposed
        n_rows, n_cols = _out_in_shape(shape, flip)  # rows = outputs, cols = inputs
        limit = n_rows if kind == "rows" else n_cols
        if idx.max() >= limit:
            raise EsaError(f"{kind[:-1]} {int(idx.max())} is out of range for {name} (out, in) = "
                           f"{[n_rows, n_cols]}.")
        grid = (idx[:, None] * n_cols + np.arange(n_cols)[None] if kind == "rows"
                else np.arange(n_rows)[:, None] * n_cols + idx[None])  # flat (out, in) indices
        entries.append((name, torch.from_numpy(_to_storage(grid.reshape(-1), shape, flip))))
    return TargetSet(entries)


def parse_targets(model: nn.Module, spec: str) -> TargetSet:
    """One target string: a glob spec, a ``.json``/``.csv`` path, or ``;``-separated coordinates."""
    spec = spec.strip()
    if spec.split(":", 1)[0] in ("rows", "cols", "tensor"):
        return from_glob(model, spec)
    if spec.lower().endswith((".json", ".csv")):
        return from_file(model, spec)
    return from_coordinates(model, [s for s in spec.split(";") if s.strip()])
