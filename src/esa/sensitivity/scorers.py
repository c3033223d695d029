"""Sensitivity scorers: one fp32 score per weight, produced one parameter at a time.

A scorer is a callable ``(model, params, batches, options) -> Iterator[(name, score)]`` registered by name in
:data:`SCORERS`. Each ``score`` has the parameter's *storage* shape (GPT-2 ``Conv1D`` weights stay (in, out);
:mod:`esa.sensitivity.ranking` converts coordinates to (out, in)), is fp32, and is a fresh tensor the consumer
owns and may modify in place. Scores are yielded lazily so that the consumer (top-k, statistics) can drop each
one before the next is made: apart from the model, its gradient-sized accumulators and transient probes, at
most one full-size score tensor is alive at a time.

Loss convention (same as the evaluator): position t's logits predict token t+1 and only scored tokens count
(labels are -100 elsewhere). ``L = Σ_scored NLL / N`` is the mean NLL over all N scored calibration tokens, so
gradients do not depend on how windows are grouped into batches.

=================  =====================================================================================
``magnitude``      |W| (no data; seed-invariant)
``grad``           |g|, g = ∂L/∂W accumulated over calibration batches (fp32)
``grad_x_weight``  |g ⊙ W| — first-order Taylor estimate of the loss change when W is zeroed
``grad_squared``   empirical Fisher diagonal Σ_w g_w², with **per-window** gradients: g_w = ∂(mean NLL of
                   window w)/∂W, one backward per window, squared and summed in fp32 over the W windows
``hutchinson_diag``  |diag H| estimated as (1/K) Σ_k z_k ⊙ H z_k with seeded Rademacher z (Hutchinson 1989,
                   Bekas et al. 2007); Hessian-vector products by double backward (create_graph=True)
``wanda``          |W_ij| · ‖X_j‖₂, X_j the input activations of channel j over all real calibration tokens
                   (Sun et al. 2023, "A simple and effective pruning approach for LLMs")
``act_mag``        ‖X_j‖₂ broadcast over the weights reading input channel j (so wanda = |W| ⊙ act_mag)
=================  =====================================================================================
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from esa.models.architectures import module_role
from esa.core.errors import EsaError
from esa.core.registry import Registry
from esa.sensitivity.calibration import Batch


@dataclass(frozen=True)
class ScoreOptions:
    probes: int = 8  # Hutchinson probes per calibration batch
    seed: int = 0  # seeds the Hutchinson probes (the calibration seed picks the windows)


class Scorer(Protocol):
    def __call__(self, model: nn.Module, params: dict[str, nn.Parameter], batches: Sequence[Batch],
                 options: ScoreOptions) -> Iterator[tuple[str, torch.Tensor]]: ...


@dataclass(frozen=True)
class ScorerInfo:
    fn: Scorer
    needs_data: bool  # False → the calibration set (and so the seed) changes nothing
    summary: str


# ---------------------------------------------------------------------------------------------------------
# Parameter selection
# ---------------------------------------------------------------------------------------------------------

def _exclusion(model: nn.Module, name: str) -> str | None:
    """The flag that would include a parameter excluded by default, or ``None`` when it is included."""
    if name.endswith("bias"):
        return "--include-biases"
    role = module_role(model, name)
    if role in ("embedding", "lm_head"):
        return "--include-embeddings"
    return "--include-norms" if role == "norm" else None


def select_params(model: nn.Module, patterns: Sequence[str] = ("*",), *, include_embeddings: bool = False,
                  include_norms: bool = False, include_biases: bool = False) -> dict[str, nn.Parameter]:
    """Parameters whose ``named_parameters()`` name matches any fnmatch glob, in model order.

    Embeddings (input and untied output), norms and biases are excluded unless their flag is set. A tied
    output embedding appears once, under the input embedding's name. Every glob must match something.
    """
    named = dict(model.named_parameters())
    allowed = {"--include-embeddings": include_embeddings, "--include-norms": include_norms,
               "--include-biases": include_biases}
    for pat in patterns:
        if not any(fnmatch.fnmatchcase(n, pat) for n in named):
            close = difflib.get_close_matches(pat.replace("*", ""), list(named), n=5, cutoff=0.3)
            raise EsaError(f"--params {pat!r} matches no parameter. Similar names: "
                           f"{', '.join(close or list(named)[:5])}. Globs use fnmatch, e.g. '*.mlp.*'.")
    chosen, skipped = {}, {}
    for name, p in named.items():
        if not any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
            continue
        flag = _exclusion(model, name)
        if flag is None or allowed[flag]:
            chosen[name] = p
        else:
            skipped.setdefault(flag, name)
    if not chosen:
        hints = "; ".join(f"add {flag} (e.g. {name})" for flag, name in skipped.items())
        raise EsaError(f"--params {' '.join(patterns)} selects only parameters excluded by default: {hints}")
    return chosen


# ---------------------------------------------------------------------------------------------------------
# Loss and gradients
# ---------------------------------------------------------------------------------------------------------

def nll_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Summed NLL (fp32 scalar) of the scored tokens of one batch; logits at t predict token t+1."""
    logits = model(input_ids=batch.ids, attention_mask=batch.attn, use_cache=False).logits  # (B, T, V)
    labels = batch.labels()[:, 1:]  # (B, T-1)
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                           reduction="sum")


@contextmanager
def grad_only_for(model: nn.Module, params: dict[str, nn.Parameter]):
    """Enable autograd for ``params`` only (saves memory); restore every ``requires_grad`` flag on exit."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def mean_nll_grads(model, params, batches) -> dict[str, torch.Tensor]:
    """fp32 gradient of the calibration-set mean NLL w.r.t. each selected parameter (storage shape)."""
    device, total = _device(model), sum(b.n_scored for b in batches)
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    with grad_only_for(model, params):
        for batch in batches:
            loss = nll_sum(model, batch.to(device)) / total
            for a, g in zip(acc.values(), torch.autograd.grad(loss, list(params.values()))):
                a.add_(g.float())
    return acc


def per_window_fisher(model, params, batches) -> dict[str, torch.Tensor]:
    """Empirical Fisher diagonal Σ_w (∂ mean-NLL_w / ∂W)², one backward per window, accumulated in fp32."""
    device = _device(model)
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    with grad_only_for(model, params):
        for batch in batches:
            for b in range(len(batch.ids)):
                one = Batch(batch.ids[b:b + 1], batch.attn[b:b + 1], batch.scored[b:b + 1]).to(device)
                if one.n_scored == 0:
                    continue
                loss = nll_sum(model, one) / one.n_scored
                for a, g in zip(acc.values(), torch.autograd.grad(loss, list(params.values()))):
                    a.addcmul_(g.float(), g.float())
    return acc


def _rademacher(like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    z = torch.randint(0, 2, like.shape, generator=gen, device=like.device, dtype=torch.int8)
    return (z * 2 - 1).to(like.dtype)


def hutchinson_diagonal(loss_fns: Sequence[Callable[[], torch.Tensor]], params: Sequence[torch.Tensor],
                        probes: int, seed: int) -> list[torch.Tensor]:
    """Unbiased estimate of diag(∇² Σ_i loss_fns[i]()) w.r.t. ``params`` (signed, fp32).

    For each loss and each of ``probes`` Rademacher vectors z (±1, from a generator seeded with ``seed``),
    accumulates z ⊙ Hz / probes, where Hz comes from a second backward through the graph of the gradient.
    E[z ⊙ Hz]_i = Σ_j H_ij E[z_i z_j] = H_ii; the error falls as 1/√probes.
    """
    if probes < 1:
        raise EsaError(f"--probes {probes} must be at least 1")
    params = list(params)
    gen = torch.Generator(device=params[0].device).manual_seed(seed)
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    for loss_fn in loss_fns:
        grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
        for k in range(probes):
            zs = [_rademacher(p, gen) for p in params]
            hzs = torch.autograd.grad(grads, params, grad_outputs=zs, retain_graph=k < probes - 1)
            for a, z, hz in zip(acc, zs, hzs):
                a.add_(z.float() * hz.float(), alpha=1.0 / probes)
        del grads
    return acc


# ---------------------------------------------------------------------------------------------------------
# Input activations (wanda, act_mag)
# ---------------------------------------------------------------------------------------------------------

def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``transformers.pytorch_utils.Conv1D``: a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_consumers(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    """id(weight) → (module path, module) for every nn.Linear / Conv1D (a tied embedding maps to the head)."""
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) or is_conv1d(module):
            out.setdefault(id(module.weight), (path, module))
    return out


def linear_stats(model, params, batches) -> tuple[dict[str, torch.Tensor], dict[str, float], int]:
    """Per selected Linear/Conv1D weight over all real calibration tokens (one forward per batch):
    Σ_t x_tj² per input channel (fp32, shape (in,)), Σ_t,i y_ti² of its output (float), and the token count."""
    consumers = linear_consumers(model)
    for name, p in params.items():
        if id(p) not in consumers:
            raise EsaError(f"activation scorers need the weight of a Linear/Conv1D layer, but {name!r} "
                           f"(role {module_role(model, name)}) is not one; narrow --params or drop "
                           "--include-norms/--include-biases/--include-embeddings")
    sums = {n: torch.zeros(p.shape[0] if is_conv1d(consumers[id(p)][1]) else p.shape[-1],
                           dtype=torch.float32, device=p.device) for n, p in params.items()}
    out_sums = dict.fromkeys(params, 0.0)
    state: dict = {"tokens": 0}

    def hook_for(name: str):
        def hook(module, args, output):
            x = args[0].detach()[state["mask"]].float()  # (tokens, in)
            sums[name].add_(x.pow(2).sum(0))
            out_sums[name] += float(output.detach()[state["mask"]].float().pow(2).sum())
        return hook

    device = _device(model)
    handles = [consumers[id(p)][1].register_forward_hook(hook_for(n)) for n, p in params.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                batch = batch.to(device)
                state["mask"] = batch.attn.bool()  # (B, T)
                state["tokens"] += int(state["mask"].sum())
                model(input_ids=batch.ids, attention_mask=batch.attn, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return sums, out_sums, state["tokens"]


def input_norms(model, params, batches) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ (fp32, shape (in,)) over all real calibration tokens, per selected Linear/Conv1D weight."""
    return {n: s.sqrt_() for n, s in linear_stats(model, params, batches)[0].items()}


def _broadcast_norm(model, p, norm: torch.Tensor) -> torch.Tensor:
    """The per-input-channel vector shaped to broadcast over the weight's storage layout."""
    return norm[:, None] if is_conv1d(linear_consumers(model)[id(p)][1]) else norm[None, :]


# ---------------------------------------------------------------------------------------------------------
# The scorers
# ---------------------------------------------------------------------------------------------------------

def magnitude(model, params, batches, options):
    for name, p in params.items():
        yield name, p.detach().abs().float()


def _from_accumulators(acc: dict[str, torch.Tensor], transform) -> Iterator[tuple[str, torch.Tensor]]:
    for name in list(acc):
        yield name, transform(name, acc.pop(name))  # pop: the accumulator is freed once consumed


def grad(model, params, batches, options):
    yield from _from_accumulators(mean_nll_grads(model, params, batches), lambda n, g: g.abs_())


def grad_x_weight(model, params, batches, options):
    yield from _from_accumulators(mean_nll_grads(model, params, batches),
                                  lambda n, g: g.mul_(params[n].detach().float()).abs_())


def grad_squared(model, params, batches, options):
    yield from _from_accumulators(per_window_fisher(model, params, batches), lambda n, f: f)


def hutchinson_diag(model, params, batches, options):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device, total = _device(model), sum(b.n_scored for b in batches)
    loss_fns = [lambda b=b: nll_sum(model, b.to(device)) / total for b in batches]
    # Fused attention kernels have no double backward; the math kernel does.
    with grad_only_for(model, params), sdpa_kernel(SDPBackend.MATH):
        diag = hutchinson_diagonal(loss_fns, list(params.values()), options.probes, options.seed)
    yield from _from_accumulators(dict(zip(params, diag)), lambda n, d: d.abs_())


def wanda(model, params, batches, options):
    norms = input_norms(model, params, batches)
    for name, p in params.items():
        yield name, p.detach().abs().float().mul_(_broadcast_norm(model, p, norms.pop(name)))


def act_mag(model, params, batches, options):
    norms = input_norms(model, params, batches)
    for name, p in params.items():
        yield name, _broadcast_norm(model, p, norms.pop(name)).expand(p.shape).contiguous()


SCORERS: Registry[ScorerInfo] = Registry("scorer")
SCORERS.register("magnitude", ScorerInfo(magnitude, False, "|W|"))
SCORERS.register("grad", ScorerInfo(grad, True, "|dL/dW| of the mean calibration NLL"))
SCORERS.register("grad_x_weight", ScorerInfo(grad_x_weight, True, "|W * dL/dW| (first-order Taylor)"))
SCORERS.register("grad_squared", ScorerInfo(grad_squared, True, "empirical Fisher diagonal, per-window grads"))
SCORERS.register("hutchinson_diag", ScorerInfo(hutchinson_diag, True, "|Hessian diagonal|, Hutchinson probes"))
SCORERS.register("wanda", ScorerInfo(wanda, True, "|W| * input-channel L2 norm (Wanda)"))
SCORERS.register("act_mag", ScorerInfo(act_mag, True, "input-channel activation L2 norm"))


def score_parameters(scorer: str, model, params, batches, options: ScoreOptions | None = None):
    """Look up ``scorer`` (did-you-mean on typos) and return its lazy ``(name, score)`` stream."""
    info = SCORERS.get(scorer)
    if info.needs_data and not batches:
        raise EsaError(f"scorer {scorer!r} needs calibration data; give --max-samples ≥ 1")
    return info.fn(model, params, batches, options or ScoreOptions())
