"""Predicted damage of an elementwise weight edit from one gradient pass: a Taylor model and its stated limits.

Loss: L = mean NLL per scored token over the calibration windows (the convention of
:mod:`esa.sensitivity.scorers`). For an edit w → w + Δw of one element::

    first order    ΔL ≈ g·Δw                       g = ∂L/∂w
    second order   ΔL ≈ g·Δw + ½·h·Δw²             h ≈ ∂²L/∂w², from a diagonal estimator:

    ``grad_squared``  Σ_b n_b·g_b² / N  — batch gradients (the ones g is summed from, so no extra pass)
    ``fisher``        Σ_w n_w·g_w² / N  — per-window gradients (one backward per calibration window)
    ``hutchinson``    E[z ⊙ Hz], Rademacher z (``probes`` Hessian-vector products per batch; unbiased, signed)

n_b, n_w: scored tokens of a batch or window, N their total. The two Fisher forms estimate the per-token
empirical Fisher; both are ≥ 0, so a second-order prediction can only add damage to the first-order one.

Δw is exact: the edit is applied by the same op code :func:`esa.perturb.perturbed` uses, on a copy of the
stored values, and subtracted in float64 — for a bit flip this is the IEEE representation's own change.

**Regimes.** A polynomial in Δw means nothing once an edit changes the model qualitatively — an exponent flip
sends a weight to 1e38. Each edit gets a regime by a rule that does not use the polynomial:

- ``nonfinite``: w + Δw is ±inf or NaN (the loss becomes non-finite: certain collapse);
- ``large``: r = |Δw|·rms(x_j) / rms(y) > ``tau`` (default 1), where x_j is the weight's input channel and y
  the layer's output over all calibration tokens and channels — the edit alone moves its output channel by
  more than the layer's typical activation. These are ranked by r, never by the polynomial;
- ``taylor``: everything else, ranked by the second-order prediction.

Only floating-point Linear/Conv1D weights are predicted (bit flips: fp32, fp16, bf16); integer and quantised
tensors are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esa.core.errors import EsaError
from esa.sensitivity.calibration import Batch
from esa.sensitivity.scorers import (_device, grad_only_for, hutchinson_diagonal, is_conv1d, linear_consumers,
                                     linear_stats, nll_sum)

ESTIMATORS = ("grad_squared", "fisher", "hutchinson")
REGIMES = ("taylor", "large", "nonfinite")
DEFAULT_TAU = 1.0


@dataclass
class Curvature:
    """What the predictions need per weight tensor (storage shape, fp32 or wider) and per layer."""

    grad: dict[str, torch.Tensor]  # g = ∂L/∂w
    diag: dict[str, torch.Tensor]  # h, by ``estimator``
    x_rms: dict[str, torch.Tensor]  # (in,) rms of the input channel over calibration tokens
    y_rms: dict[str, float]  # rms of the layer's output over tokens and channels
    transposed: dict[str, bool]  # GPT-2 Conv1D: storage (in, out)
    estimator: str
    n_tokens: int  # scored calibration tokens (N)


def check_predictable(model, params: dict[str, torch.nn.Parameter]) -> None:
    """Refuse what the Taylor model cannot cover: integer/quantised tensors and non-Linear weights."""
    consumers = linear_consumers(model)
    for name, p in params.items():
        if not p.dtype.is_floating_point or p.is_quantized:
            raise EsaError(f"{name} is {p.dtype}: damage prediction needs a floating-point weight (fp32, fp16, "
                           "bf16; integer or quantised tensors are not supported); narrow --params")
        if id(p) not in consumers:
            raise EsaError(f"{name} is not the weight of a Linear/Conv1D layer; damage prediction covers "
                           "those only (the regime rule needs its input and output activations)")


def _acc_dtype(p: torch.Tensor) -> torch.dtype:
    """Accumulators in fp32, or the weight's own dtype when wider (a float64 model keeps float64)."""
    return torch.promote_types(p.dtype, torch.float32)


def _batch_grads(model, params, batches, n_total: int):
    """Per batch: (n_scored, {name: ∂(Σ NLL_b / N)/∂w}) — summed, they are g."""
    device = _device(model)
    with grad_only_for(model, params):
        for batch in batches:
            loss = nll_sum(model, batch.to(device)) / n_total
            yield batch.n_scored, dict(zip(params, torch.autograd.grad(loss, list(params.values()))))


def _fisher(model, params, batches, n_total: int) -> dict[str, torch.Tensor]:
    """Σ_w n_w·g_w² / N with per-window mean-NLL gradients g_w."""
    acc = {n: torch.zeros_like(p, dtype=_acc_dtype(p)) for n, p in params.items()}
    windows = [Batch(b.ids[i:i + 1], b.attn[i:i + 1], b.scored[i:i + 1]) for b in batches for i in range(len(b.ids))]
    for window in (w for w in windows if w.n_scored):
        for _, grads in _batch_grads(model, params, [window], window.n_scored):
            for name, g in grads.items():
                acc[name].add_(g.to(acc[name].dtype).square() * (window.n_scored / n_total))
    return acc


def curvature(model, params: dict[str, torch.nn.Parameter], batches: list[Batch], estimator: str = "fisher",
              probes: int = 8, seed: int = 0) -> Curvature:
    """g, the diagonal h by ``estimator`` and the activation scales, on the calibration ``batches``."""
    if estimator not in ESTIMATORS:
        raise EsaError(f"estimator {estimator!r} is not one of {', '.join(ESTIMATORS)}")
    check_predictable(model, params)
    n_total = sum(b.n_scored for b in batches)
    if n_total == 0:
        raise EsaError("the calibration windows score no tokens; give more --calib-samples")
    grad = {n: torch.zeros_like(p, dtype=_acc_dtype(p)) for n, p in params.items()}
    sq = {n: torch.zeros_like(p, dtype=_acc_dtype(p)) for n, p in params.items()}
    for n_b, grads in _batch_grads(model, params, batches, n_total):
        for name, g in grads.items():
            g = g.to(grad[name].dtype)
            grad[name].add_(g)
            sq[name].add_((g * (n_total / n_b)).square() * (n_b / n_total))  # n_b·g_b²/N, g_b per token
    if estimator == "fisher":
        diag = _fisher(model, params, batches, n_total)
    elif estimator == "hutchinson":
        device = _device(model)
        with grad_only_for(model, params):
            fns = [lambda b=b: nll_sum(model, b.to(device)) / n_total for b in batches]
            diag = dict(zip(params, hutchinson_diagonal(fns, list(params.values()), probes, seed)))
    else:
        diag = sq
    ins, outs, n_tok = linear_stats(model, params, batches)
    consumers = linear_consumers(model)
    rows = {n: outs[n] / (n_tok * (p.shape[1] if is_conv1d(consumers[id(p)][1]) else p.shape[0]))
            for n, p in params.items()}
    return Curvature(grad, diag, {n: (s / n_tok).sqrt() for n, s in ins.items()},
                     {n: float(v) ** 0.5 for n, v in rows.items()},
                     {n: is_conv1d(consumers[id(p)][1]) for n, p in params.items()}, estimator, n_total)


def edit_delta(values: torch.Tensor, op, generator: torch.Generator | None = None) -> torch.Tensor:
    """Δw (float64, same shape) of applying ``op`` to these stored values — exactly what ``perturbed`` writes."""
    gen = generator or torch.Generator(device=values.device).manual_seed(0)
    std = float(values.float().std()) if op.needs_tensor_std else None
    return op(values.clone(), gen, tensor_std=std).double() - values.double()


@dataclass
class Prediction:
    """Per-edit predictions, each shaped like the edits' Δw."""

    first: torch.Tensor  # g·Δw
    second: torch.Tensor  # g·Δw + ½·h·Δw²
    ratio: torch.Tensor  # r = |Δw|·rms(x_j)/rms(y)
    regime: torch.Tensor  # int8 index into REGIMES


def channel_scale(curv: Curvature, name: str) -> torch.Tensor:
    """rms(x_j)/rms(y) shaped to broadcast over the stored weight: (1, in) for Linear, (in, 1) for Conv1D."""
    scale = curv.x_rms[name].double() / max(curv.y_rms[name], 1e-30)
    return scale[:, None] if curv.transposed[name] else scale[None, :]


def predict_block(g: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, delta: torch.Tensor,
                  tau: float = DEFAULT_TAU) -> Prediction:
    """Predictions for edits ``delta`` of elements with gradient ``g``, curvature ``h`` and input scale
    ``scale`` = rms(x_j)/rms(y), all broadcastable to ``delta``'s shape; computed in ``delta``'s dtype (the map
    scans in fp32, where an exponent flip's |Δw| ≤ 3.4e38 stays finite, and its g·Δw may overflow to ±inf —
    harmless, since such an edit is ``large`` and ranked by r)."""
    g, h, scale = (t.to(delta.dtype) for t in (g, h, scale))
    first = g * delta
    second = torch.addcmul(first, h, delta.square(), value=0.5)
    ratio = delta.abs() * scale
    nonfinite = ~(delta.abs() < torch.inf)  # NaN or ±inf
    regime = torch.where(nonfinite, 2, torch.where(ratio > tau, 1, 0)).to(torch.int8)
    return Prediction(first, second, ratio, regime)


def predict(curv: Curvature, name: str, flat: torch.Tensor, delta: torch.Tensor, tau: float = DEFAULT_TAU
            ) -> Prediction:
    """Predictions for edits ``delta`` (n,) at flat storage indices ``flat`` (n,) of tensor ``name``."""
    shape = curv.grad[name].shape
    rows, cols = flat // shape[1], flat % shape[1]
    scale = channel_scale(curv, name)
    per_edit = scale[rows, 0] if curv.transposed[name] else scale[0, cols]
    return predict_block(curv.grad[name][rows, cols], curv.diag[name][rows, cols], per_edit, delta, tau)
