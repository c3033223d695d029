"""``esa zeroshot``: lm-evaluation-harness-compatible zero-shot accuracy of one model on a list of tasks."""

from __future__ import annotations

import time
from pathlib import Path

from esa.evals.tasks import TASKS
from esa.evals.zeroshot import DEFAULT_TOKEN_BUDGET


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "zeroshot",
        help="zero-shot multiple-choice accuracy matching lm-evaluation-harness 0.4.x",
        description="Tasks: "
        + ", ".join(TASKS.names())
        + ". Offline, give each task's split as a JSONL in the "
        "dataset's own schema with --task-data TASK=PATH.",
    )
    p.add_argument("--model", default="smollm2-135m", help="suite alias, hub id, local dir or .gguf file")
    p.add_argument(
        "--tasks", nargs="+", default=["piqa", "arc_easy"], help="task names (default piqa arc_easy)"
    )
    p.add_argument(
        "--task-data",
        nargs="*",
        default=[],
        metavar="TASK=PATH",
        help="read TASK from a local JSONL instead of the hub",
    )
    p.add_argument("--limit", type=int, default=None, help="score N items per task (seeded subsample)")
    p.add_argument("--seed", type=int, default=0, help="chooses which items when --limit < the split's size")
    p.add_argument("--token-budget", type=int, default=DEFAULT_TOKEN_BUDGET, help="padded tokens per forward")
    p.add_argument("--dtype", default="fp32", help="weights dtype: fp32 | bf16 | fp16 (log-probs are fp32)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present) | cpu | cuda | cuda:N")
    p.add_argument("--out-dir", type=Path, default=None, help="write zeroshot.json and per-item JSONL here")
    p.set_defaults(func=run)


def _provenance(loaded, args, seconds: float) -> dict:
    import torch
    import transformers

    import esa

    return {
        "esa_version": esa.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": loaded.fingerprint.to_dict(),
        "device": str(loaded.device),
        "limit": args.limit,
        "seed": args.seed,
        "token_budget": args.token_budget,
        "wall_seconds": seconds,
    }


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from esa.evals.zeroshot import parse_task_data, run_tasks, write_results
    from esa.models import ModelSpec, load_model

    for name in args.tasks:
        TASKS.get(name)  # fail on a typo before loading the model
    task_data = parse_task_data(args.task_data)
    start = time.perf_counter()
    loaded = load_model(ModelSpec(args.model, args.dtype, args.device))
    results = run_tasks(
        loaded.model, loaded.tokenizer, args.tasks, task_data, args.limit, args.seed, args.token_budget
    )
    table = Table("task", "n", "metric", "value", "± stderr", title=f"zero-shot — {args.model}")
    for r in results:
        for key in TASKS.get(r.task).metrics:
            se = r.metrics.get(f"{key}_stderr")
            table.add_row(
                r.task, str(r.config["n"]), key, f"{r.metrics[key]:.4f}", "—" if se is None else f"{se:.4f}"
            )
    console = Console()
    console.print(table)
    if args.out_dir is not None:
        write_results(args.out_dir, results, _provenance(loaded, args, time.perf_counter() - start))
        console.print(f"results: {args.out_dir / 'zeroshot.json'}")
    return 0
