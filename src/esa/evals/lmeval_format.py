"""ESA zero-shot results written in lm-evaluation-harness 0.4's output layout, for tools built for lm-eval.

lm-eval ``--output_path OUT --log_samples`` writes, per model, ``OUT/<model>/results_<date>.json`` and one
``samples_<task>_<date>.jsonl`` per task; tools find them by those names (``results_`` / ``samples_`` prefix,
the date after the last ``_``, the task between the first and the last ``_``). ESA writes the same files from
its stored rows, under ``<out-dir>/lm-eval/<model>/``, with one date for the whole export (the last stored
run's finish time, so an export of the same rows gets the same names; the export replaces older files there).

``results_<date>.json``::

    results[task]      {"name": task, "alias": task, "sample_len": n, "acc,none": 0.62, "acc_stderr,none": 0.03,
                        "acc_norm,none": …, "acc_norm_stderr,none": …}   (lambada: "perplexity,none", …)
    configs[task]      task, dataset_path (a local JSONL: "json" with dataset_kwargs.data_files, as lm-eval reads
                       it), the scored split, the lm-eval YAML's doc_to_text/doc_to_target/doc_to_choice…,
                       fewshot_config, output_type, num_fewshot 0, metric_list [{metric, aggregation,
                       higher_is_better}], metadata {version, ESA's source …}; None values left out, as lm-eval
    group_subtasks {}, versions, n-shot, higher_is_better, n-samples {original: split size, effective: scored},
    config             model "esa", model_args "pretrained=…,dtype=…,revision=…", limit, seeds, device …
    task_hashes, model_name, git_hash (ESA's), date, max_length, system_instruction/chat_template (None),
    total_evaluation_time_seconds

tests/evals/test_lmeval_layout_lmeval.py compares these files key by key with the ones lm-eval writes for the
same items and model, and lists the keys that cannot match (model wrapper, machine, time).

``,none`` is lm-eval's filter suffix (tasks without filters). A stderr lm-eval cannot compute (fewer than two
items) is ``"N/A"``, as lm-eval writes it. Non-finite numbers are JSON ``NaN``/``Infinity``, as lm-eval's
``json.dumps`` writes them (ESA's own files use "nan" strings).

A sample line (lm-eval ``--log_samples``, as its ``EvaluationTracker`` writes them)::

    {"doc_id": 17, "doc": {…the dataset row…}, "target": "1",
     "arguments": {"gen_args_0": {"arg_0": context, "arg_1": " continuation"}, …},   # one per option
     "resps": [[["-12.5", "False"]], …], "filtered_resps": [["-12.5", "False"], …],
     "filter": "none", "metrics": ["acc", "acc_norm"], "doc_hash": …, "prompt_hash": …, "target_hash": …,
     "acc": 1.0, "acc_norm": 0.0}

``resps``/``filtered_resps`` hold (log-likelihood, is_greedy) per option *as strings*, exactly as lm-eval
sanitises them (``str`` of a Python float round-trips: ``float(resps[i][0][0])`` is ESA's number bit for bit).
``doc_id`` is the row's index in the full split: ESA's ``--limit`` is a seeded subsample, not lm-eval's first N
rows, so the id names the real row (lm-eval's ``samples=`` mode does the same). ``doc`` is the dataset row
as ESA read it (local JSONL, hub split or generated rows); when the rows cannot be read again (a hub split not
in the cache) ``doc`` and ``arguments`` are empty and the scores are still written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from esa.core.errors import EsaError
from esa.evals.tasks import TARGET_DELIMITER, TASKS, TaskData, TaskItem, TaskSpec, load_task_data
from esa.evals.tasks.corpus import GENERATOR_VERSION, generate, is_corpus_task
from esa.evals.zeroshot import BOOTSTRAP_ITERS, ItemScore, TaskResult, items_stem

log = logging.getLogger(__name__)

FILTER = "none"  # lm-eval's filter name for tasks that define none; the suffix of every metric key
FEWSHOT_DELIMITER = "\n\n"  # lm-eval's default (unused at 0-shot, recorded as lm-eval records it)
# metadata.version of each task's YAML in lm-evaluation-harness 0.4.x (lm_eval/tasks/<task>/*.yaml)
TASK_VERSIONS = {"piqa": 1.0, "arc_easy": 1.0, "arc_challenge": 1.0, "hellaswag": 1.0, "boolq": 2.0,
                 "winogrande": 1.0, "lambada_openai": 1.0, "sciq": 1.0}
TORCH_DTYPES = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}  # lm-eval's names
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed (ESA draws no few-shot examples; recorded as lm-eval's)
_Q = "Question: {{question}}\nAnswer:"
_ARC = {"doc_to_text": _Q, "doc_to_target": "{{choices.label.index(answerKey)}}", "doc_to_choice": "{{choices.text}}",
        "should_decontaminate": True, "doc_to_decontamination_query": _Q}
_WINO = "!function preprocess_winogrande.doc_to_"
# The prompt fields of each task's lm-eval 0.4 YAML, which ESA's TaskSpec reproduces (tests/evals/
# test_zeroshot_lmeval.py: same log-likelihoods). A ``!function`` field is written as the YAML names it (lm-eval
# itself writes the function's source there). boolq's YAML gives its metric without aggregation/higher_is_better.
LMEVAL_PROMPTS: dict[str, dict] = {
    "piqa": {"doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "label",
             "doc_to_choice": "{{[sol1, sol2]}}", "should_decontaminate": True,
             "doc_to_decontamination_query": "goal"},
    "arc_easy": _ARC,
    "arc_challenge": _ARC,
    "hellaswag": {"process_docs": "!function utils.process_docs", "doc_to_text": "{{query}}",
                  "doc_to_target": "{{label}}", "doc_to_choice": "choices", "should_decontaminate": False},
    "boolq": {"doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:", "doc_to_target": "label",
              "doc_to_choice": ["no", "yes"], "should_decontaminate": True,
              "doc_to_decontamination_query": "passage", "metric_list": [{"metric": "acc"}]},
    "winogrande": {"doc_to_text": _WINO + "text", "doc_to_target": _WINO + "target",
                   "doc_to_choice": _WINO + "choice", "should_decontaminate": True,
                   "doc_to_decontamination_query": "sentence"},
    "lambada_openai": {"doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
                       "doc_to_target": "{{' '+text.split(' ')[-1]}}", "should_decontaminate": True,
                       "doc_to_decontamination_query": "{{text}}"},
    "sciq": {"doc_to_text": "{{support.lstrip()}}\nQuestion: {{question}}\nAnswer:", "doc_to_target": 3,
             "doc_to_choice": "{{[distractor1, distractor2, distractor3, correct_answer]}}",
             "should_decontaminate": True, "doc_to_decontamination_query": "{{support}} {{question}}"},
}


@dataclass(frozen=True)
class TaskExport:
    """One task's stored result plus what lm-eval's samples show of its inputs (None: not readable again)."""

    result: TaskResult
    spec: TaskSpec
    items: tuple[TaskItem, ...] | None  # the scored items' prompts, in result.items order
    docs: tuple[dict, ...] | None  # the scored items' dataset rows, same order


def hash_string(text: str) -> str:
    """lm-eval's ``hash_string``: sha256 hex digest of the UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sanitize_model_name(name: str) -> str:
    """lm-eval's folder name for a model: its last two path parts, separators as ``__``."""
    parts = name.rstrip("/").split("/")
    return re.sub(r"[\"<>:/|\\?*\[\]]+", "__", "/".join(parts[-2:]))


def date_id(finished_at: str) -> str:
    """lm-eval's file date (``isoformat`` with ``-`` for ``:``) of a stored UTC time:
    ``2025-01-02T03:04:05.678+00:00`` → ``2025-01-02T03-04-05.678000``."""
    return datetime.fromisoformat(finished_at).replace(tzinfo=None).isoformat(timespec="microseconds").replace(":", "-")


# ------------------------------------------------------------------------------------------- inputs
def _raw_rows(spec: TaskSpec, data_path: str | None) -> list[dict]:
    """Every row of the split, as :func:`esa.evals.tasks.load_task_data` read them (same indices)."""
    if data_path is not None:
        lines = Path(data_path).expanduser().read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    if is_corpus_task(spec.name):
        return generate(spec.name).rows
    import datasets

    try:
        return [dict(r) for r in datasets.load_dataset(spec.hub_path, spec.hub_config, split=spec.split)]
    except Exception as exc:  # datasets raises many types; load_task_data read it a moment ago, so rare
        raise EsaError(f"{spec.hub_path}: {type(exc).__name__}: {exc}") from exc


def task_export(result: TaskResult, data_path: str | None, limit: int | None, seed: int) -> TaskExport:
    """Read a task's items again (prompts and rows) for its samples; without them when they are not readable
    or no longer the scored ones (a changed file: its item ids differ)."""
    ids = [s.item_id for s in result.items]
    try:
        data: TaskData = load_task_data(result.task, data_path, limit, seed)
        rows = _raw_rows(data.task, data_path)
    except (EsaError, OSError, ValueError) as exc:
        log.warning("lm-eval samples of %s without doc/arguments: its rows are not readable (%s)", result.task, exc)
        return TaskExport(result, TASKS.get(result.task), None, None)
    if [it.item_id for it in data.items] != ids or len(rows) != data.n_total:
        log.warning("lm-eval samples of %s without doc/arguments: its rows changed since scoring", result.task)
        return TaskExport(result, data.task, None, None)
    return TaskExport(result, data.task, data.items, tuple(rows[i] for i in ids))


# ------------------------------------------------------------------------------------- per task
def output_type(spec: TaskSpec) -> str:
    return "loglikelihood" if spec.kind == "greedy" else "multiple_choice"


def metric_key(metric: str) -> str:
    return f"{metric},{FILTER}"


def aggregated(result: TaskResult, spec: TaskSpec) -> dict:
    """``results[task]``: every metric and its stderr under lm-eval's ``metric,filter`` keys."""
    out: dict = {"name": result.task, "alias": result.task, "sample_len": len(result.items)}
    for metric in spec.metrics:
        se = result.metrics.get(f"{metric}_stderr")
        out[metric_key(metric)] = result.metrics[metric]
        out[f"{metric}_stderr,{FILTER}"] = "N/A" if se is None else se
    return out


def _dataset(spec: TaskSpec, source: str | None) -> dict:
    """Where lm-eval would read the scored split: a local JSONL as lm-eval's ``json`` builder with that file
    (what ``dataset_path: json`` + ``dataset_kwargs.data_files`` mean), else the hub dataset."""
    if source and source.startswith("file:"):
        return {"dataset_path": "json", "dataset_kwargs": {"data_files": {spec.split: source.removeprefix("file:")}}}
    return {"dataset_path": spec.hub_path, "dataset_name": spec.hub_config}


def _fewshot_config(prompts: dict) -> dict:
    """lm-eval's ``fewshot_config`` of a task without a few-shot split (unused at 0-shot, written as lm-eval does)."""
    return {"sampler": "default", "split": None, "process_docs": prompts.get("process_docs"),
            "fewshot_indices": None, "samples": None, "doc_to_text": prompts.get("doc_to_text"),
            "doc_to_choice": prompts.get("doc_to_choice"), "doc_to_target": prompts.get("doc_to_target"),
            "gen_prefix": None, "fewshot_delimiter": FEWSHOT_DELIMITER, "target_delimiter": TARGET_DELIMITER}


def task_config(export: TaskExport) -> dict:
    """``configs[task]``: where the data is from, the lm-eval YAML's prompt fields, how it is scored, which
    metrics; ESA's source in metadata. None values are left out, as lm-eval's ``TaskConfig.to_dict`` does."""
    spec, cfg = export.spec, export.result.config
    prompts = dict(LMEVAL_PROMPTS.get(spec.name, {}))
    metric_list = [dict(m) for m in prompts.pop("metric_list", [])] or [
        {"metric": m, "aggregation": "perplexity" if m == "perplexity" else "mean",
         "higher_is_better": m != "perplexity"} for m in spec.metrics]
    split_key = "test_split" if spec.split == "test" else "validation_split"
    out = {"task": spec.name, **_dataset(spec, cfg.get("source")), split_key: spec.split,
           "should_decontaminate": False, **prompts, "unsafe_code": False, "description": "",
           "target_delimiter": TARGET_DELIMITER, "fewshot_delimiter": FEWSHOT_DELIMITER,
           "fewshot_config": _fewshot_config(prompts), "num_fewshot": 0, "metric_list": metric_list,
           "output_type": output_type(spec), "repeats": 1,
           "metadata": {"version": task_version(spec.name), "esa_source": cfg.get("source"),
                        "esa_limit": cfg.get("limit"), "esa_seed": cfg.get("seed"),
                        **({"esa_generator": cfg["generator"]} if cfg.get("generator") else {})}}
    return {k: v for k, v in out.items() if v is not None}


def task_version(task: str) -> float:
    """The lm-eval YAML's version; a corpus-derived task's generator version."""
    return float(GENERATOR_VERSION) if is_corpus_task(task) else TASK_VERSIONS.get(task, 1.0)


def _target(spec: TaskSpec, item: TaskItem | None, score: ItemScore) -> str:
    """lm-eval's ``doc_to_target``, as a string: the gold index (multiple choice), the shared suffix
    (partial scoring, winogrande) or the scored continuation (lambada)."""
    if item is None:
        return str(score.gold)
    p = item.prompt
    if spec.kind == "greedy":
        return p.continuations[0]
    if len(set(p.contexts)) > 1:  # partial scoring: the options are the contexts
        return p.continuations[0].removeprefix(TARGET_DELIMITER)
    return str(p.gold)


def _sample_metrics(spec: TaskSpec, score: ItemScore) -> dict:
    """lm-eval's ``process_results`` per item: 1.0/0.0 (multiple choice); lambada: its log-likelihood as
    ``perplexity`` (aggregated by exp(-mean)) and ``acc`` 1/0 for a greedy match."""
    if spec.kind == "greedy":
        return {"perplexity": score.loglikelihoods[0], "acc": int(score.correct)}
    out = {"acc": 1.0 if score.correct else 0.0}
    if "acc_norm" in spec.metrics:
        out["acc_norm"] = 1.0 if score.correct_norm else 0.0
    return out


def sample(spec: TaskSpec, score: ItemScore, item: TaskItem | None, doc: dict | None) -> dict:
    """One ``samples_<task>`` line (see the module docstring)."""
    pairs = list(zip(item.prompt.contexts, item.prompt.continuations)) if item is not None else []
    resps = [(str(ll), str(g)) for ll, g in zip(score.loglikelihoods, score.is_greedy)]
    target = _target(spec, item, score)
    metrics = _sample_metrics(spec, score)
    return {"doc_id": score.item_id, "doc": doc or {}, "target": target,
            "arguments": {f"gen_args_{i}": {"arg_0": c, "arg_1": k} for i, (c, k) in enumerate(pairs)},
            "resps": [[list(r)] for r in resps], "filtered_resps": [list(r) for r in resps], "filter": FILTER,
            "metrics": list(metrics),
            "doc_hash": hash_string(json.dumps(doc or {}, indent=2, ensure_ascii=False, default=str)),
            "prompt_hash": hash_string(pairs[0][0] if pairs else ""), "target_hash": hash_string(target),
            **metrics}


def samples(export: TaskExport) -> list[dict]:
    items = export.items or (None,) * len(export.result.items)
    docs = export.docs or (None,) * len(export.result.items)
    return [sample(export.spec, s, it, d) for s, it, d in zip(export.result.items, items, docs)]


# --------------------------------------------------------------------------------------- document
def run_config(model: dict, spec: dict, limit: int | None, seed: int, device: str | None) -> dict:
    """lm-eval's ``config`` block from a stored run's model fingerprint and ModelSpec (``model``/``spec``)."""
    model_id, dtype = model.get("model_id") or spec.get("name"), spec.get("dtype") or model.get("dtype")
    return {"model": "esa", "model_args": f"pretrained={model_id},dtype={dtype},revision={model.get('revision')}",
            "model_num_parameters": model.get("n_params"), "model_dtype": TORCH_DTYPES.get(dtype, dtype),
            "model_revision": model.get("revision"), "model_sha": model.get("revision"), "batch_size": None,
            "batch_sizes": [], "device": device, "use_cache": None, "limit": limit,
            "bootstrap_iters": BOOTSTRAP_ITERS, "gen_kwargs": None, "random_seed": seed, "numpy_seed": seed,
            "torch_seed": seed, "fewshot_seed": FEWSHOT_SEED,
            "esa_limit_semantics": "a seeded random subsample of limit rows (esa.evals.tasks.subsample)"}


def results_document(exports: list[TaskExport], config: dict, task_samples: dict[str, list[dict]],
                     extra: dict) -> dict:
    """The whole ``results_<date>.json`` (see the module docstring); ``extra``: top-level provenance."""
    tasks = [e.result.task for e in exports]
    by_task = {e.result.task: e for e in exports}
    hashes = {t: hash_string("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in task_samples[t]))
              for t in tasks}
    return {"results": {t: aggregated(by_task[t].result, by_task[t].spec) for t in tasks},
            "group_subtasks": {},  # lm-eval 0.4 lists groups here; ESA's tasks are never grouped
            "configs": {t: task_config(by_task[t]) for t in sorted(tasks)},
            "versions": {t: task_version(t) for t in sorted(tasks)},
            "n-shot": {t: 0 for t in sorted(tasks)},
            "higher_is_better": {t: {m: m != "perplexity" for m in by_task[t].spec.metrics} for t in sorted(tasks)},
            "n-samples": {t: {"original": by_task[t].result.config["n_total"],
                              "effective": by_task[t].result.config["n"]} for t in tasks},
            "config": config, "task_hashes": hashes, **extra}


def provenance_fields(model_name: str, provenance: dict, finished_at: str, seconds: float, max_length) -> dict:
    """lm-eval's top-level provenance keys, from a stored run's provenance (``git_hash`` is ESA's)."""
    return {"model_source": "esa", "model_name": model_name, "model_name_sanitized": sanitize_model_name(model_name),
            "git_hash": provenance.get("git_sha"), "esa_version": provenance.get("esa_version"),
            "transformers_version": (provenance.get("libraries") or {}).get("transformers"),
            "date": datetime.fromisoformat(finished_at).timestamp(), "max_length": max_length,
            # zero-shot, plain text: no system instruction, no chat template (and so no multi-turn few-shot)
            "system_instruction": None, "system_instruction_sha": None, "fewshot_as_multiturn": None,
            "chat_template": None, "chat_template_sha": None, "total_evaluation_time_seconds": str(seconds)}


def write_lmeval(folder: Path, exports: list[TaskExport], config: dict, stamp: str, extra: dict) -> dict:
    """Write ``results_<stamp>.json`` and ``samples_<task>_<stamp>.jsonl`` into ``folder`` (ESA's: older
    results/samples files there are removed first). Returns {"results": path, "samples": {task: path}}."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("results_*.json"), *folder.glob("samples_*.jsonl")]:
        old.unlink()
    task_samples = {e.result.task: samples(e) for e in exports}
    written = {}
    for task, lines in task_samples.items():
        path = folder / f"samples_{items_stem(task)}_{stamp}.jsonl"
        path.write_text("".join(json.dumps(s, ensure_ascii=False, default=str) + "\n" for s in lines),
                        encoding="utf-8")
        written[task] = path
    doc = results_document(exports, config, task_samples, extra)
    results = folder / f"results_{stamp}.json"
    results.write_text(json.dumps(doc, indent=2, ensure_ascii=False), encoding="utf-8")
    return {"results": results, "samples": written}
