"""Batched single-element trials: K edits of one weight matrix scored in one forward from the prefix cache.

Editing element (i, j) of a linear layer's W (out × in) by Δ changes its output by a rank-1 term only::

    y' = (W + Δ·e_i e_jᵀ) x = W x + Δ·x_j·e_i        (x: the layer's input, (…, in); y: (…, out))

So K edits of the same matrix need no weight writes at all: the cached residual stream entering the first
layer a change can reach (:meth:`esa.perturb.prefix_cache.PrefixCache.layer_for`) is repeated K times along the
batch, every layer argument the cache captured (masks, rotary tables) likewise, and a forward hook on the edited
module adds copy k's own correction Δ_k·x[..., j_k] to its output channel i_k. The model's weights are never
modified, so nothing needs restoring; the hook is removed on exit, also after an error.

Numbers equal sequential trials through :func:`esa.perturb.perturbed` to float rounding (a test holds them to
1e-5): the edited matmul and ``W x + Δ·x_j`` round differently in the last bits. Edits whose Δ is not finite
(an exponent flip to inf/NaN) are refused — the sequential path is the one that shows such a collapse as stored.
Memory: K times the cache's (B, T, D) layer input and the activations of one replay.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from esa.core import parallel
from esa.core.errors import EsaError
from esa.models.architectures import as_out_in
from esa.perturb.prefix_cache import PrefixCache, _Batch
from esa.sensitivity.scorers import linear_consumers


def _repeat(value, k: int, batch: int, memo: dict):
    """``value`` with every tensor whose first dimension is the batch repeated k times (recursively); a tensor
    the layers share (one mask for all of them) is repeated once (``memo``: id → copy)."""
    if isinstance(value, torch.Tensor):
        if not value.dim() or value.shape[0] != batch:
            return value  # scalars and broadcast dimensions (rotary tables of shape (1, T, hd)) stay as they are
        if id(value) not in memo:
            memo[id(value)] = value.repeat(k, *([1] * (value.dim() - 1)))
        return memo[id(value)]
    if isinstance(value, (tuple, list)):
        return type(value)(_repeat(v, k, batch, memo) for v in value)
    if isinstance(value, dict):
        return {key: _repeat(v, k, batch, memo) for key, v in value.items()}
    return value


def _replicated(b: _Batch, layer: int, k: int) -> _Batch:
    """``b`` as k stacked copies: inputs, layer arguments, targets (and packed gather indices, shifted)."""
    B = b.inputs[layer].shape[0]
    gather = None
    if b.gather is not None:
        per_copy = B * b.inputs[layer].shape[1]  # positions of one copy in the flattened (k·B·T') states
        gather = torch.cat([b.gather + c * per_copy for c in range(k)])
    memo: dict = {}
    calls = {i: (_repeat(args, k, B, memo), _repeat(kw, k, B, memo)) for i, (args, kw) in b.calls.items()}
    return _Batch(b.rows, b.forward, b.targets.repeat(k, 1), b.mask.repeat(k, 1), gather,
                  {layer: _repeat(b.inputs[layer], k, B, memo)}, calls, b.hidden_kw)


@contextmanager
def _rank_one(module: torch.nn.Module, rows: torch.Tensor, cols: torch.Tensor, deltas: torch.Tensor,
              per_copy: int):
    """Forward hook: copy c of the batch (``per_copy`` rows each) gets output[..., rows[c]] += Δ_c·x[..., cols[c]]."""
    copy = torch.arange(len(rows) * per_copy, device=rows.device) // per_copy  # (k·B,) copy of each batch row

    def hook(mod, args, output):
        x = args[0]  # (k·B, T', in)
        bump = deltas[copy, None].to(x.dtype) * x[torch.arange(x.shape[0]), :, cols[copy]]  # (k·B, T')
        out = output.clone()
        out[torch.arange(out.shape[0]), :, rows[copy]] += bump.to(out.dtype)
        return out

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _edited_replay(cache: PrefixCache, module, batch, layer: int, rows, cols, deltas) -> torch.Tensor:
    """(k·B,) summed NLL of one cached batch replayed from ``layer`` under k rank-one edits of ``module``."""
    cache.hold_states(batch, layer)
    with _rank_one(module, rows, cols, deltas, batch.inputs[layer].shape[0]):
        return cache.replay(_replicated(batch, layer, len(rows)), layer)[0]


@torch.inference_mode()
def score_edits(cache: PrefixCache, name: str, rows, cols, deltas, chunk: int = 16) -> np.ndarray:
    """Summed NLL (K, W) of each of K single-element edits W[rows[k], cols[k]] += deltas[k] of weight ``name``
    (rows = output, cols = input feature, whatever the storage layout), ``chunk`` edits per forward."""
    model = cache.model
    rows, cols = torch.as_tensor(rows).long(), torch.as_tensor(cols).long()
    deltas = torch.as_tensor(deltas, dtype=torch.float64)
    if not torch.isfinite(deltas).all():
        raise EsaError("batched trials need finite Δw; score an edit to inf/NaN with a sequential trial")
    param = model.get_parameter(name)
    consumer = linear_consumers(model).get(id(param))
    if consumer is None or param.dim() != 2:
        raise EsaError(f"{name} is not the weight of a Linear/Conv1D layer; batched trials edit those only")
    out_in = as_out_in(param, model)
    inside = (rows >= 0) & (rows < out_in.shape[0]) & (cols >= 0) & (cols < out_in.shape[1])
    if not bool(inside.all()):
        raise EsaError(f"edit coordinates out of range for {name} of shape (out, in) = {tuple(out_in.shape)}")
    layer = cache.layer_for([name])
    if not cache.supported or layer == 0:
        raise EsaError(f"no cached layer before {name} (cache: {cache.reason or list(cache.layers)}); "
                       "batched trials start from the prefix cache")
    device = cache.device
    parts = []
    for s in range(0, len(rows), chunk):
        r, c, d = (t[s:s + chunk].to(device) for t in (rows, cols, deltas))
        calls = [(cache, consumer[1], b, layer, r, c, d) for b in cache.batches]
        owners = [cache.owner_of(i) for i in range(len(cache.batches))]
        per_batch = parallel.units(f"edits/{name}/{s}+{len(r)}", _edited_replay, calls, owners)  # (k·B,) each
        parts.append(torch.cat([nll.reshape(len(r), -1) for nll in per_batch], dim=1))  # (k, W)
    return torch.cat(parts).numpy() if parts else np.zeros((0, len(cache.baseline.nll)))
