"""Super-weight detection: the handful of weights that create a model's massive activations.

Yu et al. 2024, "The Super Weight in Large Language Models": in an early layer's MLP output projection
(Llama ``mlp.down_proj``) one weight ``W[r, c]`` meets a huge input activation ``x[c]`` and writes a huge value
into residual channel ``r`` — a *massive activation* (Sun et al. 2024) that stays in the residual stream and
that attention relies on. Zeroing that single weight destroys the model.

One forward pass (no grad) with hooks on every layer's MLP output projection records, per layer,

* max |input| per input channel and max |output| per output channel over batch and tokens, and where;
* for each output channel whose max |output| clears ``spike_floor``, the input channel ``c`` whose single
  product ``W[r, c] · x[c]`` is largest at the spike's token, and the share of the output that product carries.

Worked example (SmolLM2-135M, 4 python-docs windows of 128 tokens): layer 11's ``down_proj`` sees
|x[1229]| ≈ 2993 at token 0 and writes |y[507]| ≈ 23954 there; the per-layer maxima have medians ≈ 16 (input)
and ≈ 48 (output), so the output is ≈ 500× typical; ``W[507, 1229] · x[1229]`` carries ≈ 73 % of ``y[507]``,
so ``(layer 11, row 507, col 1229)`` is a candidate.

A weight is a candidate when its output channel spikes (> ``spike_ratio`` × the median across layers of the
per-layer max |output|, and > ``spike_floor``) and its single product carries ≥ ``min_share`` of that output.
Whether its input channel spikes too (the paper's signature) is recorded in ``input_spike``; set
``require_input_spike`` to demand it. The share test is what ties a spike to *one* weight: without it, a spike
built from many moderate products (SmolLM2's layer 29) would name an arbitrary weight.

Coordinates are (row = output channel, col = input channel), the ``nn.Linear`` (out, in) convention, whatever
the storage: GPT-2's ``Conv1D`` stores (in, out), so ``storage_index`` is ``(col, row)`` there.
"""

from __future__ import annotations

import logging
import statistics
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from esa.architectures import as_out_in, decoder_layers, family_of, mlp_out_modules
from esa.errors import EsaError

log = logging.getLogger(__name__)

MAX_MASSIVE_PER_LAYER = 32  # residual channels reported per layer (largest first); more means a broken model


@dataclass(frozen=True)
class Thresholds:
    """Detection thresholds; stored with every report. Magnitudes are absolute activation values."""

    spike_ratio: float = 50.0  # a down-projection activation spikes when > ratio × median of per-layer maxima
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
    """Max |activation| of one layer's MLP output projection in one search round (positions are token t)."""

    layer: int
    module: str  # module path, e.g. model.layers.11.mlp.down_proj
    max_input: float  # max over (B, T, in-channels) of |x|
    input_channel: int
    input_position: int
    max_output: float  # max over (B, T, out-channels) of |y|
    output_channel: int
    output_position: int


@dataclass(frozen=True)
class SuperWeight:
    """One candidate weight, in (out, in) coordinates."""

    layer: int
    row: int  # output channel: the residual channel the spike is written to
    col: int  # input channel: the intermediate (MLP hidden) channel whose product dominates
    param_name: str  # named_parameters() path, e.g. model.layers.11.mlp.down_proj.weight
    storage_index: tuple[int, int]  # index into the stored tensor: (row, col), or (col, row) for Conv1D
    weight: float  # W[row, col]
    output_activation: float  # |y[row]| at the spike token (the channel's max over batch and tokens)
    input_activation: float  # |x[col]| at the same token
    input_channel_max: float  # max |x[col]| over all tokens
    output_ratio: float  # output_activation / typical per-layer max |output|
    input_ratio: float  # input_channel_max / typical per-layer max |input|
    share: float  # W[row, col]·x[col] / y[row] at the spike token (signed; 1 = the weight alone)
    input_spike: bool  # input_channel_max passes the spike thresholds too (the paper's signature)
    batch: int  # sequence and token position of the spike
    position: int
    token_id: int
    iteration: int  # search round that found it (0 = the unmodified model)


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
    typical_input: float  # median over layers of the per-layer max |input|
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


@dataclass
class _LayerStats:
    """What the hooks keep of one layer: per-channel maxima and the attribution of spiking outputs."""

    in_max: torch.Tensor  # (Din,) max |x| over B·T
    in_pos: torch.Tensor  # (Din,) flat B·T index of it
    out_max: torch.Tensor  # (D,)
    out_pos: torch.Tensor  # (D,)
    spikes: dict[int, tuple[int, float, float, float]] = field(default_factory=dict)  # r → (c, W·x, y, x)


def _attribute(xf: torch.Tensor, yf: torch.Tensor, w_oi: torch.Tensor, out_max: torch.Tensor,
               out_pos: torch.Tensor, thr: Thresholds) -> dict[int, tuple[int, float, float, float]]:
    """For output channels whose max clears the floor: the dominant input channel at the spike's token."""
    rows = (out_max >= thr.spike_floor).nonzero().flatten()
    rows = rows[out_max[rows].argsort(descending=True)][: thr.max_channels_per_layer]
    if rows.numel() == 0:
        return {}
    pos = out_pos[rows]  # (k,) flat B·T index of each row's spike
    x_at = xf[pos]  # (k, Din)
    contrib = x_at * w_oi[rows].float()  # (k, Din): W[r, c]·x[c] at the spike token
    col = contrib.abs().argmax(1)  # (k,)
    prod = contrib.gather(1, col[:, None]).squeeze(1)
    y = yf[pos, rows]
    x = x_at.gather(1, col[:, None]).squeeze(1)
    return {int(r): (int(c), float(p), float(v), float(xv))
            for r, c, p, v, xv in zip(rows.tolist(), col.tolist(), prod.tolist(), y.tolist(), x.tolist())}


def _mlp_hook(store: dict, i: int, w_oi: torch.Tensor, valid: torch.Tensor, thr: Thresholds):
    def hook(module, args, output):
        keep = valid.to(output.device).reshape(-1, 1)  # (B·T, 1); layers may sit on different GPUs
        xf = torch.where(keep, args[0].detach().flatten(0, 1).float(), 0.0)  # (B·T, Din)
        yf = torch.where(keep, output.detach().flatten(0, 1).float(), 0.0)  # (B·T, D)
        in_max, in_pos = xf.abs().max(0)
        out_max, out_pos = yf.abs().max(0)
        spikes = _attribute(xf, yf, w_oi, out_max, out_pos, thr)
        store[i] = _LayerStats(in_max.cpu(), in_pos.cpu(), out_max.cpu(), out_pos.cpu(), spikes)
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
    massive: list[MassiveActivation] = []
    handles = []
    try:
        for i, (_, mod) in enumerate(mlp_out_modules(model)):
            w_oi = as_out_in(mod.weight, model)  # (D, Din) view
            handles.append(mod.register_forward_hook(_mlp_hook(mlp, i, w_oi, valid, thr)))
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


def _profiles(stats: dict[int, _LayerStats], modules: list[str], T: int) -> tuple[LayerProfile, ...]:
    out = []
    for i in sorted(stats):
        s = stats[i]
        c, r = int(s.in_max.argmax()), int(s.out_max.argmax())
        out.append(LayerProfile(i, modules[i], float(s.in_max[c]), c, int(s.in_pos[c]) % T,
                                float(s.out_max[r]), r, int(s.out_pos[r]) % T))
    return tuple(out)


def _candidates(model, stats, rnd: SearchRound, ids: torch.Tensor, thr: Thresholds) -> list[SuperWeight]:
    """Apply the thresholds to one round's recorded spikes."""
    fam = family_of(model)
    transposed = bool(fam and fam.transposed)
    out_limit = max(thr.spike_floor, thr.spike_ratio * rnd.typical_output)
    in_limit = max(thr.spike_floor, thr.spike_ratio * rnd.typical_input)
    T = ids.shape[1]
    found = []
    for i, s in sorted(stats.items()):
        for r, (c, prod, y, x) in s.spikes.items():
            out, share, in_max = float(s.out_max[r]), prod / y, float(s.in_max[c])
            if out <= out_limit or share < thr.min_share:
                continue
            if thr.require_input_spike and in_max <= in_limit:
                continue
            b, t = divmod(int(s.out_pos[r]), T)
            name = rnd.layers[i].module + ".weight"
            index = (c, r) if transposed else (r, c)
            weight = float(model.get_parameter(name).detach()[index])
            found.append(SuperWeight(
                i, r, c, name, index, weight, out, abs(x), in_max, out / rnd.typical_output,
                in_max / rnd.typical_input, share, in_max > in_limit, b, t, int(ids[b, t]), rnd.iteration))
    found.sort(key=lambda w: -w.output_activation)
    return found


def _search_round(model, ids, attn, valid, thr, iteration, zeroed, residual):
    with _hooked(model, ids, valid, thr, residual) as (stats, massive):
        _forward(model, ids, attn)
    modules = [path for path, _ in mlp_out_modules(model)]
    layers = _profiles(stats, modules, ids.shape[1])
    rnd = SearchRound(iteration, tuple(zeroed), statistics.median(p.max_input for p in layers),
                      statistics.median(p.max_output for p in layers), layers)
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
        model: a causal LM of a family known to ``esa.architectures``.
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


# ---- the `esa superweights` run: windows → one search → superweights.json + PNG --------------------------

@dataclass(frozen=True)
class SuperWeightRun:
    """What ``esa superweights`` does; stored in its JSON."""

    dataset: str = "python-docs"  # corpus name or .txt/.jsonl path
    context_len: int = 128  # tokens per window (method "chunks", the super-weight paper's convention)
    max_samples: int = 4  # windows in the single forward pass (B)
    seed: int = 0  # picks which windows
    iterations: int = 1  # search rounds in all; > 1 zeroes what was found and searches again
    thresholds: Thresholds = Thresholds()


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise EsaError(f"--out-dir {out_dir} is a file; choose a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise EsaError(f"{out_dir} exists and is not empty; choose another --out-dir or pass --overwrite")


def _batch(loaded, run: SuperWeightRun):
    """(ids (B, T), selection) of ``max_samples`` seeded chunks windows."""
    from esa.data.corpora import load_corpus
    from esa.data.windows import make_windows, select_windows

    if run.max_samples < 1 or run.iterations < 1:
        raise EsaError("--max-samples and the number of search rounds must be ≥ 1")
    limit = loaded.fingerprint.max_positions
    if limit is not None and run.context_len > limit:
        raise EsaError(f"--context-len {run.context_len} exceeds the model's {limit} positions; use ≤ {limit}")
    corpus = load_corpus(run.dataset)
    ws = make_windows(loaded.tokenizer, corpus.documents, "chunks", run.context_len)
    sel = select_windows(ws, run.max_samples * (run.context_len - 1), run.seed)
    windows = sel.windows.windows[: run.max_samples]
    return torch.stack([w.input_ids for w in windows]), sel, corpus


def run_superweights(spec, run: SuperWeightRun, out_dir: Path, overwrite: bool = False):
    """Load ``spec`` (an ``esa.models.ModelSpec``), search, write ``superweights.json`` and ``superweights.png``.

    Returns ``(report, document, json_path, png_path)``; the document is what the JSON holds.
    """
    import json
    import time

    from esa.models import load_model
    from esa.provenance import provenance
    from esa.sensitivity.superweight_plots import plot_activation_profile

    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    start = time.perf_counter()
    loaded = load_model(spec)
    ids, sel, corpus = _batch(loaded, run)
    report = find_super_weights(loaded.model, ids, thresholds=run.thresholds, iterate=run.iterations > 1,
                                max_iterations=run.iterations)
    decode = loaded.tokenizer.decode
    doc = {
        "schema": "esa.superweights/1",
        "provenance": provenance(loaded.device),
        "model": loaded.fingerprint.to_dict(),
        "run": asdict(run),
        "data": {"dataset": corpus.name, "source": corpus.source, "method": sel.windows.method,
                 "bos": sel.windows.bos, "context_len": run.context_len, "seed": run.seed,
                 "seed_invariant": bool(sel.seed_invariant), "window_indices": sel.indices[: len(ids)].tolist(),
                 "n_sequences": report.n_sequences, "n_tokens": report.n_tokens},
        **report.to_dict(),
        "tokens": {str(t): decode([t]) for t in sorted({w.token_id for w in report.candidates} | {
            t for m in report.massive_activations for t in m.token_ids})},  # token id → text, for reading
        "wall_seconds": time.perf_counter() - start,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_activation_profile(report, out_dir / "superweights.png",
                                  title=f"{spec.name}: MLP output projection activations ({corpus.name})")
    path = out_dir / "superweights.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, allow_nan=True))
    tmp.replace(path)
    return report, doc, path, png
