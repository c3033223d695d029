"""Cross-check ``esa.evals.zeroshot`` against lm-evaluation-harness 0.4.x on the same model and items.

For every task, lm-eval's *own* task config is loaded with its dataset swapped for a local JSONL
(``dataset_path="json"``) — so prompts, preprocessing and metrics are lm-eval's — and run through
``lm_eval.simple_evaluate(model="hf")`` on the embedded SmolLM2 in fp32. ESA scores the same file. Reported
per task: both accuracies, the largest per-option |Δ log-likelihood| over all items, how many greedy flags and
per-item predictions differ, and both wall times.

Run (lm_eval is not an ESA dependency; use the venv that has it)::

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 /tmp/lmeval-venv/bin/python bench/zeroshot_vs_lmeval.py \
        --tasks piqa arc_easy --out bench/zeroshot_vs_lmeval.json

Without ``--task-data`` each task reads ``tests/evals/fixtures/<task>.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "evals" / "fixtures"


def lmeval_task_config(task_manager, name: str, path: Path, split: str) -> dict:
    """lm-eval's own YAML for task ``name`` (includes and !function resolved) with its data read from ``path``
    as the only split; the result is passed to ``simple_evaluate`` as an inline task config."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(task_manager.task_index[name].yaml_path, resolve_func=True)
    return {
        **cfg,
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path)}},
        "training_split": None,
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None,
    }


def run_lmeval(pretrained: str, configs: list[dict], task_manager, batch_size: int = 8,
               evaluation_tracker=None) -> tuple[dict, float]:
    """``simple_evaluate`` on CPU in fp32; returns (results with samples, wall seconds)."""
    import lm_eval

    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        evaluation_tracker=evaluation_tracker,
        model="hf",
        model_args=f"pretrained={pretrained},dtype=float32",
        tasks=configs,
        num_fewshot=0,
        batch_size=batch_size,
        device="cpu",
        log_samples=True,
        task_manager=task_manager,
        bootstrap_iters=100_000,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
    )
    return out, time.perf_counter() - start


def write_lmeval_output(pretrained: str, tasks: list[str], data: dict[str, Path], output_path: Path,
                        batch_size: int = 8) -> Path:
    """Run lm-eval on ``tasks`` (each read from ``data[task]``) and save what ``lm_eval --output_path OUT
    --log_samples`` saves: its ``EvaluationTracker`` writes ``OUT/<model>/results_<date>.json`` and
    ``samples_<task>_<date>.jsonl``, the same calls in the same order as lm-eval's CLI. Returns that folder."""
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    from esa.evals.tasks import TASKS

    manager = TaskManager()
    configs = [lmeval_task_config(manager, t, Path(data[t]).resolve(), TASKS.get(t).split) for t in tasks]
    tracker = EvaluationTracker(output_path=str(output_path))
    out, _ = run_lmeval(pretrained, configs, manager, batch_size, evaluation_tracker=tracker)
    samples = out.pop("samples")
    tracker.save_results_aggregated(results=out, samples=samples)
    for task in out["configs"]:
        tracker.save_results_samples(task_name=task, samples=samples[task])
    return output_path / tracker.general_config_tracker.model_name_sanitized


def lmeval_item_lls(samples: list[dict]) -> dict[int, tuple[list[float], list[bool]]]:
    """doc_id → (per-option log-likelihoods, per-option greedy flags) from lm-eval's logged samples."""
    out = {}
    for s in samples:
        resps = [r[0] for r in s["resps"]]  # one (ll, is_greedy) per request
        out[int(s["doc_id"])] = ([float(r[0]) for r in resps], [bool(r[1]) for r in resps])
    return out


def compare(esa_result, lm_metrics: dict, lm_items: dict) -> dict:
    """Numbers that should agree: metrics exactly (same predictions), log-likelihoods to ~1e-5."""
    max_dll, greedy_diff, pred_diff, missing = 0.0, 0, 0, 0
    for item in esa_result.items:
        if item.item_id not in lm_items:
            missing += 1
            continue
        lls, greedy = lm_items[item.item_id]
        max_dll = max(max_dll, float(np.max(np.abs(np.array(item.loglikelihoods) - np.array(lls)))))
        greedy_diff += sum(a != b for a, b in zip(item.is_greedy, greedy))
        pred_diff += int(np.argmax(item.loglikelihoods) != np.argmax(lls))
    row = {
        "n": len(esa_result.items),
        "missing_in_lmeval": missing,
        "max_abs_dll": max_dll,
        "greedy_flags_differing": greedy_diff,
        "predictions_differing": pred_diff,
    }
    for key in ("acc", "acc_norm", "perplexity"):
        if key in esa_result.metrics:
            row[f"esa_{key}"] = esa_result.metrics[key]
            row[f"lmeval_{key}"] = lm_metrics.get(f"{key},none")
            row[f"esa_{key}_stderr"] = esa_result.metrics[f"{key}_stderr"]
            row[f"lmeval_{key}_stderr"] = lm_metrics.get(f"{key}_stderr,none")
    return row


def run(tasks: list[str], data: dict[str, str], batch_size: int = 8) -> dict:
    """Score ``tasks`` with ESA and lm-eval on the embedded SmolLM2 (fp32, CPU); a comparison row per task."""
    from esa.evals.tasks import TASKS, load_task_data
    from esa.evals.zeroshot import evaluate_task
    from esa.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(device="cpu"))
    paths = {t: Path(data.get(t, FIXTURES / f"{t}.jsonl")).resolve() for t in tasks}
    esa_results, esa_seconds = {}, {}
    for t in tasks:
        start = time.perf_counter()
        esa_results[t] = evaluate_task(loaded.model, loaded.tokenizer, load_task_data(t, str(paths[t])))
        esa_seconds[t] = time.perf_counter() - start
    from lm_eval.tasks import TaskManager

    manager = TaskManager()
    configs = [lmeval_task_config(manager, t, paths[t], TASKS.get(t).split) for t in tasks]
    lm_out, lm_seconds = run_lmeval(loaded.fingerprint.source, configs, manager, batch_size)
    rows = {}
    for t in tasks:
        rows[t] = compare(esa_results[t], lm_out["results"][t], lmeval_item_lls(lm_out["samples"][t]))
        rows[t]["esa_seconds"] = esa_seconds[t]
    return {
        "model": loaded.fingerprint.to_dict(),
        "rows": rows,
        "lmeval_seconds_all_tasks": lm_seconds,
        "esa_seconds_all_tasks": sum(esa_seconds.values()),
    }


def _fmt(x) -> str:
    if isinstance(x, float) and math.isfinite(x):
        return f"{x:.2e}" if 0 < abs(x) < 1e-3 else f"{x:.4f}"
    return "—" if x is None else str(x)


def main() -> None:
    from esa.evals.tasks import task_names

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=task_names())
    parser.add_argument("--task-data", nargs="*", default=[], metavar="TASK=PATH")
    parser.add_argument("--batch-size", type=int, default=8, help="lm-eval's batch size")
    parser.add_argument("--out", type=Path, help="write the comparison as JSON here")
    args = parser.parse_args()
    report = run(args.tasks, dict(kv.split("=", 1) for kv in args.task_data), args.batch_size)
    for task, row in report["rows"].items():
        print(task, " ".join(f"{k}={_fmt(v)}" for k, v in row.items()))
    print(
        f"wall: esa {report['esa_seconds_all_tasks']:.1f}s, lm-eval {report['lmeval_seconds_all_tasks']:.1f}s"
    )
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
