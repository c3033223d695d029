"""Honest baselines: perplexity family, token accuracy, throughput and memory per (model, dataset, context, seed).

A run evaluates one model on every requested dataset × context length × seed and writes a run directory::

    <out>/<model-slug>/manifest.json    resolved config, provenance, model fingerprint
    <out>/<model-slug>/results.json     one entry per (dataset, ctx, seed) + seed aggregates (schema below)
    <out>/<model-slug>/per_window/<dataset>__ctx<T>__seed<S>.npz   nll, n_scored, n_correct, window_index

``results.json`` schema ``esa.baseline.v1``: ``{"schema", "model", "profile", "entries": [...],
"aggregates": [...], "warnings": [...]}``; an entry holds dataset, corpus_source, context_len, method, stride,
bos, seed, seed_invariant, windows_available, long_context, metrics (see
:func:`esa.evals.perplexity.perplexity_metrics`), peak_memory, mfu, sanity and per_window_file. Non-finite
numbers are stored as the strings ``"nan"``/``"inf"``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path


from esa.data.corpora import Corpus, for_method, load_corpus
from esa.data.windows import corpus_windows, scored_text_counts, select_windows
from esa.errors import EsaError
from esa.evals.perplexity import evaluate_windows, perplexity_metrics
from esa.evals.resources import mfu, peak_memory, reset_peak_memory
from esa.models import LoadedModel, ModelSpec, check_context, load_model, pad_id
from esa.provenance import provenance
from esa.runs import staged_run_dir, write_arrays, write_json
from esa.sanity import repetition_rate, sanity_warnings
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
        if self.profile not in PROFILES:
            raise EsaError(f"unknown --baseline profile {self.profile!r}; choose one of {', '.join(PROFILES)}")
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
class _Entry:
    """One evaluated (dataset, ctx, seed) cell, as stored in results.json."""

    dataset: str
    corpus_source: str
    context_len: int
    method: str
    stride: int | None
    bos: str
    seed: int
    seed_invariant: bool
    windows_available: int
    long_context: bool
    metrics: dict
    peak_memory: dict
    mfu: float | None
    sanity: dict
    per_window_file: str
    warnings: list[str] = field(default_factory=list)


def evaluate_cell(lm: LoadedModel, corpus: Corpus, cfg: BaselineConfig, ctx: int, seed: int,
                  run_dir: Path, long_context: bool = False) -> _Entry:
    """Evaluate one (dataset, ctx, seed) cell and save its per-window arrays."""
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
    rel = f"per_window/{model_slug(corpus.name)}__ctx{ctx}__seed{seed}.npz"
    write_arrays(run_dir / rel, nll=scores.nll, n_scored=scores.n_scored, n_correct=scores.n_correct,
                 window_index=sel.indices)
    return _Entry(corpus.name, corpus.source, ctx, cfg.method, cfg.stride, ws.bos, seed, sel.seed_invariant,
                  sel.available_windows, long_context, metrics, peak_memory(lm.device),
                  mfu(lm.fingerprint.n_params, metrics["tokens_per_second"] or 0.0, lm.device),
                  {"repetition_rate": rep, "warnings": warnings}, rel, warnings)


AGGREGATE_SCALES = {"perplexity": "log", "token_accuracy": "linear", "bits_per_byte": "linear"}  # aggregate_seeds


def _mean_ci(values: list[float], scale: str) -> dict:
    """{"mean", "ci95", "scale"}: :func:`esa.stats.aggregate_seeds` across seeds; ci95 None without a CI
    (one seed, or a non-finite seed)."""
    agg = aggregate_seeds(values, scale=scale)
    ci = None if math.isnan(agg.ci_low) else [agg.ci_low, agg.ci_high]
    return {"mean": agg.mean, "ci95": ci, "scale": scale}


def aggregate(entries: list[_Entry]) -> list[dict]:
    """Per (dataset, ctx): centre and t-based 95 % CI across seeds for perplexity, token accuracy and bits per
    byte. Perplexity is aggregated on the log scale (``scale: "log"``): its ``mean`` is the geometric mean across
    seeds and its CI the exponentiated t-interval of log perplexity, so both bounds are positive."""
    groups: dict[tuple, list[_Entry]] = {}
    for e in entries:
        groups.setdefault((e.dataset, e.context_len, e.method, e.long_context), []).append(e)
    out = []
    for (dataset, ctx, method, long_ctx), cell in groups.items():
        row = {"dataset": dataset, "context_len": ctx, "method": method, "long_context": long_ctx,
               "seeds": [e.seed for e in cell], "seed_invariant": all(e.seed_invariant for e in cell),
               "scored_tokens": [e.metrics["scored_tokens"] for e in cell]}
        for key, scale in AGGREGATE_SCALES.items():
            row[key] = _mean_ci([e.metrics[key] for e in cell], scale)
        out.append(row)
    return out


def run_model(spec: ModelSpec, cfg: BaselineConfig, out_dir: Path, overwrite: bool) -> Path:
    """Evaluate one model over the config's grid; returns its run directory (replaced only on success)."""
    final = Path(out_dir) / model_slug(spec.name)
    with staged_run_dir(final, overwrite) as run_dir:
        lm = load_model(spec)
        for ctx in cfg.context_lens + cfg.long_context:
            check_context(lm, ctx)
        corpora = [load_corpus(name, cfg.method) for name in cfg.datasets]
        tasks = _load_tasks(cfg)  # before any scoring, so missing task data fails fast
        entries = _evaluate_grid(lm, corpora, cfg, run_dir)
        zeroshot = _evaluate_tasks(lm, tasks, cfg, run_dir)
        manifest = {"config": asdict(cfg), "model": lm.fingerprint.to_dict(), "provenance": provenance(lm.device)}
        results = {"schema": SCHEMA, "model": lm.fingerprint.to_dict(), "profile": cfg.profile,
                   "entries": [asdict(e) for e in entries], "aggregates": aggregate(entries),
                   "zeroshot": zeroshot,
                   "warnings": [f"{e.dataset} ctx={e.context_len} seed={e.seed}: {w}" for e in entries
                                for w in e.warnings]}
        write_json(run_dir / "manifest.json", manifest)
        write_json(run_dir / "results.json", results)
    return final


def _load_tasks(cfg: BaselineConfig) -> list:
    from esa.evals.tasks import load_task_data

    paths = dict(cfg.task_data)
    unknown = sorted(set(paths) - set(cfg.eval_suites))
    if unknown:
        raise EsaError(f"--task-data names {', '.join(unknown)}, which is not in --eval-suites")
    return [load_task_data(t, paths.get(t), cfg.zeroshot_limit, cfg.seeds[0]) for t in cfg.eval_suites]


def _evaluate_tasks(lm: LoadedModel, tasks: list, cfg: BaselineConfig, run_dir: Path) -> dict:
    """Zero-shot metrics per task; per-item scores go to ``zeroshot/<task>.items.jsonl`` for pairing."""
    from esa.evals.zeroshot import evaluate_task

    out = {}
    for data in tasks:
        result = evaluate_task(lm.model, lm.tokenizer, data, token_budget=cfg.batch_tokens)
        rel = f"zeroshot/{result.task}.items.jsonl"
        (run_dir / "zeroshot").mkdir(exist_ok=True)
        (run_dir / rel).write_text("".join(json.dumps(asdict(s)) + "\n" for s in result.items))
        out[result.task] = {"metrics": result.metrics, "config": result.config, "items_file": rel}
    return out


def _evaluate_grid(lm: LoadedModel, corpora: list[Corpus], cfg: BaselineConfig, run_dir: Path) -> list[_Entry]:
    entries: list[_Entry] = []
    for corpus in corpora:
        for ctx in cfg.context_lens:
            for seed in cfg.seeds:
                entry = evaluate_cell(lm, corpus, cfg, ctx, seed, run_dir)
                entries.append(entry)
                if entry.seed_invariant:  # whole split evaluated: other seeds would repeat it exactly
                    break
        for ctx in cfg.long_context:
            entries.append(evaluate_cell(lm, corpus, cfg, ctx, cfg.seeds[0], run_dir, long_context=True))
    return entries


def run_baseline(cfg: BaselineConfig, models: list[str], out_dir: Path, overwrite: bool = False) -> list[Path]:
    """Run the baseline for each model name; returns the run directories."""
    cfg = cfg.resolved()
    return [run_model(ModelSpec(m, cfg.model.dtype, cfg.model.device, cfg.model.revision,
                                cfg.model.trust_remote_code, cfg.model.allow_pickle), cfg, out_dir, overwrite)
            for m in models]
