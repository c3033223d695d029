"""Honest baselines: perplexity family, token accuracy, throughput and memory per (model, dataset, context, seed).

:func:`score_cell` evaluates one (dataset, ctx, seed) cell; the run kinds ``baseline`` and ``long_context``
(:mod:`esa.kinds.baseline`) execute it and store :func:`cell_metrics` and the per-window arrays. ``esa baseline``
runs those kinds as a one-off study and exports each model's stored rows (:func:`export_run_dir`) to a run
directory::

    <out>/<model-slug>/manifest.json    resolved config, provenance, model fingerprint
    <out>/<model-slug>/results.json     one entry per (dataset, ctx, seed) + seed aggregates (schema below)
    <out>/<model-slug>/per_window/<dataset>__ctx<T>__seed<S>.npz   nll, n_scored, n_correct, window_index
    <out>/<model-slug>/zeroshot/<task>.items.jsonl                 one ItemScore per scored item

``results.json`` schema ``esa.baseline.v1``: ``{"schema", "model", "profile", "entries": [...],
"aggregates": [...], "zeroshot": {...}, "warnings": [...]}``; an entry holds dataset, corpus_source,
context_len, method, stride, bos, seed, seed_invariant, windows_available, long_context, metrics (see
:func:`esa.evals.perplexity.perplexity_metrics`), peak_memory, mfu, sanity, per_window_file, corpus_revision
(the hub dataset's commit, or null) and corpus_sha256 (:meth:`Corpus.sha256` of the text the method read; the
stored run's metrics hold both too). Non-finite numbers are stored as the strings ``"nan"``/``"inf"``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from esa.data.corpora import Corpus, for_method
from esa.data.windows import corpus_windows, scored_text_counts, select_windows
from esa.core.errors import EsaError
from esa.evals.perplexity import evaluate_windows, perplexity_metrics
from esa.evals.resources import mfu, peak_memory, reset_peak_memory
from esa.models import LoadedModel, ModelSpec, pad_id
from esa.core.registry import suggest
from esa.core.files import as_float, staged_run_dir, write_arrays, write_json
from esa.evals.sanity import repetition_rate, sanity_warnings
from esa.stats import aggregate_seeds

log = logging.getLogger(__name__)
SCHEMA = "esa.baseline.v1"


@dataclass(frozen=True)
class Profile:
    """Token budgets of a baseline profile (``None`` = the whole split: seed-invariant)."""

    description: str
    datasets: tuple[str, ...]
    context_lens: tuple[int, ...]
    seeds: tuple[int, ...]
    max_eval_tokens: int | None  # scored tokens per (dataset, ctx, seed)
    batch_tokens: int  # micro-batch token budget


PROFILES = {
    "smoke": Profile("minutes on a GPU: 64k scored tokens per dataset×ctx×seed", ("wikitext-2",), (2048,),
                     (0,), 65_536, 32_768),
    "standard": Profile("tens of minutes on a GPU: 1M scored tokens per dataset×ctx×seed", ("wikitext-2", "c4"),
                        (512, 2048, 4096), (0, 1, 2), 1_048_576, 65_536),
    "extended": Profile("the whole split at each ctx (seed-invariant) + long context + zero-shot suites",
                        ("wikitext-2", "c4"), (512, 2048, 4096), (0,), None, 65_536),
}


SUITE_ALIASES = {"arc_e": "arc_easy", "arc_c": "arc_challenge", "lambada": "lambada_openai"}


@dataclass(frozen=True)
class BaselineConfig:
    """Everything that determines a baseline run (stored resolved in manifest.json)."""

    model: ModelSpec
    profile: str = "smoke"
    datasets: tuple[str, ...] = ()  # empty → the profile's
    context_lens: tuple[int, ...] = ()  # empty → the profile's
    seeds: tuple[int, ...] = ()  # empty → the profile's
    method: str = "chunks"  # chunks | gptq | rolling | sliding (esa.data.windows)
    stride: int | None = None  # sliding only
    bos: str = "auto"  # auto | always | never
    max_eval_tokens: int | None = -1  # -1 → the profile's; None → whole split
    batch_tokens: int = 0  # 0 → the profile's
    long_context: tuple[int, ...] = ()  # extra lengths evaluated at batch size 1
    eval_suites: tuple[str, ...] = ()  # zero-shot tasks (esa.evals.zeroshot); seed-plan aliases arc_e, arc_c
    task_data: tuple[tuple[str, str], ...] = ()  # (task, local JSONL in the dataset's schema) for offline runs
    zeroshot_limit: int | None = None  # items per task (seeded subsample by the first seed); None = all

    def resolved(self) -> BaselineConfig:
        """Every empty field filled from the profile; zero-shot task names canonical (``arc_e`` → ``arc_easy``)."""
        if self.profile not in PROFILES:
            raise EsaError("--baseline: " + suggest(self.profile, list(PROFILES), "profile"))
        p = PROFILES[self.profile]
        return BaselineConfig(
            self.model, self.profile, self.datasets or p.datasets, self.context_lens or p.context_lens,
            self.seeds or p.seeds, self.method, self.stride, self.bos,
            p.max_eval_tokens if self.max_eval_tokens == -1 else self.max_eval_tokens,
            self.batch_tokens or p.batch_tokens, self.long_context,
            tuple(SUITE_ALIASES.get(t, t) for t in self.eval_suites),
            tuple((SUITE_ALIASES.get(t, t), path) for t, path in self.task_data), self.zeroshot_limit)


def model_slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name if "/" in name and Path(name).exists() else name)


@dataclass
class Entry:
    """One evaluated (dataset, ctx, seed) cell, as stored in results.json."""

    dataset: str
    corpus_source: str
    context_len: int
    method: str
    stride: int | None
    bos: str  # as resolved for the model: always | never
    seed: int
    seed_invariant: bool
    windows_available: int
    long_context: bool
    metrics: dict  # esa.evals.perplexity.perplexity_metrics
    peak_memory: dict
    mfu: float | None
    sanity: dict
    per_window_file: str
    warnings: list[str] = field(default_factory=list)
    corpus_revision: str | None = None  # hub: the dataset commit datasets resolved; None for local text
    corpus_sha256: str | None = None  # Corpus.sha256 of the text read (None in runs stored before it was kept)


def per_window_file(dataset: str, ctx: int, seed: int) -> str:
    """Where a cell's per-window arrays go in a run directory."""
    return f"per_window/{model_slug(dataset)}__ctx{ctx}__seed{seed}.npz"


def score_cell(lm: LoadedModel, corpus: Corpus, cfg: BaselineConfig, ctx: int, seed: int,
               long_context: bool = False) -> tuple[Entry, dict[str, np.ndarray]]:
    """Evaluate one (dataset, ctx, seed) cell: its entry and per-window arrays ``nll``, ``n_scored``,
    ``n_correct``, ``window_index`` (W,) each. A long-context cell runs one window per forward (budget = ctx)."""
    tok = lm.tokenizer
    corpus = for_method(corpus, cfg.method)  # gptq / lm-eval rolling read their own rows
    ws = corpus_windows(tok, corpus, cfg.method, ctx, stride=cfg.stride, bos=cfg.bos)
    sel = select_windows(ws, cfg.max_eval_tokens, seed)
    windows = sel.windows.windows
    n_bytes, n_words = scored_text_counts(windows)  # on the source text the scored tokens cover
    reset_peak_memory(lm.device)
    budget = ctx if long_context else cfg.batch_tokens
    pad = pad_id(tok, lm.model)
    scores = evaluate_windows(lm.model, windows, pad, budget, f"{corpus.name} ctx={ctx} seed={seed}")
    metrics = perplexity_metrics(scores, n_bytes, n_words)
    rep = repetition_rate([w.input_ids[w.scored] for w in windows])
    warnings = sanity_warnings(rep, metrics["perplexity"], metrics["token_accuracy"])
    if scores.n_nonfinite:
        warnings.append(f"{scores.n_nonfinite} window(s) had non-finite loss (kept in the totals)")
    arrays = {"nll": scores.nll, "n_scored": scores.n_scored, "n_correct": scores.n_correct,
              "window_index": sel.indices}
    entry = Entry(corpus.name, corpus.source, ctx, cfg.method, cfg.stride, ws.bos, seed, sel.seed_invariant,
                  sel.available_windows, long_context, metrics, peak_memory(lm.device),
                  mfu(lm.fingerprint.n_params, metrics["tokens_per_second"] or 0.0, lm.device),
                  {"repetition_rate": rep, "warnings": warnings}, per_window_file(corpus.name, ctx, seed), warnings,
                  corpus.revision, corpus.sha256())
    return entry, arrays


def evaluate_cell(lm: LoadedModel, corpus: Corpus, cfg: BaselineConfig, ctx: int, seed: int,
                  run_dir: Path, long_context: bool = False) -> Entry:
    """:func:`score_cell`, with the per-window arrays saved under ``run_dir / entry.per_window_file``."""
    entry, arrays = score_cell(lm, corpus, cfg, ctx, seed, long_context)
    write_arrays(Path(run_dir) / entry.per_window_file, **arrays)
    return entry


# ------------------------------------------------------------------------------- stored cells and back
EXTRA_METRICS = ("corpus_source", "bos_resolved", "seed_invariant", "windows_available", "peak_memory", "mfu",
                 "sanity", "long_context", "corpus_revision", "corpus_sha256")  # a stored cell's, beside the ppl ones


def cell_metrics(entry: Entry) -> dict:
    """The metrics a ``baseline`` run stores for a cell: the perplexity metrics and the entry's own fields
    (the ``long_context`` kind adds ``long_context: true``)."""
    return {**entry.metrics, "corpus_source": entry.corpus_source, "bos_resolved": entry.bos,
            "seed_invariant": entry.seed_invariant, "windows_available": entry.windows_available,
            "peak_memory": entry.peak_memory, "mfu": entry.mfu, "sanity": entry.sanity,
            "corpus_revision": entry.corpus_revision, "corpus_sha256": entry.corpus_sha256}


def stored_entry(config: dict, metrics: dict) -> Entry:
    """:func:`cell_metrics`' inverse: the entry of a stored ``baseline`` or ``long_context`` run (its run config
    and metrics). The entry's warnings are its sanity warnings, as :func:`score_cell` makes them."""
    m = metrics
    ctx, seed = config["context_len"], config["seed"]
    return Entry(config["dataset"], m["corpus_source"], ctx, config["method"], config["stride"], m["bos_resolved"],
                 seed, m["seed_invariant"], m["windows_available"], bool(m.get("long_context")),
                 {k: v for k, v in m.items() if k not in EXTRA_METRICS}, m["peak_memory"], m["mfu"], m["sanity"],
                 per_window_file(config["dataset"], ctx, seed), list(m["sanity"]["warnings"]),
                 m.get("corpus_revision"), m.get("corpus_sha256"))


def grid_order(cells: list[tuple[Entry, dict]], cfg: BaselineConfig) -> list[tuple[Entry, dict]]:
    """(entry, arrays) pairs in results order — per dataset: context × seed, then the long contexts — keeping
    only the first seed of a cell that scored the whole split (the other seeds would repeat it exactly)."""
    by = {(e.dataset, e.context_len, e.seed, e.long_context): (e, a) for e, a in cells}
    out = []
    for dataset in cfg.datasets:
        for ctx in cfg.context_lens:
            for seed in cfg.seeds:
                cell = by.get((dataset, ctx, seed, False))
                out += [cell] if cell else []
                if cell and cell[0].seed_invariant:
                    break
        out += [by[k] for k in ((dataset, ctx, cfg.seeds[0], True) for ctx in cfg.long_context) if k in by]
    return out


AGGREGATE_SCALES = {"perplexity": "log", "token_accuracy": "linear", "bits_per_byte": "linear"}  # aggregate_seeds


def _mean_ci(values: list[float], scale: str) -> dict:
    """{"mean", "ci95", "scale"}: :func:`esa.stats.aggregate_seeds` across seeds; ci95 None without a CI
    (one seed, or a non-finite seed)."""
    agg = aggregate_seeds(values, scale=scale)
    ci = None if math.isnan(agg.ci_low) else [agg.ci_low, agg.ci_high]
    return {"mean": agg.mean, "ci95": ci, "scale": scale}


def aggregate(entries: list[Entry]) -> list[dict]:
    """Per (dataset, ctx): centre and t-based 95 % CI across seeds for perplexity, token accuracy and bits per
    byte. Perplexity is aggregated on the log scale (``scale: "log"``): its ``mean`` is the geometric mean across
    seeds and its CI the exponentiated t-interval of log perplexity, so both bounds are positive."""
    groups: dict[tuple, list[Entry]] = {}
    for e in entries:
        groups.setdefault((e.dataset, e.context_len, e.method, e.long_context), []).append(e)
    out = []
    for (dataset, ctx, method, long_ctx), cell in groups.items():
        row = {"dataset": dataset, "context_len": ctx, "method": method, "long_context": long_ctx,
               "seeds": [e.seed for e in cell], "seed_invariant": all(e.seed_invariant for e in cell),
               "scored_tokens": [e.metrics["scored_tokens"] for e in cell]}
        for key, scale in AGGREGATE_SCALES.items():
            row[key] = _mean_ci([as_float(e.metrics[key]) for e in cell], scale)
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------------ export
def export_run_dir(final: Path, cfg: BaselineConfig, cells: list[tuple[Entry, dict]], tasks: list,
                   fingerprint: dict, provenance: dict) -> Path:
    """Write one model's run directory (schema above) from its stored rows; ``final`` is replaced only once the
    new one is complete.

    Args:
        cfg: the resolved config, its ``model`` this model's spec (stored as the manifest's ``config``).
        cells: (entry, per-window arrays) of every stored cell, any order (:func:`grid_order` orders them).
        tasks: the zero-shot :class:`~esa.evals.zeroshot.TaskResult` of each of ``cfg.eval_suites``, in order.
        fingerprint, provenance: the model's fingerprint and the provenance stored with its runs.
    """
    cells = grid_order(cells, cfg)
    entries = [e for e, _ in cells]
    with staged_run_dir(Path(final), overwrite=True) as run_dir:  # the database is the record: replace exports
        for entry, arrays in cells:
            write_arrays(run_dir / entry.per_window_file, **arrays)
        zeroshot = {}
        for result in tasks:
            rel = f"zeroshot/{result.task}.items.jsonl"
            (run_dir / "zeroshot").mkdir(exist_ok=True)
            (run_dir / rel).write_text("".join(json.dumps(asdict(s)) + "\n" for s in result.items))
            zeroshot[result.task] = {"metrics": result.metrics, "config": result.config, "items_file": rel}
        results = {"schema": SCHEMA, "model": fingerprint, "profile": cfg.profile,
                   "entries": [asdict(e) for e in entries], "aggregates": aggregate(entries), "zeroshot": zeroshot,
                   "warnings": [f"{e.dataset} ctx={e.context_len} seed={e.seed}: {w}" for e in entries
                                for w in e.warnings]}
        write_json(run_dir / "manifest.json", {"config": asdict(cfg), "model": fingerprint,
                                               "provenance": provenance})
        write_json(run_dir / "results.json", results)
    return Path(final)
