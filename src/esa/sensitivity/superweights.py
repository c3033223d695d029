"""Super-weight detection: the handful of weights that create a model's massive activations.

Yu et al. 2024, "The Super Weight in Large Language Models": in an early layer's MLP output projection
(Llama ``mlp.down_proj``) one weight ``W[r, c]`` meets a huge input activation ``x[c]`` and writes a huge value
into residual channel ``r`` — a *massive activation* (Sun et al. 2024) that stays in the residual stream and
that attention relies on. Zeroing that single weight destroys the model.

The MLP's contribution to the residual stream, ``z``, is observed where the family map says
(``esa.models.architectures.mlp_residual_modules``): the projection's own output ``z = y = W x`` (Llama, GPT-NeoX,
GPT-2), or ``z = post_feedforward_layernorm(y) = g ⊙ y / rms(y)`` (Gemma-2/3, OLMo-2), whose learned gains ``g``
can turn a modest ``y`` into a massive residual write. One forward pass (no grad) records, per layer,

* max |x| per input channel and max |z| per output channel over batch and tokens, and where;
* for each output channel whose max |z| clears ``spike_floor``, the input channel ``c`` whose single product
  ``W[r, c] · x[c]`` is largest at the spike's token, and the *share*: the fraction of ``z[r]`` that vanishes
  without that product — ``W[r, c]·x[c] / y[r]`` when ``z = y``; behind a norm, ``1 − post(y − W[r, c]·x[c]·e_r)[r]
  / z[r]``, recomputed exactly, because removing a dominant product also shrinks ``rms(y)``.

Worked example (SmolLM2-135M, 4 python-docs windows of 128 tokens, seed 0): layer 11's ``down_proj`` sees
|x[1229]| ≈ 2993 at token 0 and writes |y[507]| ≈ 23954 there, 484× the layer's median channel max (≈ 49);
``W[507, 1229] · x[1229]`` carries ≈ 73 % of ``y[507]``, so ``(layer 11, row 507, col 1229)`` is a candidate
(zeroing it: perplexity ×7.4). Also found: (28, 507, 678) at 391× (zeroing it alone: ×1.00) and (2, 507, 430) at
210× (×1.74).

Worked example (Gemma-3-270M, D = 640, same windows; BOS on every window): residual channel 163 is massive at
the BOS token from layer 3 on (|h| ≈ 1.0e4, growing to ≈ 1.0e5 by layer 13). ``down_proj`` never writes more than
|y| ≈ 92 (layer 0), so the pre-norm detector found nothing. The norm does it: in layer 3, ``y[163] ≈ 0.63`` but
``rms(y) ≈ 0.035``, so ``y/rms ≈ 17.7`` (a single channel's limit is √640 ≈ 25), times the gain ``g[163] = 585``
gives ``z[163] ≈ 10354`` (1189× the layer's median channel max). ``W[163, 1414] · x[1414]`` carries 97 % of
``y[163]`` and, renormalised, 96 % of ``z[163]``. Layers 3–8 each write ≈ 1.0–1.5e4 into channel 163 this way, one
dominant weight per layer — redundantly: zeroing one of them costs ×1.01–1.06 perplexity, all six ×6.1. The
strongest single weight is layer 0's ``W[400, 1405]`` (|x[1405]| ≈ 139, y ≈ 28.6, gain 153, z ≈ 2863; ×1.14).
The 11 default candidates zeroed together: ×13–16, as many random weights of the same tensors: ×1.0001.

A weight is a candidate when its output channel spikes (max |z| > ``spike_ratio`` × its layer's median over
channels of the per-channel max |z|, and > ``spike_floor``) and its product carries ≥ ``min_share`` of ``z[r]``.
The comparison is per layer because post-MLP gains differ ≈ 300× across Gemma-3's depth and 8 of its 18 layers
write the massive channel, which made the former yardstick (the median across layers of per-layer maxima, ≈ 1.2e4
there) useless. ``spike_ratio = 100`` keeps SmolLM2's two former candidates, adds its ×1.74 layer-2 weight and
leaves out weights at ≤ 91× (×1.09 at most); it is a screening level — no ratio separates harmful from harmless
single weights on both models (Gemma's 359× layer-2 weight costs ×1.0006) — and the perturbation protocols judge.
Whether its input channel spikes too (the paper's signature) is recorded in ``input_spike``; set
``require_input_spike`` to demand it. The share test is what ties a spike to *one* weight: without it, a spike
built from many moderate products (SmolLM2's layer 29) would name an arbitrary weight.

Coordinates are (row = output channel, col = input channel), the ``nn.Linear`` (out, in) convention, whatever
the storage: GPT-2's ``Conv1D`` stores (in, out), so ``storage_index`` is ``(col, row)`` there.
"""

from __future__ import annotations

import logging
import math
import statistics
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from esa.models.architectures import as_out_in, decoder_layers, family_of, mlp_out_modules, mlp_residual_modules
from esa.core.errors import EsaError

log = logging.getLogger(__name__)

MAX_MASSIVE_PER_LAYER = 32  # residual channels reported per layer (largest first); more means a broken model


@dataclass(frozen=True)
class Thresholds:
    """Detection thresholds; stored with every report. Magnitudes are absolute activation values."""

    spike_ratio: float = 100.0  # a channel spikes when its max |activation| > ratio × its layer's median channel max
    spike_floor: float = 100.0  # … and > this absolute value (Sun et al. 2024 call > 100 "massive")
    min_share: float = 0.5  # the weight's product W[r, c]·x[c] must carry ≥ this fraction of the output y[r]
    require_input_spike: bool = False  # paper-strict mode: the input channel c must spike as well
    massive_ratio: float = 1000.0  # residual |h| is massive when > ratio × the median |h| of its layer …
    massive_floor: float = 100.0  # … and > this absolute value (Sun et al. 2024: ≈ 1000× median, > 100)
    max_channels_per_layer: int = 16  # spiking output channels attributed per layer (largest first)

    def __post_init__(self) -> None:
        for name in ("spike_ratio", "massive_ratio"):
            if getattr(self, name) <= 1:
                raise EsaError(f"{name}={getattr(self, name)} must be > 1 (a spike is far above typical)")
        for name in ("spike_floor", "massive_floor"):
            if getattr(self, name) < 0:
                raise EsaError(f"{name}={getattr(self, name)} must be ≥ 0")
        if not 0 < self.min_share <= 1:
            raise EsaError(f"min_share={self.min_share} must be in (0, 1]")
        if self.max_channels_per_layer < 1:
            raise EsaError(f"max_channels_per_layer={self.max_channels_per_layer} must be ≥ 1")


@dataclass(frozen=True)
class LayerProfile:
    """Max |activation| of one layer's MLP in one search round (positions are token t).

    Inputs are the MLP output projection's ``x``; outputs are the MLP's contribution to the residual stream
    ``z`` (``y`` itself, or Gemma's ``post_feedforward_layernorm(y)``, see the module docstring).
    """

    layer: int
    module: str  # module path of the output projection, e.g. model.layers.11.mlp.down_proj
    max_input: float  # max over (B, T, in-channels) of |x|
    input_channel: int
    input_position: int
    max_output: float  # max over (B, T, out-channels) of |z|
    output_channel: int
    output_position: int
    observed: str = ""  # module whose output is z (== module unless the family has a post-MLP norm)
    typical_input: float = 0.0  # median over in-channels of the per-channel max |x|
    typical_output: float = 0.0  # median over out-channels of the per-channel max |z|


@dataclass(frozen=True)
class SuperWeight:
    """One candidate weight, in (out, in) coordinates."""

    layer: int
    row: int  # output channel: the residual channel the spike is written to
    col: int  # input channel: the intermediate (MLP hidden) channel whose product dominates
    param_name: str  # named_parameters() path, e.g. model.layers.11.mlp.down_proj.weight
    storage_index: tuple[int, int]  # index into the stored tensor: (row, col), or (col, row) for Conv1D
    weight: float  # W[row, col]
    output_activation: float  # |z[row]| at the spike token (the channel's max over batch and tokens)
    input_activation: float  # |x[col]| at the same token
    input_channel_max: float  # max |x[col]| over all tokens
    output_ratio: float  # output_activation / the layer's typical_output
    input_ratio: float  # input_channel_max / the layer's typical_input
    share: float  # fraction of z[row] that vanishes without W[row, col]·x[col] (signed; 1 = the weight alone)
    input_spike: bool  # input_channel_max passes the spike thresholds too (the paper's signature)
    batch: int  # sequence and token position of the spike
    position: int
    token_id: int
    iteration: int  # search round that found it (0 = the unmodified model)
    projection_output: float = 0.0  # signed y[row] of the output projection at the spike token (before any norm)


@dataclass(frozen=True)
class MassiveActivation:
    """A residual-stream channel whose |h| after decoder layer ``layer`` is massive at some tokens."""

    layer: int  # decoder layer whose output (pre final norm) holds it
    channel: int
    positions: tuple[int, ...]  # token positions t (union over the batch) where it is massive
    token_ids: tuple[int, ...]  # the distinct tokens at those places
    n_hits: int  # (sequence, token) pairs where it is massive
    magnitude: float  # max |h|
    layer_median: float  # median |h| of the layer over all tokens and channels


@dataclass(frozen=True)
class SearchRound:
    iteration: int
    zeroed: tuple[tuple[int, int, int], ...]  # (layer, row, col) zeroed before this round
    typical_input: float  # median over layers of the per-layer typical_input (a summary; tests are per layer)
    typical_output: float
    layers: tuple[LayerProfile, ...]


@dataclass(frozen=True)
class SuperWeightReport:
    thresholds: Thresholds
    candidates: tuple[SuperWeight, ...]  # by round, then largest output activation first
    massive_activations: tuple[MassiveActivation, ...]  # unmodified model, by layer then magnitude
    rounds: tuple[SearchRound, ...]
    n_sequences: int
    n_tokens: int  # unmasked tokens in the forward pass

    def to_dict(self) -> dict:
        return asdict(self)


def report_from_dict(d: dict) -> SuperWeightReport:
    """Inverse of :meth:`SuperWeightReport.to_dict` (after a JSON round trip: lists back to tuples), e.g. a
    stored ``superweights`` run's metrics; keys other than the report's are ignored."""
    def tup(x):
        return tuple(tup(v) for v in x) if isinstance(x, list) else x

    def build(cls, item: dict):
        return cls(**{k: tup(v) for k, v in item.items()})

    return SuperWeightReport(
        build(Thresholds, d["thresholds"]), tuple(build(SuperWeight, c) for c in d["candidates"]),
        tuple(build(MassiveActivation, m) for m in d["massive_activations"]),
        tuple(SearchRound(r["iteration"], tup(r["zeroed"]), r["typical_input"], r["typical_output"],
                          tuple(build(LayerProfile, p) for p in r["layers"])) for r in d["rounds"]),
        d["n_sequences"], d["n_tokens"])


@dataclass
class _LayerStats:
    """What the hooks keep of one layer: per-channel maxima and the attribution of spiking outputs."""

    in_max: torch.Tensor  # (Din,) max |x| over B·T
    in_pos: torch.Tensor  # (Din,) flat B·T index of it
    out_max: torch.Tensor  # (D,) max |z| over B·T
    out_pos: torch.Tensor  # (D,)
    spikes: dict[int, tuple[int, float, float, float, float]] = field(default_factory=dict)  # r → (c, share,
    #   z[r], x[c], y[r]) at the spike token


def _shares(post: nn.Module | None, y_at: torch.Tensor, rows: torch.Tensor, prod: torch.Tensor) -> torch.Tensor:
    """(k,) fraction of each ``z[r]`` that vanishes when the product ``W[r, c]·x[c]`` is removed from ``y``.

    Without a post-MLP module ``z = y`` and this is ``W[r, c]·x[c] / y[r]``. With one (Gemma's RMSNorm) it is
    recomputed exactly: ``1 − post(y − W[r, c]·x[c]·e_r)[r] / z[r]``, so the RMS normalisation — which the
    dominant product itself inflates — is accounted for. ``y_at`` is (k, D), one row per spike.
    """
    k = torch.arange(rows.numel(), device=rows.device)
    if post is None:
        return prod.double() / y_at[k, rows].double()
    y_cf = y_at.clone()
    y_cf[k, rows] -= prod
    with torch.no_grad():  # .forward: the token-wise map without its hooks; both in fp32 so they compare
        z_ref, z_cf = post.forward(y_at).float(), post.forward(y_cf).float()  # (k, D)
    return 1 - z_cf[k, rows].double() / z_ref[k, rows].double()


def _attribute(xf: torch.Tensor, yf: torch.Tensor, zf: torch.Tensor, w_oi: torch.Tensor, post: nn.Module | None,
               out_max: torch.Tensor, out_pos: torch.Tensor, thr: Thresholds) -> dict:
    """For output channels whose max |z| clears the floor: the dominant input channel at the spike's token.

    The dominant column is ``argmax_c |W[r, c]·x[c]|``: a post-MLP norm scales row ``r`` of a token by one
    positive-or-negative factor, so it cannot change which product dominates — only how large ``z[r]`` is.
    """
    rows = ((out_max >= thr.spike_floor) & (out_max > 0)).nonzero().flatten()
    rows = rows[out_max[rows].argsort(descending=True)][: thr.max_channels_per_layer]
    if rows.numel() == 0:
        return {}
    pos = out_pos[rows]  # (k,) flat B·T index of each row's spike
    x_at = xf[pos]  # (k, Din)
    contrib = x_at * w_oi[rows].float()  # (k, Din): W[r, c]·x[c] at the spike token
    col = contrib.abs().argmax(1)  # (k,)
    prod = contrib.gather(1, col[:, None]).squeeze(1)
    share = _shares(post, yf[pos], rows, prod)
    x = x_at.gather(1, col[:, None]).squeeze(1)
    return {int(r): (int(c), float(s), float(z), float(xv), float(y)) for r, c, s, z, xv, y in zip(
        rows.tolist(), col.tolist(), share.tolist(), zf[pos, rows].tolist(), x.tolist(), yf[pos, rows].tolist())}


def _flat(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, t.detach().flatten(0, 1).float(), 0.0)  # (B·T, ·), padding zeroed


def _stats(xf, yf, zf, w_oi, post, thr) -> _LayerStats:
    in_max, in_pos = xf.abs().max(0)
    out_max, out_pos = zf.abs().max(0)
    spikes = _attribute(xf, yf, zf, w_oi, post, out_max, out_pos, thr)
    return _LayerStats(in_max.cpu(), in_pos.cpu(), out_max.cpu(), out_pos.cpu(), spikes)


def _mlp_hook(store: dict, inputs: dict, i: int, w_oi: torch.Tensor, valid: torch.Tensor, thr: Thresholds,
              observed_here: bool):
    """On the output projection: record x (and y = z when the MLP adds its output to the residual directly)."""
    def hook(module, args, output):
        keep = valid.to(output.device).reshape(-1, 1)  # (B·T, 1); layers may sit on different GPUs
        xf = _flat(args[0], keep)  # (B·T, Din)
        if observed_here:
            yf = _flat(output, keep)  # (B·T, D)
            store[i] = _stats(xf, yf, yf, w_oi, None, thr)
        else:
            inputs[i] = xf  # the post-MLP module's hook finishes this layer
    return hook


def _post_hook(store: dict, inputs: dict, i: int, w_oi: torch.Tensor, valid: torch.Tensor, thr: Thresholds):
    """On the post-MLP module (Gemma's post_feedforward_layernorm): y is its input, z its output."""
    def hook(module, args, output):
        keep = valid.to(output.device).reshape(-1, 1)
        yf, zf = _flat(args[0], keep), _flat(output, keep)  # (B·T, D) each
        store[i] = _stats(inputs.pop(i), yf, zf, w_oi, module, thr)
    return hook


def _massive(i: int, h: torch.Tensor, valid: torch.Tensor, ids: torch.Tensor,
             thr: Thresholds) -> list[MassiveActivation]:
    """Massive residual activations of one layer's output ``h`` (B, T, D)."""
    a = h.detach().float().abs()  # (B, T, D)
    valid, ids = valid.to(a.device), ids.to(a.device)
    median = float(a[valid].median())
    limit = max(thr.massive_floor, thr.massive_ratio * median)
    hits = (a > limit) & valid[..., None]  # (B, T, D)
    found = []
    for d in hits.any(dim=(0, 1)).nonzero().flatten().tolist():
        b, t = hits[..., d].nonzero(as_tuple=True)
        found.append(MassiveActivation(
            i, d, tuple(sorted(set(t.tolist()))), tuple(sorted(set(ids[b, t].tolist()))), int(b.numel()),
            float(a[b, t, d].max()), median))
    found.sort(key=lambda m: -m.magnitude)
    if len(found) > MAX_MASSIVE_PER_LAYER:
        log.warning("layer %d has %d massive channels; keeping the largest %d", i, len(found),
                    MAX_MASSIVE_PER_LAYER)
    return found[:MAX_MASSIVE_PER_LAYER]


def _residual_hook(store: list, i: int, valid: torch.Tensor, ids: torch.Tensor, thr: Thresholds):
    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output  # (B, T, D)
        store.extend(_massive(i, h, valid, ids, thr))
    return hook


@contextmanager
def _hooked(model: nn.Module, ids: torch.Tensor, valid: torch.Tensor, thr: Thresholds, residual: bool):
    """Register the recording hooks; they are removed on exit whatever happens."""
    mlp: dict[int, _LayerStats] = {}
    inputs: dict[int, torch.Tensor] = {}  # x of layers whose z is observed further on
    massive: list[MassiveActivation] = []
    handles = []
    try:
        for i, ((_, mod), (_, obs)) in enumerate(zip(mlp_out_modules(model), mlp_residual_modules(model))):
            w_oi = as_out_in(mod.weight, model)  # (D, Din) view
            handles.append(mod.register_forward_hook(_mlp_hook(mlp, inputs, i, w_oi, valid, thr, obs is mod)))
            if obs is not mod:
                handles.append(obs.register_forward_hook(_post_hook(mlp, inputs, i, w_oi, valid, thr)))
        if residual:
            for i, block in enumerate(decoder_layers(model)):
                handles.append(block.register_forward_hook(_residual_hook(massive, i, valid, ids, thr)))
        yield mlp, massive
    finally:
        for handle in handles:
            handle.remove()


def _forward(model: nn.Module, ids: torch.Tensor, attn: torch.Tensor) -> None:
    """Run the backbone only: the LM head does not affect any hooked activation."""
    body = getattr(model, "base_model", model)
    with torch.no_grad():
        body(input_ids=ids, attention_mask=attn, use_cache=False)


def _profiles(stats: dict[int, _LayerStats], modules: list[str], observed: list[str],
              T: int) -> tuple[LayerProfile, ...]:
    out = []
    for i in sorted(stats):
        s = stats[i]
        c, r = int(s.in_max.argmax()), int(s.out_max.argmax())
        out.append(LayerProfile(i, modules[i], float(s.in_max[c]), c, int(s.in_pos[c]) % T,
                                float(s.out_max[r]), r, int(s.out_pos[r]) % T, observed[i],
                                float(s.in_max.median()), float(s.out_max.median())))
    return tuple(out)


def _ratio(value: float, typical: float) -> float:
    return value / typical if typical > 0 else math.inf


def _candidates(model, stats, rnd: SearchRound, ids: torch.Tensor, thr: Thresholds) -> list[SuperWeight]:
    """Apply the thresholds to one round's recorded spikes."""
    fam = family_of(model)
    transposed = bool(fam and fam.transposed)
    T = ids.shape[1]
    found = []
    for i, s in sorted(stats.items()):
        prof = rnd.layers[i]
        out_limit = max(thr.spike_floor, thr.spike_ratio * prof.typical_output)
        in_limit = max(thr.spike_floor, thr.spike_ratio * prof.typical_input)
        for r, (c, share, _, x, y) in s.spikes.items():
            out, in_max = float(s.out_max[r]), float(s.in_max[c])
            if out <= out_limit or share < thr.min_share:
                continue
            if thr.require_input_spike and in_max <= in_limit:
                continue
            b, t = divmod(int(s.out_pos[r]), T)
            name = rnd.layers[i].module + ".weight"
            index = (c, r) if transposed else (r, c)
            weight = float(model.get_parameter(name).detach()[index])
            found.append(SuperWeight(
                i, r, c, name, index, weight, out, abs(x), in_max, _ratio(out, prof.typical_output),
                _ratio(in_max, prof.typical_input), share, in_max > in_limit, b, t, int(ids[b, t]), rnd.iteration,
                y))
    found.sort(key=lambda w: -w.output_activation)
    return found


def _search_round(model, ids, attn, valid, thr, iteration, zeroed, residual):
    with _hooked(model, ids, valid, thr, residual) as (stats, massive):
        _forward(model, ids, attn)
    modules = [path for path, _ in mlp_out_modules(model)]
    observed = [path for path, _ in mlp_residual_modules(model)]
    layers = _profiles(stats, modules, observed, ids.shape[1])
    rnd = SearchRound(iteration, tuple(zeroed), statistics.median(p.typical_input for p in layers),
                      statistics.median(p.typical_output for p in layers), layers)
    return rnd, _candidates(model, stats, rnd, ids, thr), massive


def _zero_all(model: nn.Module, found: list[SuperWeight], stack: ExitStack) -> None:
    """Zero ``found`` through :func:`esa.perturb.context.perturbed`; ``stack`` restores them on exit."""
    from esa.perturb.context import perturbed
    from esa.perturb.ops import make_op
    from esa.perturb.targets import from_coordinates

    targets = from_coordinates(model, [(w.param_name, w.row, w.col) for w in found])
    stack.enter_context(perturbed(model, targets, make_op("zero")))


def _check_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask, max_iterations: int):
    if input_ids.dim() != 2 or input_ids.numel() == 0:
        raise EsaError(f"input_ids must be a non-empty (B, T) tensor of token ids, got shape "
                       f"{tuple(input_ids.shape)}; stack windows with torch.stack or esa.evals.perplexity.collate")
    if max_iterations < 1:
        raise EsaError(f"max_iterations={max_iterations} must be ≥ 1 (the first search is iteration 0)")
    if len(mlp_out_modules(model)) < 3:
        log.warning("fewer than 3 layers: the median across layers is dominated by any spike itself")
    device = model.get_input_embeddings().weight.device
    ids = input_ids.to(device)
    attn = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device)
    if attn.shape != ids.shape:
        raise EsaError(f"attention_mask shape {tuple(attn.shape)} differs from input_ids {tuple(ids.shape)}")
    return ids, attn


def find_super_weights(model: nn.Module, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                       thresholds: Thresholds = Thresholds(), iterate: bool = False,
                       max_iterations: int = 3) -> SuperWeightReport:
    """Locate super-weight candidates and massive residual activations (see the module docstring).

    Args:
        model: a causal LM of a family known to ``esa.models.architectures``.
        input_ids: (B, T) token ids; padded positions (``attention_mask == 0``) are ignored.
        thresholds: detection thresholds, recorded in the report.
        iterate: after each round, zero the weights just found and search again (Yu et al. find further
            super weights this way), for at most ``max_iterations`` rounds in all; stops early when a round
            finds nothing new. Zeroed elements are restored bit-exactly before returning, even on error.

    Massive activations are reported for the unmodified model (round 0) only.
    """
    ids, attn = _check_inputs(model, input_ids, attention_mask, max_iterations)
    valid = attn.bool()  # (B, T)
    rounds, candidates, massive = [], [], []
    with ExitStack() as stack:  # every zeroing is undone bit-exactly when the search ends, also on error
        for it in range(max_iterations if iterate else 1):
            zeroed = [(w.layer, w.row, w.col) for w in candidates]  # in discovery order
            rnd, found, seen = _search_round(model, ids, attn, valid, thresholds, it, zeroed, residual=it == 0)
            massive = seen if it == 0 else massive
            rounds.append(rnd)
            new = [w for w in found if (w.layer, w.row, w.col) not in set(zeroed)]  # never report twice
            candidates.extend(new)
            if not new:
                break
            if iterate:
                _zero_all(model, new, stack)
    massive.sort(key=lambda m: (m.layer, -m.magnitude))
    return SuperWeightReport(thresholds, tuple(candidates), tuple(massive), tuple(rounds),
                             int(ids.shape[0]), int(valid.sum()))
