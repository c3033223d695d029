"""Trials per second for single-weight perturbations: deep copy vs in-place vs in-place + prefix cache.

Each trial sets one element of a decoder layer's MLP output projection (Llama ``mlp.down_proj``; a seeded
random element, value ``-8 × max|w|`` of its output row, large enough to move the loss) and scores the same
fixed windows. The targets are spread evenly over the depth: one layer every ``--every`` layers (default 4:
layers 1, 5, 9, … of SmolLM2's 30), so the mean speed-up is that of a uniform sweep. Three ways, all in one run:

  (a) copy    — ``copy.deepcopy(model)`` per trial, perturb the copy, full forward (the old tool's way);
  (b) inplace — perturb in place through ``esa.perturb.perturbed`` (bit-exact restore), full forward;
  (c) prefix  — same ``perturbed`` call, re-run only layers L.. + final norm + head from a PrefixCache.

(c) is checked against (b) trial by trial (max relative per-window NLL difference).

Ideal speed-up of (c) over (b), from the FLOPs (c) skips. Per token (SmolLM2 numbers in brackets):

  F_layer = 2·D·(H·hd) + 2·2·D·(KV·hd) + 2·(H·hd)·D      q, k, v, o projections           [1.77 M]
          + n_mlp · 2·D·I                                 gate, up, down (n_mlp = 3; GPT: 2) [5.31 M]
          + 2·2·(H·hd)·T                                  scores QKᵀ and their product with V,
                                                          at the T = ctx − 1 positions run   [0.29 M]
  F_head  = 2·D·V                                                                           [56.6 M]
  ideal(L) = (n_layers · F_layer + F_head) / ((n_layers − L) · F_layer + F_head)

The fp32 log-softmax, gather and argmax over V after the head are not FLOPs of this model: both (b) and (c) do
them, so they cap the achievable fraction most for the deepest layers. ``--profile`` splits one (c) trial of the
deepest layer into its parts (layers, final norm + head matmul, log-softmax/argmax, the rest) to show it.

Clocks: wall and process-CPU seconds are both reported. On a shared machine run single-threaded
(OMP_NUM_THREADS=1): process time then excludes the time spent waiting for a core and is the steadier number;
with several threads it sums over them and stops being comparable to wall time. The default run (8 windows ×
128 tokens, 8 layers, 2 trials per cell) takes ~3.5 CPU-minutes.

Measured (2026-11, shared 2-core CPU, 1 thread, process-CPU clock, two runs): (b)/(a) 1.00–1.19× (the deep
copy costs ≈ 0.2–0.4 s of a ≈ 3.7 s trial); (c)/(b) from 1.02× at layer 1 (ideal 1.03) to 3.6–4.3× at layer 29
(ideal 4.34); achieved 84–101 % of the ideal per layer and 96–98 % over the sweep. A (c) trial from layer 29:
0.09 s in the decoder layer, 0.67–0.75 s in final norm + head matmul, 0.08–0.18 s in the fp32 log-softmax and
argmax, ≈ 0 s elsewhere (no copies, no mask rebuilding): the shortfall at the deepest layers is that
memory-bound epilogue, which (b) does too and the FLOP count leaves out.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python bench/perturb_speed.py [--trials 2]
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch

from esa.models.architectures import as_out_in, chunked_head, decoder_layers, mlp_out_modules
from esa.data.corpora import load_corpus
from esa.data.windows import make_windows, select_windows
from esa.evals.perplexity import hidden_and_head
from esa.models import ModelSpec, load_model
from esa.perturb.context import perturbed
from esa.perturb.ops import make_op
from esa.perturb.prefix_cache import PrefixCache, _final_norm
from esa.perturb.targets import TargetSet, transposed_params

# ---- FLOPs model -------------------------------------------------------------------------------------------


def _cfg(config, *keys, default=None):
    return next((getattr(config, k) for k in keys if getattr(config, k, None) is not None), default)


def flops_per_token(model, positions: int) -> tuple[float, float]:
    """(F_layer, F_head): matmul FLOPs per token of one decoder layer and of the LM head (module docstring)."""
    c = model.config
    d = _cfg(c, "hidden_size", "n_embd")
    heads = _cfg(c, "num_attention_heads", "n_head")
    hd = _cfg(c, "head_dim", default=d // heads)
    kv = _cfg(c, "num_key_value_heads", default=heads)
    inter = _cfg(c, "intermediate_size", "n_inner", default=4 * d)
    n_mlp = 3 if hasattr(decoder_layers(model)[0].mlp, "gate_proj") else 2  # gated (SwiGLU) MLP or not
    proj = 2 * d * heads * hd + 2 * 2 * d * kv * hd + 2 * heads * hd * d  # q, k+v, o
    attn = 2 * 2 * heads * hd * positions  # QKᵀ and A·V over the positions attended
    return float(proj + n_mlp * 2 * d * inter + attn), float(2 * d * c.vocab_size)


def ideal_speedup(n_layers: int, f_layer: float, f_head: float, layer: int) -> float:
    """FLOPs of a full forward / FLOPs of layers ``layer..`` + head (the embedding lookup costs no FLOPs)."""
    return (n_layers * f_layer + f_head) / ((n_layers - layer) * f_layer + f_head)


# ---- trials and the three methods --------------------------------------------------------------------------


def nudge(model, name: str, flat_index: int, value: float):
    """Set one stored weight element through ``perturbed`` (ESA's only weight writer; bit-exact restore)."""
    return perturbed(model, TargetSet({name: torch.tensor([flat_index])}), make_op("set", value=value))


def make_trials(model, layer: int, n: int, seed: int) -> list[tuple[str, int, float]]:
    """(param name, flat storage index, new value) per trial, seeded per layer: every method sees the same."""
    name = f"{mlp_out_modules(model)[layer][0]}.weight"
    stored = model.get_parameter(name).detach()
    w = as_out_in(stored, model)  # (D, I) out × in
    rng = np.random.default_rng(seed + layer)
    rows, cols = rng.integers(0, w.shape[0], size=n), rng.integers(0, w.shape[1], size=n)
    flip = name in transposed_params(model)  # GPT-2 Conv1D stores (in, out)
    flat = cols * w.shape[0] + rows if flip else rows * w.shape[1] + cols
    row_max = w.abs().amax(dim=1)  # (D,)
    return [(name, int(f), float(-8 * row_max[int(r)])) for f, r in zip(flat, rows)]


@torch.inference_mode()
def full_forward(model, cache: PrefixCache) -> np.ndarray:
    """Per-window NLL (W,) of ``model`` on the cache's fixed micro-batches, by a plain full forward."""
    return np.concatenate([b.score(*hidden_and_head(model, b.forward))[0].numpy() for b in cache.batches])


def run_copy(model, cache, trials) -> list[np.ndarray]:
    out = []
    for name, idx, value in trials:
        clone = copy.deepcopy(model)
        with torch.no_grad():
            clone.get_parameter(name).view(-1)[idx] = value
        out.append(full_forward(clone, cache))
        del clone
    return out


def run_inplace(model, cache, trials) -> list[np.ndarray]:
    out = []
    for name, idx, value in trials:
        with nudge(model, name, idx, value):
            out.append(full_forward(model, cache))
    return out


def run_prefix(model, cache, trials) -> list[np.ndarray]:
    out = []
    for name, idx, value in trials:
        with nudge(model, name, idx, value):
            scores = cache.score_params([name])
        assert not scores.full_forward, scores.reason
        out.append(scores.nll)
    return out


METHODS = {"copy": run_copy, "inplace": run_inplace, "prefix": run_prefix}


def time_method(fn, model, cache, trials) -> tuple[float, float, list[np.ndarray]]:
    """Seconds per trial, wall and process-CPU, of ``fn`` (the cache build was the warm-up)."""
    wall, cpu = time.perf_counter(), time.process_time()
    nlls = fn(model, cache, trials)
    return (time.perf_counter() - wall) / len(trials), (time.process_time() - cpu) / len(trials), nlls


def max_rel(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x / y - 1))) for x, y in zip(a, b))


def bench_layer(model, cache, layer: int, n: int, seed: int, ideal: float) -> dict:
    trials = make_trials(model, layer, n, seed)
    row, results = {"layer": layer, "ideal": ideal}, {}
    for key, fn in METHODS.items():
        row[key], row[f"{key}_cpu"], results[key] = time_method(fn, model, cache, trials)
    row["rel_diff_prefix_vs_inplace"] = max_rel(results["prefix"], results["inplace"])
    row["rel_diff_copy_vs_inplace"] = max_rel(results["copy"], results["inplace"])
    row["mean_dnll_per_token"] = float(np.mean([(r - cache.baseline.nll).sum() for r in results["inplace"]])
                                       / cache.baseline.n_scored.sum())
    return row


# ---- profile of one prefix-cached trial --------------------------------------------------------------------


def _cpu(fn, repeats: int = 3) -> float:
    fn()
    start = time.process_time()
    for _ in range(repeats):
        fn()
    return (time.process_time() - start) / repeats


def _replay_layers(layers, batch, layer: int) -> torch.Tensor:
    """The residual after the last decoder layer, replayed from ``layer`` as PrefixCache.replay does."""
    hidden = batch.inputs[layer]  # (B, T-1, D)
    for i in range(layer, len(layers)):
        args, kw = batch.calls[i]
        out = layers[i](**kw, hidden_states=hidden) if batch.hidden_kw else layers[i](hidden, *args, **kw)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def _profile_batch(model, batch, layer: int) -> dict[str, float]:
    layers, (_, head_fn), norm = decoder_layers(model), chunked_head(model), _final_norm(model)
    hidden = _replay_layers(layers, batch, layer)  # (B, T-1, D)
    logits = head_fn(norm(hidden)).float()  # (B, T-1, V)
    tgt = batch.targets  # (B, T-1)
    return {"decoder layers": _cpu(lambda: _replay_layers(layers, batch, layer)),
            "final norm + head matmul": _cpu(lambda: head_fn(norm(hidden))),
            "fp32 log-softmax + gather + argmax": _cpu(
                lambda: (torch.log_softmax(logits, -1).gather(-1, tgt[..., None]), logits.argmax(-1)))}


@torch.inference_mode()
def profile_prefix(model, cache: PrefixCache, layer: int) -> dict[str, float]:
    """CPU seconds of one (c) trial from ``layer`` and of its parts, summed over the cache's micro-batches."""
    parts = {"trial (score_from)": _cpu(lambda: cache.score_from(layer))}
    for batch in cache.batches:
        for key, value in _profile_batch(model, batch, layer).items():
            parts[key] = parts.get(key, 0.0) + value
    parts["rest (copies, masks, bookkeeping)"] = 2 * parts["trial (score_from)"] - sum(parts.values())
    return parts


# ---- printing ----------------------------------------------------------------------------------------------


def print_table(rows: list[dict], unit: str, suffix: str) -> None:
    """Seconds per trial of (a), (b), (c), speed ratios, and the achieved share of the ideal (c)/(b) speed-up."""
    head = (f"{'layer':>5} {'(a) copy':>9} {'(b) inpl':>9} {'(c) prefix':>10} {'b/a':>5} {'c/b':>6} "
            f"{'ideal c/b':>9} {'achieved':>8} {'max rel Δ c~b':>13} {'ΔNLL/tok':>9}")
    print(f"seconds per trial ({unit})\n{head}\n{'-' * len(head)}")
    for r in rows:
        a, b, c = r[f"copy{suffix}"], r[f"inplace{suffix}"], r[f"prefix{suffix}"]
        print(f"{r['layer']:>5} {a:>9.3f} {b:>9.3f} {c:>10.3f} {a / b:>5.2f} {b / c:>6.2f} {r['ideal']:>9.2f} "
              f"{b / c / r['ideal']:>8.1%} {r['rel_diff_prefix_vs_inplace']:>13.2e} "
              f"{r['mean_dnll_per_token']:>9.4f}")
    total = {k: sum(r[f"{k}{suffix}"] for r in rows) for k in METHODS}
    ideal = len(rows) / sum(1 / r["ideal"] for r in rows)  # n · F_full / Σ F_from(L)
    achieved = total["inplace"] / total["prefix"]
    print(f"{'all':>5} {total['copy']:>9.3f} {total['inplace']:>9.3f} {total['prefix']:>10.3f} "
          f"{total['copy'] / total['inplace']:>5.2f} {achieved:>6.2f} {ideal:>9.2f} {achieved / ideal:>8.1%}")


def load_windows(lm, n: int, ctx: int, seed: int) -> tuple:
    ws = make_windows(lm.tokenizer, load_corpus("python-docs").documents, method="chunks", ctx=ctx)
    return select_windows(ws, n * (ctx - 1), seed).windows.windows[:n]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--trials", type=int, default=2, help="timed trials per (method, layer)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--every", type=int, default=4, help="target layers 1, 1+every, … (evenly over the depth)")
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="explicit layers (overrides --every)")
    ap.add_argument("--profile", action="store_true", help="split one (c) trial of the deepest layer")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    lm = load_model(ModelSpec(args.model, device=args.device))
    model, n_layers = lm.model, len(decoder_layers(lm.model))
    layers = args.layers or list(range(1, n_layers, args.every))
    windows = load_windows(lm, args.windows, args.ctx, args.seed)
    start = time.perf_counter()
    cache = PrefixCache(model, windows, lm.tokenizer.pad_token_id or 0, layers=layers)
    build = time.perf_counter() - start
    f_layer, f_head = flops_per_token(model, args.ctx - 1)
    print(f"model {lm.fingerprint.model_id} ({n_layers} layers, {lm.fingerprint.dtype}) on {lm.device}, "
          f"torch threads {torch.get_num_threads()}; {len(windows)} windows × {args.ctx} tokens, "
          f"{int(cache.baseline.n_scored.sum())} scored; {args.trials} timed trials per cell")
    print(f"prefix cache: layers {list(cache.layers)}, {cache.nbytes / 2**20:.1f} MiB, "
          f"build {build:.2f} s (one full forward + capture + verify)")
    print(f"FLOPs per token: layer {f_layer / 1e6:.2f} M, head {f_head / 1e6:.2f} M, "
          f"full forward {(n_layers * f_layer + f_head) / 1e6:.1f} M\n")
    rows = [bench_layer(model, cache, L, args.trials, args.seed, ideal_speedup(n_layers, f_layer, f_head, L))
            for L in layers]
    print_table(rows, "wall clock", "")
    print()
    print_table(rows, "process CPU", "_cpu")
    print("\nb/a, c/b: speed ratios; ideal c/b from the FLOPs skipped; achieved = (c/b) / ideal; 'all' = the "
          "summed times of the sweep; 'max rel Δ c~b' compares per-window NLL of (c) and (b); (a) vs (b) max "
          "rel Δ: " + ", ".join(f"{r['rel_diff_copy_vs_inplace']:.1e}" for r in rows))
    if args.profile:
        parts = profile_prefix(model, cache, layers[-1])
        print(f"\nprofile of one (c) trial from layer {layers[-1]} (process CPU seconds):")
        for key, value in parts.items():
            print(f"  {key:<38} {value:8.3f}")


if __name__ == "__main__":
    main()
