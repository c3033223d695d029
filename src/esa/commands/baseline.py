"""``esa baseline``: perplexity family, token accuracy, throughput and memory for one or more models."""

from __future__ import annotations

from pathlib import Path

from esa.baseline import PROFILES, BaselineConfig, run_baseline
from esa.data.windows import METHODS
from esa.models import ModelSpec


def _profiles_help() -> str:
    return "; ".join(f"{name}: {p.description} (default datasets {','.join(p.datasets)}, contexts "
                     f"{','.join(map(str, p.context_lens))}, seeds {','.join(map(str, p.seeds))})"
                     for name, p in PROFILES.items())


def add_model_args(parser) -> None:
    parser.add_argument("--dtype", default="fp32", help="weights dtype: fp32 | bf16 | fp16 (default fp32)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present) | cpu | cuda | cuda:N")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a hub repo's own Python code")
    parser.add_argument("--allow-pickle", action="store_true", help="allow non-safetensors checkpoints")


def register(subparsers) -> None:
    p = subparsers.add_parser("baseline", help="measure honest baselines (perplexity, accuracy, speed, memory)",
                              description="Profiles — " + _profiles_help())
    p.add_argument("--model", nargs="+", default=["smollm2-135m"],
                   help="suite alias (see `esa check-models`), hub id, local dir or .gguf file; several allowed")
    p.add_argument("--baseline", default="smoke", choices=list(PROFILES), help="profile: token budgets")
    p.add_argument("--datasets", nargs="+", default=[], help="corpus names or .txt/.jsonl paths")
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
                        "lambada_openai sciq")
    p.add_argument("--task-data", nargs="*", default=[], metavar="TASK=PATH",
                   help="local JSONL per task in the dataset's own schema (offline runs)")
    p.add_argument("--zeroshot-limit", type=int, default=None, help="items per task (seeded subsample)")
    add_model_args(p)
    p.add_argument("--out-dir", type=Path, default=Path("runs/baseline"), help="where run directories go")
    p.add_argument("--overwrite", action="store_true", help="replace existing results in the run directory")
    p.set_defaults(func=run)


def config_from_args(args) -> BaselineConfig:
    spec = ModelSpec(args.model[0], args.dtype, args.device, args.revision, args.trust_remote_code,
                     args.allow_pickle)
    max_tokens = None if args.max_eval_tokens == 0 else args.max_eval_tokens
    return BaselineConfig(spec, args.baseline, tuple(args.datasets), tuple(args.context_lens), tuple(args.seeds),
                          args.method, args.stride, args.bos, max_tokens, args.batch_tokens,
                          tuple(args.long_context), tuple(args.eval_suites), _task_data(args.task_data),
                          args.zeroshot_limit)


def _task_data(items: list[str]) -> tuple[tuple[str, str], ...]:
    from esa.baseline import SUITE_ALIASES
    from esa.evals.zeroshot import parse_task_data

    canonical = []
    for item in items:
        task, sep, path = item.partition("=")
        canonical.append(f"{SUITE_ALIASES.get(task, task)}{sep}{path}")
    return tuple(parse_task_data(canonical).items())


def run(args) -> int:
    from rich.console import Console

    dirs = run_baseline(config_from_args(args), args.model, args.out_dir, args.overwrite)
    console = Console()
    for d in dirs:
        console.print(f"results: {d / 'results.json'}")
    return 0
