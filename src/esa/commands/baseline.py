"""``esa baseline``: perplexity family, token accuracy, throughput and memory for one or more models.

A one-off study on the engine: the flags (a profile's budgets filled in, :meth:`BaselineConfig.resolved`)
become a study with kinds ``baseline`` (models × datasets × context lengths × seeds), ``long_context`` (with
``--long-context``) and ``zeroshot`` (with ``--eval-suites``), run into ``<out-dir>/esa.db`` — rerunning resumes,
completed runs are not computed again; ``--overwrite`` starts a fresh database — and each model's run directory
``<out-dir>/<model-slug>/`` is exported from the stored rows (:func:`esa.evals.baseline.export_run_dir`).
``esa report <out-dir>`` renders the database.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from esa.evals.baseline import PROFILES, SUITE_ALIASES, BaselineConfig
from esa.data.windows import METHODS
from esa.core.errors import EsaError
from esa.models import ATTENTION_NAMES, ModelSpec
from esa.tracking import add_track_args


def _profiles_help() -> str:
    return "; ".join(f"{name}: {p.description} (default datasets {','.join(p.datasets)}, contexts "
                     f"{','.join(map(str, p.context_lens))}, seeds {','.join(map(str, p.seeds))})"
                     for name, p in PROFILES.items())


def add_model_args(parser, revision: bool = True) -> None:
    """The flags of every command that loads a model (read back by :func:`model_entry`); ``revision`` False for
    a command that loads several different repositories (a revision names a commit of one)."""
    parser.add_argument("--dtype", default="fp32",
                        help="weights dtype: fp32 | bf16 | fp16 | auto (bf16 on a GPU that has it, else fp32); "
                             "bfloat16, float16, float32 also accepted (default fp32)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present) | cpu | cuda | cuda:N")
    if revision:
        parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a hub repo's own Python code")
    parser.add_argument("--allow-pickle", action="store_true", help="allow non-safetensors checkpoints")
    parser.add_argument("--attention", default="auto", choices=ATTENTION_NAMES,
                        help="attention kernel: auto (transformers' choice: SDPA where supported, else eager) | "
                             "sdpa | eager | flash_attention_2/3 (needs flash-attn and a GPU) | flex_attention")


def add_output_args(parser, out_dir: str | None, exports: str, overwrite: bool = True) -> None:
    """``--out-dir`` (``out_dir`` None: required), ``--db``, ``--overwrite`` and the ``--track`` flags
    (:func:`esa.tracking.add_track_args`) of every one-off command."""
    kw = {"required": True} if out_dir is None else {"default": Path(out_dir)}
    parser.add_argument("--out-dir", type=Path, help=f"results database esa.db and {exports} go here", **kw)
    parser.add_argument("--db", type=Path, default=None, help="results database (default: <out-dir>/esa.db)")
    if overwrite:
        parser.add_argument("--overwrite", action="store_true",
                            help="start from a fresh database (else a rerun resumes: completed runs are reused)")
    add_track_args(parser)


def model_entry(args, name: str | None = None) -> dict:
    """The study's model entry for the flags of :func:`add_model_args` (``name``: else ``args.model``)."""
    return {"name": name or args.model, "dtype": args.dtype, "device": args.device, "revision": args.revision,
            "trust_remote_code": args.trust_remote_code, "allow_pickle": args.allow_pickle,
            "attention": args.attention}


def register(subparsers) -> None:
    p = subparsers.add_parser("baseline", help="measure honest baselines (perplexity, accuracy, speed, memory)",
                              description="Profiles — " + _profiles_help())
    p.add_argument("--model", nargs="+", default=["smollm2-135m"],
                   help="suite alias (see `esa check-models`), hub id, local dir or .gguf file; several allowed")
    p.add_argument("--baseline", default="smoke", metavar="PROFILE",
                   help=f"profile: token budgets, one of {', '.join(PROFILES)} (default smoke)")
    p.add_argument("--datasets", "--dataset", dest="datasets", nargs="+", default=[],
                   help="corpus names or .txt/.jsonl paths")
    p.add_argument("--context-lens", nargs="+", type=int, default=[], help="window lengths in tokens")
    p.add_argument("--seeds", nargs="+", type=int, default=[], help="seeds choose which windows are scored")
    p.add_argument("--method", default="chunks", choices=METHODS, help="window method (default chunks)")
    p.add_argument("--stride", type=int, default=None, help="stride for --method sliding")
    p.add_argument("--bos", default="auto", choices=["auto", "always", "never"], help="BOS per window")
    p.add_argument("--max-eval-tokens", type=int, default=-1,
                   help="scored tokens per dataset×ctx×seed (default: the profile's; 0 = whole split)")
    p.add_argument("--batch-tokens", type=int, default=0, help="micro-batch token budget (default: profile's)")
    p.add_argument("--long-context", nargs="*", type=int, default=[],
                   help="extra context lengths evaluated at batch size 1 with chunked log-softmax")
    p.add_argument("--eval-suites", nargs="*", default=[],
                   help="zero-shot tasks: hellaswag piqa boolq arc_easy (arc_e) arc_challenge (arc_c) winogrande "
                        "lambada_openai (lambada) sciq")
    p.add_argument("--task-data", nargs="*", default=[], metavar="TASK=PATH",
                   help="local JSONL per task in the dataset's own schema (offline runs)")
    p.add_argument("--zeroshot-limit", type=int, default=None,
                   help="items per task (a subsample chosen by the first seed)")
    add_model_args(p)
    add_output_args(p, "runs/baseline", "one run directory per model, exported from it")
    p.set_defaults(func=run)


def config_from_args(args) -> BaselineConfig:
    """The resolved config of the flags (the first model's spec; the others share its settings)."""
    spec = ModelSpec(args.model[0], args.dtype, args.device, args.revision, args.trust_remote_code,
                     args.allow_pickle, args.attention)
    max_tokens = None if args.max_eval_tokens == 0 else args.max_eval_tokens
    return BaselineConfig(spec, args.baseline, tuple(args.datasets), tuple(args.context_lens), tuple(args.seeds),
                          args.method, args.stride, args.bos, max_tokens, args.batch_tokens,
                          tuple(args.long_context), tuple(args.eval_suites), _task_data(args.task_data),
                          args.zeroshot_limit).resolved()


def _task_data(items: list[str]) -> tuple[tuple[str, str], ...]:
    from esa.evals.zeroshot import parse_task_data

    canonical = []
    for item in items:
        task, sep, path = item.partition("=")
        canonical.append(f"{SUITE_ALIASES.get(task, task)}{sep}{path}")
    return tuple(parse_task_data(canonical).items())


def check_tasks(cfg: BaselineConfig) -> None:
    """Fail on a task typo, a --task-data of a task not evaluated, or a task with neither --task-data nor a
    readable hub split — before any model is loaded or scored."""
    from esa.evals.tasks import TASKS, load_task_data

    for name in cfg.eval_suites:
        TASKS.get(name)
    paths = dict(cfg.task_data)
    unknown = sorted(set(paths) - set(cfg.eval_suites))
    if unknown:
        raise EsaError(f"--task-data names {', '.join(unknown)}, which is not in --eval-suites")
    for name in (t for t in cfg.eval_suites if t not in paths):
        load_task_data(name, None, cfg.zeroshot_limit, cfg.seeds[0])  # the hub split, or the remedy


def one_off_study(cfg: BaselineConfig, models: list[str]):
    """The study ``esa baseline`` runs: every model with the first one's settings, the resolved grid, the long
    contexts (first seed) and the zero-shot tasks (items chosen by the first seed, as many as --zeroshot-limit)."""
    from esa.study import parse_study

    m = cfg.model
    study = {"name": "esa-baseline",
             "models": [{**asdict(m), "name": name} for name in models],
             "datasets": list(cfg.datasets), "context_lens": list(cfg.context_lens), "seeds": list(cfg.seeds),
             "method": cfg.method, "stride": cfg.stride, "bos": cfg.bos, "max_eval_tokens": cfg.max_eval_tokens,
             "batch_tokens": cfg.batch_tokens,
             "kinds": ["baseline"] + ["long_context"] * bool(cfg.long_context) + ["zeroshot"] * bool(cfg.eval_suites)}
    if cfg.long_context:
        study["long_context"] = {"context_lens": list(cfg.long_context)}
    if cfg.eval_suites:
        study["zeroshot"] = {"tasks": list(cfg.eval_suites), "task_data": dict(cfg.task_data),
                             "limit": cfg.zeroshot_limit, "seeds": [cfg.seeds[0]]}
    return parse_study(study, "esa baseline")


def _check_writable(path: Path, flag: str) -> None:
    """The nearest existing folder at or above ``path`` must be a writable directory (nothing is created)."""
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise EsaError(f"output directory {path} is not writable ({existing} is not a writable directory); "
                       f"choose another {flag}")


def export(outcome, cfg: BaselineConfig, out_dir: Path) -> list[Path]:
    """Each model's run directory ``<out-dir>/<model-slug>/`` from the one-off study's stored rows."""
    import dataclasses

    from esa.evals.baseline import export_run_dir, model_slug, stored_entry
    from esa.kinds.zeroshot import task_result
    from esa.study import model_specs

    dirs = []
    for spec in model_specs(outcome.study):
        cells = [h for kind in ("baseline", "long_context") for h in outcome.of(kind) if h.run.model == spec]
        tasks = [task_result(h.row, h.arrays) for h in outcome.of("zeroshot") if h.run.model == spec]
        first = min((h.row for h in cells), key=lambda r: r.started_at)
        dirs.append(export_run_dir(out_dir / model_slug(spec.name), dataclasses.replace(cfg, model=spec),
                                   [(stored_entry(h.row.config, h.row.metrics), h.arrays) for h in cells], tasks,
                                   first.model, first.provenance or {}))
    return dirs


def run(args) -> int:
    from rich.console import Console

    from esa.evals.baseline import model_slug
    from esa.commands.study import progress_printer
    from esa.executors.one_off import check_out_dir, log_path, run_one_off
    from esa.tracking import from_args

    cfg = config_from_args(args)
    check_tasks(cfg)
    study = one_off_study(cfg, args.model)
    out = Path(args.out_dir)
    db = Path(args.db or out / "esa.db")
    check_out_dir(out, db, tuple(f"{model_slug(m)}/results.json" for m in args.model), args.overwrite,
                  "esa baseline")
    _check_writable(out, "--out-dir")
    _check_writable(db.parent, "--db")
    console = Console()
    printer = from_args(args, progress_printer(console, log_path(db)), db)
    outcome = run_one_off(study, db, "esa baseline", args.overwrite, printer)
    for d in export(outcome, cfg, out):
        console.print(f"results: {d / 'results.json'}", soft_wrap=True)
    console.print(f"database: {db} (`esa report {db}`)", soft_wrap=True)
    return 0
