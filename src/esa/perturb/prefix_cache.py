"""Prefix-cached evaluation: score many weight perturbations on fixed windows without re-running the prefix.

A perturbation confined to decoder layer ``L`` cannot change any hidden state before layer ``L``. So for a fixed
set of evaluation windows we run the unperturbed model once, keep the residual stream *entering* each requested
layer (plus the other arguments every layer received: attention mask, rotary ``position_embeddings``,
``position_ids``), and a trial that perturbs layer ``L`` only re-runs layers ``L .. L_last``, the final norm and
the head. Example with 30 layers: a perturbation in layer 28 runs 2 layers instead of 30.

How the arguments are captured: a ``forward_pre_hook`` (with kwargs) on every decoder layer from the shallowest
cached one records exactly what the model's own ``forward`` passed — so Llama-family (``(cos, sin)`` from
``model.rotary_emb`` and the causal mask), GPT-NeoX (same, under ``layer_past``) and GPT-2 (positional
``(hidden, cache, mask, encoder_hidden_states)``; its learned position embeddings are already in the residual)
are replayed without re-implementing their ``forward``. The cache run uses ``use_cache=False`` so no KV cache is
captured. After building, a replay from the shallowest cached layer is compared with the cache run's own scores
(``verify``); if they differ, or the family is unknown to :mod:`esa.models.architectures`, or no final norm is found,
every trial falls back to a full forward, a warning is logged and results carry ``full_forward=True``.

Layer numbering: ``layer L`` means "the input of decoder layer L", for 0 < L < n_layers, and ``L = n_layers``
means "the output of the last decoder layer" (before the final norm) — usable when only the final norm or an
untied LM head is perturbed. ``L = 0`` is never cached: nothing before layer 0 but the embedding lookup would be
saved, so it is a full forward.

Memory: each cached layer holds one (W, T, D) tensor in the model's dtype on the model's device, where W windows,
T = longest window − 1 (the last token is only a target), D hidden size — e.g. SmolLM2-135M, 8 windows × 128
tokens, fp32: 8·127·576·4 B ≈ 2.3 MB per layer; Llama-3-8B, 256 windows × 2048 tokens, bf16: ≈ 4.3 GB per layer.
Masks and position embeddings are shared between layers and stored once per micro-batch.

The cache is only valid for the weights it was built with *before* the start layer: build it on the unperturbed
model, and perturb only weights in or after the layer you score from (:func:`start_layer` finds that layer).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from esa.models.architectures import chunked_head, decoder_layers, family_of, layer_index, module_role
from esa.data.windows import Window
from esa.core import parallel
from esa.core.errors import EsaError
from esa.evals.logprobs import hidden_and_head, score_states
from esa.evals.perplexity import WindowScores, collate
from esa.evals.shared_context import SharedContext, Unit, collate_shared, n_outputs, unit_length
from esa.evals.resources import timed

if TYPE_CHECKING:  # typing.Self is Python ≥ 3.11; the package supports 3.10
    from typing import Self

log = logging.getLogger(__name__)

FINAL_NORMS = ("norm", "final_layer_norm", "ln_f")  # base-model attribute: Llama-family, GPT-NeoX, GPT-2
VERIFY_RTOL = 1e-4  # replay vs cache run on the first micro-batch; a correct replay matches to ~1e-7


@dataclass
class PrefixScores(WindowScores):
    """Per-window scores of one trial, aligned with the cache's windows, plus how they were computed."""

    start_layer: int = 0  # first decoder layer that was run (0: from the embeddings)
    full_forward: bool = True  # True when no cached prefix was used (layer 0, embeddings, or a fallback)
    reason: str = ""  # why a full forward was used, when it was


def _head_is_tied(model: nn.Module) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight is emb.weight


def start_layer(model: nn.Module, param_names: Iterable[str]) -> int:
    """The shallowest decoder layer whose *input* a change to these parameters can alter.

    ``model.layers.7.mlp.down_proj.weight`` → 7; several names → the minimum. The final norm or an untied LM
    head → ``n_layers`` (only the head side re-runs). Embeddings (and a head tied to them), position
    embeddings, or any parameter outside the decoder layers that is not the final norm / head → 0 (full
    forward). An unknown name raises, since a typo would otherwise silently score the unperturbed model.
    """
    names = list(param_names)
    if not names:
        raise EsaError("start_layer needs at least one parameter name; pass the names you perturb")
    params = dict(model.named_parameters())
    n_layers = len(decoder_layers(model))
    start = n_layers
    for name in names:
        if name not in params:
            close = difflib.get_close_matches(name, list(params), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise EsaError(f"unknown parameter {name!r}.{hint} Use a path from model.named_parameters().")
        idx, role = layer_index(name), module_role(model, name)
        if idx is not None:
            start = min(start, idx)
        elif role == "norm" or (role == "lm_head" and not _head_is_tied(model)):
            continue  # after all decoder layers: start stays ≤ n_layers
        else:
            return 0  # embeddings, tied head, anything unknown: nothing upstream is reusable
    return start


def _final_norm(model: nn.Module) -> nn.Module | None:
    base = model.base_model
    return next((getattr(base, n) for n in FINAL_NORMS if isinstance(getattr(base, n, None), nn.Module)), None)


def _is_kv_cache(value) -> bool:
    return type(value).__name__.endswith("Cache") and hasattr(value, "get_seq_length")


@dataclass
class _Batch:
    """One fixed micro-batch: what the backbone reads, how its states are scored, and the captured layer inputs.

    Plain windows read ``ids[:, :-1]`` and are scored on ``ids[:, 1:]`` (``gather`` None); shared-context units
    (:mod:`esa.evals.shared_context`) read their packed ids with a 4-D mask and position ids, and ``gather`` picks
    the positions predicting each option's tokens.
    """

    rows: slice  # positions of this batch's outputs (windows, or options) in the cache's output order
    forward: dict  # backbone keyword arguments: input_ids (B, T'), attention_mask, [position_ids]
    targets: torch.Tensor  # (S, M) token predicted at each scored position
    mask: torch.Tensor  # (S, M) bool, scored
    gather: torch.Tensor | None  # (S, M) flat indices into B·T' (shared contexts); None: row s = window s
    inputs: dict[int, torch.Tensor]  # layer L → (B, T', D) residual entering L (L = n_layers: last output)
    calls: dict[int, tuple[tuple, dict]]  # layer i → (positional args after the hidden state, kwargs)
    hidden_kw: bool = False  # the model passed hidden_states as a keyword, not positionally

    def score(self, states: torch.Tensor, head_fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(S,) summed NLL, scored and correct counts from (B, T', D) final states (or logits, head_fn None)."""
        if self.gather is not None:
            states = states.flatten(0, 1)[self.gather]  # (S, M, D)
        return score_states(states, head_fn, self.targets, self.mask)


def _plain_batch(windows: list[Window], rows: slice, pad_id: int, device) -> _Batch:
    ids, attn, scored = (t.to(device) for t in collate(windows, pad_id))
    return _Batch(rows, {"input_ids": ids[:, :-1], "attention_mask": attn[:, :-1]}, ids[:, 1:], scored[:, 1:],
                  None, {}, {})


def _shared_batch(units: list[SharedContext], rows: slice, pad_id: int, device, dtype) -> _Batch:
    packed = collate_shared(units, pad_id, dtype).to(device)
    return _Batch(rows, packed.forward, packed.targets, packed.valid, packed.gather, {}, {})


class _Capture:
    """Hooks that record what each decoder layer receives; removed on exit even if the forward fails."""

    def __init__(self, layers: nn.ModuleList, wanted: set[int], first: int):
        self.layers, self.wanted, self.first = layers, wanted, first
        self.inputs: dict[int, torch.Tensor] = {}
        self.calls: dict[int, tuple[tuple, dict]] = {}
        self.hidden_kw = False
        self.handles = []

    def _pre(self, i: int):
        def hook(module, args, kwargs):
            kw = dict(kwargs)
            if args:
                hidden, rest = args[0], tuple(args[1:])
            else:
                hidden, rest, self.hidden_kw = kw.pop("hidden_states"), (), True
            self.calls[i] = (rest, kw)
            if i in self.wanted:
                self.inputs[i] = hidden.detach().clone()  # (B, T-1, D); clone: later in-place ops can't leak
        return hook

    def _post(self, module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        self.inputs[len(self.layers)] = out.detach().clone()  # (B, T-1, D) before the final norm

    def __enter__(self) -> Self:
        n = len(self.layers)
        for i in range(self.first, n):
            self.handles.append(self.layers[i].register_forward_pre_hook(self._pre(i), with_kwargs=True))
        if n in self.wanted:
            self.handles.append(self.layers[n - 1].register_forward_hook(self._post))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


class PrefixCache:
    """Residual streams of fixed windows at chosen layers, for fast re-scoring after in-place perturbations.

    Usage::

        cache = PrefixCache(model, windows, pad_id, layers=[8, 15, 28])
        baseline = cache.baseline                      # (W,) NLLs of the unperturbed model, from the build run
        with perturbed(model, {"model.layers.15.mlp.down_proj.weight": idx}, op):
            trial = cache.score_params(["model.layers.15.mlp.down_proj.weight"])  # runs layers 15..29 only

    Args:
        model: a causal LM in eval mode, *unperturbed* while the cache is built.
        windows: the fixed evaluation windows — or shared-context units (:mod:`esa.evals.shared_context`), each
            yielding one score per option; every trial is scored on exactly these, in this order.
        pad_id: id used to right-pad windows of unequal length (never scored).
        layers: layers whose input to keep, each in 1..n_layers (see the module docstring); 0 is ignored.
        token_budget: tokens per micro-batch (windows are grouped once, at build time).
        verify: check a replay from the shallowest cached layer against the build run; fall back if it differs.
    """

    def __init__(self, model: nn.Module, windows: Iterable[Unit], pad_id: int, layers: Iterable[int],
                 token_budget: int = 4096, verify: bool = True):
        self.model = model
        self.device = model.get_input_embeddings().weight.device
        self.windows = tuple(windows)
        if not self.windows:
            raise EsaError("PrefixCache needs at least one window; check the corpus and --max-tokens")
        self.n_layers = len(decoder_layers(model)) if family_of(model) else 0
        self.layers = self._check_layers(layers)
        self.reason = self._unsupported_reason()
        self.batches = self._make_batches(pad_id, token_budget)
        share = parallel.active()  # data parallel with a batch per replica: each holds its own batches' states
        self.replicas = share.count if share is not None and len(self.batches) >= share.count else 1
        self.baseline = self._build()
        if verify and not self.reason:
            self.reason = parallel.unit("verify", self._verify, owner=self.owner_of(0))
        if self.reason:
            log.warning("prefix cache disabled (%s); every trial runs a full forward", self.reason)
            for batch in self.batches:
                batch.inputs.clear()
                batch.calls.clear()

    # ---- construction -------------------------------------------------------------------------------------
    def _check_layers(self, layers: Iterable[int]) -> tuple[int, ...]:
        wanted = sorted({int(x) for x in layers} - {0})
        bad = [x for x in wanted if not 0 < x <= self.n_layers]
        if bad and self.n_layers:
            raise EsaError(f"layers {bad} out of range for a model with {self.n_layers} decoder layers; "
                           f"use 1..{self.n_layers} ({self.n_layers} = after the last layer)")
        return tuple(wanted)

    def _unsupported_reason(self) -> str:
        if family_of(self.model) is None:
            return f"model_type {self.model.config.model_type!r} has no module map in esa.models.architectures"
        if chunked_head(self.model) is None or _final_norm(self.model) is None:
            return "no separable final norm / LM head for this architecture"
        if not self.layers:
            return "no layers requested"
        return ""

    def _make_batches(self, pad_id: int, token_budget: int) -> list[_Batch]:
        """Consecutive units of one type, at most ``token_budget // longest unit`` per batch, in order."""
        size = max(1, token_budget // max(unit_length(u) for u in self.windows))
        dtype = self.model.get_input_embeddings().weight.dtype
        batches, out = [], 0
        i = 0
        while i < len(self.windows):
            kind = type(self.windows[i])
            j = i + 1
            while j < len(self.windows) and j - i < size and type(self.windows[j]) is kind:
                j += 1
            units = list(self.windows[i:j])
            rows = slice(out, out + sum(n_outputs(u) for u in units))
            batches.append(_shared_batch(units, rows, pad_id, self.device, dtype) if kind is SharedContext
                           else _plain_batch(units, rows, pad_id, self.device))
            out, i = rows.stop, j
        return batches

    def _owners(self) -> list[int | None]:
        return [self.owner_of(i) for i in range(len(self.batches))]

    def owner_of(self, batch: int) -> int | None:
        """The replica holding batch ``batch``'s states (:mod:`esa.core.parallel`): in a data-parallel run with
        at least as many batches as replicas, batch i lives on replica i % n (None: every replica holds all)."""
        return batch % self.replicas if self.replicas > 1 else None

    @torch.inference_mode()
    def _build(self) -> PrefixScores:
        """Run every batch once through the unperturbed model, capturing layer inputs; return its scores."""
        if self.reason:
            return self.score_full()
        calls = [(batch,) for batch in self.batches]
        if self.replicas > 1:  # only the owner captures (and scores) a batch
            built = parallel.units("build", self._build_batch, calls, self._owners())
        else:
            built = [self._build_batch(*call) for call in calls]
        if any(kv for _, kv in built):
            self.reason = "the model passed a KV cache to its layers despite use_cache=False"
        return self._collect([scores for scores, _ in built], 0, "build run (full forward)")

    def _build_batch(self, batch: _Batch) -> tuple[tuple[torch.Tensor, ...], bool]:
        """Capture ``batch``'s layer inputs in one full forward: (its scores, whether a KV cache was passed)."""
        backbone, head_fn = chunked_head(self.model)
        with _Capture(decoder_layers(self.model), set(self.layers), self.layers[0]) as cap:
            out = backbone(**batch.forward, use_cache=False)
        batch.inputs, batch.calls, batch.hidden_kw = cap.inputs, cap.calls, cap.hidden_kw
        kv = any(_is_kv_cache(v) for args, kw in batch.calls.values() for v in (*args, *kw.values()))
        return batch.score(out.last_hidden_state, head_fn), kv

    def hold_states(self, batch: _Batch, layer: int) -> None:
        """Make sure ``batch``'s input to ``layer`` is held here. A batch of another replica (its owner was lost)
        is captured now: valid because every weight before ``layer`` is as at build time (score_params' rule),
        so the states equal the owner's bit for bit."""
        if layer in batch.inputs:
            return
        backbone, _ = chunked_head(self.model)
        with _Capture(decoder_layers(self.model), {layer}, layer) as cap:
            backbone(**batch.forward, use_cache=False)
        batch.inputs[layer] = cap.inputs[layer]
        batch.calls.update(cap.calls)
        batch.hidden_kw = cap.hidden_kw

    @torch.inference_mode()
    def _verify(self) -> str:
        """"" when a replay of the first batch from the shallowest cached layer equals the build run, else why."""
        first = self.batches[0]
        got = self.replay(first, self.layers[0])[0].numpy()
        want = self.baseline.nll[first.rows]
        if np.allclose(got, want, rtol=VERIFY_RTOL, atol=0.0, equal_nan=True):
            return ""
        return (f"replay from layer {self.layers[0]} differs from the full forward "
                f"(max |Δ| {np.max(np.abs(got - want)):.3g} nats); this architecture's layer "
                "arguments are not captured faithfully")

    # ---- scoring ------------------------------------------------------------------------------------------
    @property
    def supported(self) -> bool:
        """False when every trial falls back to a full forward (see ``reason``)."""
        return not self.reason

    @property
    def nbytes(self) -> int:
        """Bytes held by cached residual streams: Σ over layers of W · T · D · itemsize."""
        return sum(t.nbytes for b in self.batches for t in b.inputs.values())

    def replay(self, batch: _Batch, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B,) summed NLL, scored and correct counts of ``batch`` from its cached input to ``layer`` through the
        current weights of layers ``layer``… and the head (the input is captured first when not held here)."""
        self.hold_states(batch, layer)
        layers = decoder_layers(self.model)
        hidden = batch.inputs[layer]  # (B, T', D)
        for i in range(layer, self.n_layers):
            args, kw = batch.calls[i]
            out = layers[i](**kw, hidden_states=hidden) if batch.hidden_kw else layers[i](hidden, *args, **kw)
            hidden = out[0] if isinstance(out, tuple) else out
        states = _final_norm(self.model)(hidden)  # (B, T', D)
        _, head_fn = chunked_head(self.model)
        return batch.score(states, head_fn)

    def _forward(self, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return batch.score(*hidden_and_head(self.model, batch.forward))

    def _collect(self, parts, layer: int, reason: str, seconds: float = 0.0) -> PrefixScores:
        nll, n_scored, n_correct = (torch.cat(p).numpy() for p in zip(*parts))
        sizes = [b.rows.stop - b.rows.start for b in self.batches]
        return PrefixScores(nll.astype(np.float64), n_scored.astype(np.int64), n_correct.astype(np.int64),
                            forward_seconds=seconds, batch_sizes=sizes, start_layer=layer,
                            full_forward=layer == 0, reason=reason)

    @torch.inference_mode()
    def score_full(self) -> PrefixScores:
        """Score all windows with a full forward of the model as it is now (the reference path)."""
        times: list[float] = []
        with timed(self.device, times):
            parts = parallel.units("full", self._forward, [(b,) for b in self.batches], self._owners())
        return self._collect(parts, 0, self.reason or "full forward requested", times[0])

    @torch.inference_mode()
    def score_from(self, layer: int) -> PrefixScores:
        """Score all windows re-running only decoder layers ``layer..`` + final norm + head.

        Valid when the model's weights before ``layer`` (and the embeddings) equal those at build time.
        ``layer`` 0, or any layer when the cache is unsupported, gives a full forward (``full_forward=True``).
        """
        if layer == 0 or self.reason:
            return self.score_full()
        if layer not in self.layers:
            raise EsaError(f"layer {layer} is not cached (cached: {list(self.layers)}); add it to layers=[...] "
                           "or use score_params(), which picks the deepest cached layer at or before it")
        times: list[float] = []
        with timed(self.device, times):
            parts = parallel.units(f"from{layer}", self.replay, [(b, layer) for b in self.batches], self._owners())
        return self._collect(parts, layer, "", times[0])

    def score_params(self, param_names: Iterable[str]) -> PrefixScores:
        """Score after perturbing these parameters, from the deepest cached layer not after any of them.

        Example: cached layers [8, 15, 28]; perturbing ``model.layers.20.mlp.down_proj.weight`` runs 15..29;
        ``model.layers.3.…`` or ``model.embed_tokens.weight`` runs a full forward.
        """
        return self.score_full() if self.reason else self.score_from(self.layer_for(param_names))

    def layer_for(self, param_names: Iterable[str]) -> int:
        """The deepest cached layer not after any of these parameters (0: none; a full forward)."""
        first = start_layer(self.model, param_names)
        usable = [x for x in self.layers if x <= first]
        return usable[-1] if usable else 0
