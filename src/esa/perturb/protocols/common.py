"""Shared machinery of the protocols: configs, the fixed windows (:class:`Bench`), one trial, arms, statistics."""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from esa.data.corpora import load_corpus
from esa.data.windows import make_windows, scored_text_counts, select_windows
from esa.core import parallel
from esa.core.errors import EsaError
from esa.evals.perplexity import perplexity_metrics
from esa.models import LoadedModel, check_context, pad_id
from esa.perturb.context import perturbed
from esa.perturb.prefix_cache import PrefixCache, start_layer
from esa.perturb.targets import TargetSet
from esa.core.provenance import provenance
from esa.stats import DEFAULT_COLLAPSE_PPL, aggregate_seeds, benjamini_hochberg, holm, paired_compare

CONTROLS = ("random_k", "bottom_k", "largest_k")  # size-matched per target tensor (esa.perturb.protocols.choose):
#   random_k: random other elements (one draw per control seed); bottom_k: the lowest-scoring non-zero ones;
#   largest_k: the largest-|W| other ones (super weights vs as many of the largest non-super weights)
STOCHASTIC_OPS = ("gauss_noise", "uniform_noise", "random_bit_flip")  # repeated once per control seed
DOSE_PARAM = {"scale": "factor", "gauss_noise": "sigma", "uniform_noise": "width", "bit_flip": "bit",
              "set": "value", "random_bit_flip": "prob"}  # the parameter a dose-response sweeps
MAX_LISTED = 256  # elements per target set listed in the JSON (the count is always there)


@dataclass(frozen=True)
class EvalConfig:
    """The fixed evaluation windows every trial of a run is scored on, and the statistics' settings."""

    dataset: str = "python-docs"  # corpus name or .txt/.jsonl path
    context_len: int = 128  # tokens per chunks window
    max_eval_tokens: int | None = 2048  # scored tokens; the seed picks which windows (None: all of them)
    seed: int = 0  # picks the evaluation windows and the super-weight calibration windows
    batch_tokens: int = 4096  # micro-batch token budget
    calib_samples: int = 4  # windows for super-weight detection, drawn from those not evaluated
    n_boot: int = 10_000  # bootstrap-t resamples per mean-ΔNLL CI (esa.stats.paired_compare)
    collapse_ppl: float = DEFAULT_COLLAPSE_PPL  # collapsed: PPL above this, or a non-finite loss
    tasks: tuple[tuple[str, str | None], ...] = ()  # zero-shot (task, local JSONL or None) scored in every trial
    task_limit: int | None = None  # items per task (seeded by ``seed``); None: all of them


@dataclass(frozen=True)
class PerturbConfig:
    targets: str = "superweights"  # see resolve_targets
    op: str = "zero"  # an esa.perturb.parse_op spec, e.g. scale:factor=-1
    controls: tuple[str, ...] | None = None  # None: random_k, plus bottom_k when a ranking is known
    ranking: str | None = None  # ranking file for bottom_k (default: the one in a topk: target)
    control_seeds: tuple[int, ...] = (0, 1, 2)  # random_k draws (and noise seeds of a stochastic op)
    data: EvalConfig = EvalConfig()


@dataclass(frozen=True)
class DoseConfig:
    targets: str = "superweights"
    op: str = "scale"  # op name, optionally with fixed parameters: gauss_noise:relative_to=tensor_std
    values: tuple = (0, 0.25, 0.5, 1, 2, 4, 8)  # the swept parameter (DOSE_PARAM), e.g. bit positions
    control_seeds: tuple[int, ...] = (0, 1, 2)
    data: EvalConfig = EvalConfig()


@dataclass(frozen=True)
class BitscanConfig:
    targets: str = "superweights"
    top_n: int = 4  # first N target elements, in the spec's order (super-weight / ranking order)
    bits: tuple[str, ...] = ("sign", "exponent_msb", "exponent_lsb", "mantissa_msb")
    max_flips: int = 8  # greedy collapse search: give up after this many flips
    greedy_pool: int = 64  # … choosing among this many flips with the largest single-flip damage (default: all
    #                        16 of top_n × bits, so every step searches every remaining flip)
    data: EvalConfig = EvalConfig()
    order: str = "listed"  # listed: measure every flip | predicted: in predicted order until the stop rule
    screen_n: int = 10  # predicted: stop once no unmeasured flip can beat the measured screen_n-th worst
    calib_flips: int = 16  # predicted: random candidate flips measured first; they set the error bound
    estimator: str = "grad_squared"  # predicted: the diagonal curvature (esa.predict.taylor.ESTIMATORS)


# ---- the fixed windows, the cache and one trial ------------------------------------------------------------

@dataclass
class Bench:
    """A loaded model and the run's fixed windows; ``cache`` (and with it the baseline) once trials are known."""

    lm: LoadedModel
    data: EvalConfig
    windows: tuple  # (W,) esa.data.windows.Window
    info: dict  # data provenance for the JSON
    calib: torch.Tensor  # (B, T) ids for super-weight detection
    cache: PrefixCache | None = None
    notes: list[str] = field(default_factory=list)
    tasks: list = field(default_factory=list)  # downstream.TaskSet per zero-shot task (EvalConfig.tasks)
    task_cache: PrefixCache | None = None  # built with ``cache``; its build run is the unperturbed reference
    task_reference: dict = field(default_factory=dict)  # task → downstream.ItemOutcomes of the unperturbed model

    @property
    def model(self) -> torch.nn.Module:
        return self.lm.model

    @property
    def n_tokens(self) -> np.ndarray:
        return self.cache.baseline.n_scored  # (W,)


def _check_data(lm: LoadedModel, data: EvalConfig) -> None:
    check_context(lm, data.context_len, "--context-len")
    for name in ("calib_samples", "n_boot", "batch_tokens"):
        if getattr(data, name) < 1:
            raise EsaError(f"{name.replace('_', '-')} must be ≥ 1, got {getattr(data, name)}")
    if data.max_eval_tokens is not None and data.max_eval_tokens < 1:
        raise EsaError(f"--max-eval-tokens {data.max_eval_tokens} must be ≥ 1 (0 on the CLI: the whole corpus)")


def make_bench(lm: LoadedModel, data: EvalConfig) -> Bench:
    """Seeded evaluation windows plus ``calib_samples`` other windows for super-weight detection."""
    _check_data(lm, data)
    corpus = load_corpus(data.dataset)
    ws = make_windows(lm.tokenizer, corpus.documents, "chunks", data.context_len)
    sel = select_windows(ws, data.max_eval_tokens, data.seed)
    rest = np.setdiff1d(np.arange(len(ws.windows)), sel.indices)
    pool = rest if len(rest) else sel.indices
    calib_idx = np.sort(np.random.default_rng(data.seed).permutation(pool)[: data.calib_samples])
    calib = torch.stack([ws.windows[i].input_ids for i in calib_idx])  # (B, T): chunks windows share T
    windows = sel.windows.windows
    info = {"dataset": corpus.name, "source": corpus.source, "method": "chunks", "bos": ws.bos,
            "context_len": data.context_len, "seed": data.seed, "seed_invariant": bool(sel.seed_invariant),
            "available_windows": sel.available_windows, "n_windows": len(windows),
            "scored_tokens": int(sum(w.n_scored for w in windows)), "window_indices": sel.indices.tolist(),
            "calibration_indices": calib_idx.tolist()}
    bench = Bench(lm, data, windows, info, calib)
    if data.tasks:
        from esa.perturb.protocols.downstream import load_tasks

        bench.tasks = load_tasks(lm, data.tasks, data.task_limit, data.seed)
    if not len(rest):
        bench.notes.append("every window is evaluated, so super-weight calibration reuses evaluation windows")
    return bench


def build_cache(bench: Bench, sets: list[TargetSet]) -> None:
    """Cache residual streams at each trial's first perturbed layer; the build run is the baseline."""
    layers = {start_layer(bench.model, list(ts)) for ts in sets if len(ts)} - {0}
    t0 = time.perf_counter()
    bench.cache = PrefixCache(bench.model, bench.windows, pad_id(bench.lm.tokenizer, bench.model), sorted(layers),
                              bench.data.batch_tokens)
    bench.info["prefix_cache"] = {"layers": sorted(layers), "supported": bench.cache.supported,
                                  "reason": bench.cache.reason, "bytes": bench.cache.nbytes,
                                  "build_seconds": time.perf_counter() - t0}  # build run = the baseline
    if not bench.cache.supported:
        bench.notes.append(f"prefix cache unused ({bench.cache.reason}); every trial ran a full forward")
    if bench.tasks:
        from esa.perturb.protocols.downstream import outcomes, task_units

        pad = pad_id(bench.lm.tokenizer, bench.model)
        units, bench.info["task_scoring"] = task_units(bench.lm, bench.tasks, pad)
        if bench.info["task_scoring"]["reason"]:
            bench.notes.append(f"zero-shot options scored as plain windows: {bench.info['task_scoring']['reason']}")
        bench.task_cache = PrefixCache(bench.model, units, pad, sorted(layers), bench.data.batch_tokens)
        ref = bench.task_cache.baseline
        bench.task_reference = outcomes(bench.tasks, ref.nll, ref.n_scored, ref.n_correct)


@dataclass
class Trial:
    """One perturbed evaluation: (W,) window NLLs, its record, and the zero-shot items' outcomes (or None)."""

    nll: np.ndarray
    record: dict
    tasks: dict | None = None  # task → downstream.ItemOutcomes


def trial(bench: Bench, ts: TargetSet, op, seed: int, also: tuple[str, ...] = (), tasks: bool = False) -> Trial:
    """``op`` applied to ``ts`` (``also``: parameters already perturbed by the caller); with ``tasks`` the run's
    zero-shot items are scored under the same perturbation."""
    own_seed = getattr(op, "seed", None) is not None  # random_bit_flip:seed=… keeps its own seed
    names = [*also, *ts]
    items = None
    with perturbed(bench.model, ts, op, seed=None if own_seed else seed) as rec:
        scores = bench.cache.score_params(names)
        if tasks and bench.task_cache is not None:
            from esa.perturb.protocols.downstream import outcomes

            t = bench.task_cache.score_params(names)
            items = outcomes(bench.tasks, t.nll, t.n_scored, t.n_correct)
    return Trial(scores.nll, {**rec.summary(), "start_layer": scores.start_layer, "full_forward": scores.full_forward,
                              "forward_seconds": scores.forward_seconds}, items)


def trials(bench: Bench, calls: list[tuple], tag: str) -> list[Trial]:
    """``trial(bench, ts, op, seed, tasks=True)`` for each ``(ts, op, seed)`` of ``calls``, in order. In a
    data-parallel run (:mod:`esa.core.parallel`) the trials are split between the replicas when each holds the
    whole prefix cache (fewer batches than replicas); otherwise each trial's batches are."""
    if any(c is not None and c.replicas > 1 for c in (bench.cache, bench.task_cache)):
        return [trial(bench, ts, op, seed, tasks=True) for ts, op, seed in calls]
    return parallel.units(tag, _trial_with_tasks, [(bench, *call) for call in calls])


def _trial_with_tasks(bench: Bench, ts: TargetSet, op, seed: int) -> Trial:
    return trial(bench, ts, op, seed, tasks=True)


def baseline_metrics(bench: Bench) -> dict:
    return perplexity_metrics(bench.cache.baseline, *scored_text_counts(bench.windows))


# ---- arms and comparisons ----------------------------------------------------------------------------------

@dataclass
class Arm:
    """One perturbed condition: (seed, targets) repeats under one op, averaged per window."""

    name: str
    sets: list[tuple[int, TargetSet]]
    op: Any
    source: str = ""  # how the elements were chosen
    nll: np.ndarray | None = None  # (W,) mean over repeats
    per_seed: np.ndarray | None = None  # (S, W)
    records: list[dict] = field(default_factory=list)
    task_outcomes: list[dict] = field(default_factory=list)  # per repeat: task → downstream.ItemOutcomes

    def run(self, bench: Bench) -> Arm:
        rows = []
        done = trials(bench, [(ts, self.op, seed) for seed, ts in self.sets], f"arm/{self.name}")
        for (seed, _), t in zip(self.sets, done):
            rows.append(t.nll)
            self.records.append({"seed": seed, **t.record})
            if t.tasks is not None:
                self.task_outcomes.append(t.tasks)
        self.per_seed = np.stack(rows)  # (S, W)
        with np.errstate(invalid="ignore"):
            self.nll = self.per_seed.mean(axis=0)
        return self

    def describe(self, model) -> dict:
        """JSON-ready: op, sizes, trial records, and the elements (per seed when each seed drew its own)."""
        first = self.sets[0][1]
        out = {"name": self.name, "op": self.op.describe(), "source": self.source, "n_elements": first.n_elements,
               "seeds": [s for s, _ in self.sets], "tensors": {n: int(i.numel()) for n, i in first.items()},
               "elements": first.to_frame(model).head(MAX_LISTED).to_dict("records"), "trials": self.records}
        if any(ts is not first for _, ts in self.sets):
            out["elements_by_seed"] = {str(s): ts.to_frame(model).head(MAX_LISTED).to_dict("records")
                                       for s, ts in self.sets}
        return out


def repeats(ts: TargetSet, op, seeds: tuple[int, ...], seed: int) -> list[tuple[int, TargetSet]]:
    """A stochastic op repeats once per control seed; a deterministic one runs once."""
    return [(s, ts) for s in seeds] if op.name in STOCHASTIC_OPS and seeds else [(seed, ts)]


def ratio(a: float, b: float) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(a) / np.float64(b))


def compare(bench: Bench, name: str, perturbed_nll, against_nll, against: str = "baseline") -> dict:
    """Paired statistics of ``perturbed_nll`` vs ``against_nll`` on the run's windows (+ the ΔNLL array)."""
    d = bench.data
    c = paired_compare(against_nll, perturbed_nll, bench.n_tokens, n_boot=d.n_boot, seed=d.seed,
                       collapse_ppl=d.collapse_ppl)
    return {"name": name, "against": against, **c.to_dict(), "ppl_ratio": ratio(c.ppl_perturbed, c.ppl_baseline),
            "delta_nll": c.delta_nll}


def adjust(comparisons: list[dict]) -> list[dict]:
    """Add Holm and BH adjusted Wilcoxon and t-test p-values across all ``comparisons`` (one family)."""
    for test in ("p_wilcoxon", "p_ttest"):
        p = [c[test] for c in comparisons]
        for suffix, fn in (("holm", holm), ("bh", benjamini_hochberg)):
            for c, q in zip(comparisons, fn(p) if p else []):
                c[f"{test}_{suffix}"] = float(q)
    return comparisons


def seed_spread(bench: Bench, arm: Arm) -> dict | None:
    """Mean ΔNLL of each repeat and their t-based CI across seeds (None for a single repeat)."""
    if len(arm.per_seed) < 2:
        return None
    means = [compare(bench, arm.name, row, bench.cache.baseline.nll)["mean_delta_nll"] for row in arm.per_seed]
    return {"seeds": [s for s, _ in arm.sets], "mean_delta_nll": means, **asdict(aggregate_seeds(means))}


def split_arrays(comparisons: list[dict]) -> tuple[list[dict], dict[str, np.ndarray]]:
    arrays = {"delta__" + re.sub(r"\W+", "_", c["name"]): c.pop("delta_nll") for c in comparisons}
    return comparisons, arrays


def header(bench: Bench, schema: str, cfg) -> dict:
    return {"schema": schema, "provenance": provenance(bench.lm.device, bench.lm.model),
            "model": bench.lm.fingerprint.to_dict(),
            "config": asdict(cfg), "data": bench.info, "baseline": baseline_metrics(bench)}


def base_arrays(bench: Bench) -> dict[str, np.ndarray]:
    b = bench.cache.baseline
    return {"window_index": np.asarray(bench.info["window_indices"]), "n_scored": b.n_scored, "baseline_nll": b.nll}


