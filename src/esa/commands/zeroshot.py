"""``esa zeroshot``: lm-evaluation-harness-compatible zero-shot accuracy of one model on a list of tasks.

A one-off study on the engine: the flags become a study with a ``zeroshot:`` section (kind ``zeroshot`` only),
run into ``<out-dir>/esa.db`` — rerunning resumes, finished tasks are not scored again — and ``zeroshot.json``
and ``<task>.items.jsonl`` are exported from the stored rows (:func:`esa.kinds.zeroshot.task_result`), and the
same numbers in lm-evaluation-harness 0.4's layout, ``lm-eval/<model>/results_<date>.json`` with
``samples_<task>_<date>.jsonl`` (:mod:`esa.evals.lmeval_format`).
"""

from __future__ import annotations

import time
from pathlib import Path

from esa.commands.baseline import add_model_args, add_output_args, model_entry
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
    p.add_argument("--batch-tokens", "--token-budget", dest="token_budget", type=int, default=DEFAULT_TOKEN_BUDGET,
                   help="padded tokens per forward (the micro-batch budget; --token-budget is its old name)")
    add_model_args(p)
    add_output_args(p, "runs/zeroshot", "zeroshot.json, per-item JSONL and lm-eval/ (lm-eval 0.4 layout: "
                    "results_<date>.json, samples_<task>_<date>.jsonl)", overwrite=False)
    p.set_defaults(func=run)


def one_off_study(args, task_data: dict[str, str]):
    """The study ``esa zeroshot`` runs: one model, the tasks, kind ``zeroshot`` only."""
    from esa.study import parse_study

    return parse_study({"name": "esa-zeroshot", "models": [model_entry(args)],
                        "datasets": ["python-docs"], "context_lens": [2], "seeds": [args.seed],
                        "kinds": ["zeroshot"],
                        "zeroshot": {"tasks": list(args.tasks), "task_data": task_data, "limit": args.limit,
                                     "token_budget": args.token_budget}}, "esa zeroshot")


def _provenance(row, args, seconds: float) -> dict:
    """What zeroshot.json records of how the numbers were made (the run's stored provenance and model)."""
    prov = row.provenance or {}
    libraries = prov.get("libraries", {})
    return {"esa_version": prov.get("esa_version"), "torch": libraries.get("torch"),
            "transformers": libraries.get("transformers"), "model": row.model, "device": prov.get("device"),
            "limit": args.limit, "seed": args.seed, "token_budget": args.token_budget, "wall_seconds": seconds,
            "provenance": prov}


def stored_results(outcome) -> tuple[list, list, list]:
    """(TaskResults in --tasks order, their stored rows, their runs) of the one-off study's zeroshot runs."""
    from esa.kinds.zeroshot import task_result

    hits = outcome.of("zeroshot")
    return [task_result(h.row, h.arrays) for h in hits], [h.row for h in hits], [h.run for h in hits]


def _seconds(row) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(row.finished_at) - datetime.fromisoformat(row.started_at)).total_seconds()


def write_lmeval_files(out_dir: Path, results: list, rows: list, runs: list) -> dict:
    """The stored results in lm-evaluation-harness 0.4's layout, ``<out-dir>/lm-eval/<model>/results_<date>.json``
    and ``samples_<task>_<date>.jsonl`` (:mod:`esa.evals.lmeval_format`); their paths relative to ``out_dir``."""
    from esa.evals import lmeval_format as lm

    exports = [lm.task_export(r, run.task_data, run.limit, run.seed) for r, run in zip(results, runs)]
    row, run = rows[0], runs[0]
    prov, name = row.provenance or {}, row.model.get("model_id") or run.model.name
    config = lm.run_config(row.model, row.config.get("model") or {}, run.limit, run.seed, prov.get("device"))
    last = max(r.finished_at for r in rows)
    extra = lm.provenance_fields(name, prov, last, sum(_seconds(r) for r in rows), results[0].config.get("max_length"))
    files = lm.write_lmeval(out_dir / "lm-eval" / lm.sanitize_model_name(name), exports, config, lm.date_id(last),
                            extra)
    return {"results": str(files["results"].relative_to(out_dir)),
            "samples": {t: str(p.relative_to(out_dir)) for t, p in files["samples"].items()}}


def run(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from esa.commands.study import progress_printer
    from esa.evals.zeroshot import check_task_data, parse_task_data, write_results
    from esa.executors.one_off import log_path, run_one_off
    from esa.tracking import from_args

    for name in args.tasks:
        TASKS.get(name)  # fail on a typo before loading the model
    task_data = parse_task_data(args.task_data)
    check_task_data(args.tasks, task_data)
    study = one_off_study(args, task_data)
    db = args.db or args.out_dir / "esa.db"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    console = Console()
    printer = from_args(args, progress_printer(console, log_path(db)), db)
    results, rows, runs = stored_results(run_one_off(study, db, "esa zeroshot", on_event=printer))
    table = Table("task", "n", "metric", "value", "± stderr", title=f"zero-shot — {args.model}")
    for r in results:
        for key in TASKS.get(r.task).metrics:
            se = r.metrics.get(f"{key}_stderr")
            table.add_row(
                r.task, str(r.config["n"]), key, f"{r.metrics[key]:.4f}", "—" if se is None else f"{se:.4f}"
            )
    console.print(table)
    lm_eval = write_lmeval_files(args.out_dir, results, rows, runs)
    write_results(args.out_dir, results, _provenance(rows[0], args, time.perf_counter() - start), lm_eval)
    console.print(f"results: {args.out_dir / 'zeroshot.json'}, lm-eval layout {args.out_dir / lm_eval['results']} "
                  f"(database {db})", soft_wrap=True)
    return 0
