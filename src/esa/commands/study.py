"""``esa plan``, ``esa run`` and ``esa results``: study files → runs → results database → CSV/Parquet."""

from __future__ import annotations

from pathlib import Path

from esa.executors import EXECUTORS, summary_line
from esa.store import EXPORT_FORMATS
from esa.tracking import add_track_args


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="show a study's runs and estimated cost without running anything")
    p.add_argument("study", type=Path, help="study .yaml file (see studies/)")
    p.add_argument("--no-measure", action="store_true",
                   help="do not time small local models; use the stated throughput assumption for all")
    p.add_argument("--db", type=Path, default=None,
                   help="results database of earlier runs: time each run at the tokens/s measured there "
                   "(provenance.cost) for the same model and kind, nearest context length")
    p.add_argument("--replicas", type=int, default=1,
                   help="data-parallel model replicas each run will be shared by (esa run --replicas): rates "
                   "measured with that many are used when --db has them, else linear scaling is assumed")
    p.set_defaults(func=plan)

    r = subparsers.add_parser("run", help="execute a study's pending runs into a results database (resumable)")
    r.add_argument("study", type=Path, help="study .yaml file (see studies/)")
    r.add_argument("--db", type=Path, default=None, help="results database (default runs/<study name>.db)")
    r.add_argument("--executor", default="local", choices=EXECUTORS, help="local (default) or ray")
    r.add_argument("--address", default=None, help="Ray cluster address (default: start/join a local one)")
    r.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per model replica on Ray (0 on CPU)")
    r.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per model replica on Ray")
    r.add_argument("--replicas", type=int, default=1,
                   help="model replicas per model on Ray, splitting each run's windows, items and trials between "
                   "them (e.g. 8 on a node of 8 GPUs with --num-gpus 1); the results equal one process's")
    add_track_args(r)
    r.set_defaults(func=run)

    x = subparsers.add_parser("results", help="export a results database to CSV or Parquet")
    x.add_argument("db", type=Path, help="results database written by `esa run`")
    x.add_argument("--format", choices=EXPORT_FORMATS, default=None, help="default: from --out's suffix")
    x.add_argument("--out", type=Path, default=None, help="output file; without it, list the db's studies")
    x.add_argument("--study", default=None, help="only the runs of this study (name)")
    x.add_argument("--long", action="store_true",
                   help="one row per run × numeric metric (run_id, kind, model, dtype, config.*, metric, value) "
                   "instead of one row per run; either file format")
    x.set_defaults(func=results)


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    return f"{s:.1f} s" if s < 120 else (f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h")


def plan(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from esa.executors import plan as make_plan
    from esa.study import load_study

    study = load_study(args.study)
    rows = make_plan(study, measure=not args.no_measure, db=args.db, replicas=args.replicas)
    shared = f", each shared by {args.replicas} replicas" if args.replicas > 1 else ""
    table = Table(title=f"study {study.name}: {len(rows)} run(s){shared}")
    for col in ("#", "kind", "model", "dtype", "dataset", "ctx", "seed", "scored tokens ≤", "est. forward time"):
        table.add_column(col)
    for i, row in enumerate(rows, 1):
        r = row.run
        table.add_row(str(i), r.kind, r.model.name, r.model.dtype, *(str(getattr(r, f, "—")) for f in
                                                                     ("dataset", "context_len", "seed")),
                      "whole split" if row.tokens is None else f"{row.tokens:,}", _fmt_seconds(row.seconds))
    console = Console(width=160)
    console.print(table)
    known = [r.tokens for r in rows if r.tokens is not None]
    timed = [r.seconds for r in rows if r.seconds is not None]
    console.print(f"total scored tokens ≤ {sum(known):,}" + (f" (+{len(rows) - len(known)} whole-split run(s))"
                                                             if len(known) < len(rows) else ""))
    console.print(f"estimated forward time: {_fmt_seconds(sum(timed))}" +
                  (f" (+{len(rows) - len(timed)} run(s) not estimated)" if len(timed) < len(rows) else "")
                  + "; model loading and tokenization not included")
    for basis in dict.fromkeys(f"{r.run.model.name} ctx {getattr(r.run, 'context_len', '—')}: {r.basis}"
                               for r in rows):
        console.print(f"  throughput {basis}")
    return 0


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_printer(console, log: Path | None = None):
    """A ``run_study`` event callback: one line per model group, per run started and per run finished —
    ``[3/9] <label>: <summary> (<run id>) in 41s · ETA 4m10s`` (ETA: this session's mean time per computed run
    × the runs left). Off a terminal (nohup, Slurm) every line starts with a timestamp and carries no markup;
    with ``log``, every line is also appended there, timestamped, after the command line that started it."""
    import time

    from rich.text import Text

    from esa.core import progress

    state = {"t0": None, "computed": 0, "started": None}

    def emit(text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        if log is not None and not state.get("header"):
            state["header"] = True
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a", encoding="utf-8") as f:
                f.write(f"{stamp} $ {progress.command_line() or 'esa (library call)'}\n")
        plain = Text.from_markup(text).plain
        if console.is_terminal:
            console.print(text, highlight=False, soft_wrap=True)  # soft: no line breaks inside a result
        else:
            console.print(f"{stamp} {plain}", markup=False, highlight=False, soft_wrap=True)
        if log is not None:
            with open(log, "a", encoding="utf-8") as f:
                f.write(f"{stamp} {plain}\n")

    def eta(done: int, total: int) -> str:
        if not state["computed"] or done >= total:
            return ""
        per_run = (time.perf_counter() - state["t0"]) / state["computed"]
        return f" · ETA {_duration(per_run * (total - done))}"

    def on_event(kind: str, **info) -> None:
        if state["t0"] is None and kind in ("group", "start"):
            state["t0"] = time.perf_counter()
        if kind == "skip_group":
            emit(f"{info['model']}: all {info['runs']} run(s) already completed — not loaded")
        elif kind == "group":
            emit(f"{info['model']}: {info['pending']} run(s) to do, {info['completed']} already completed")
        elif kind == "elsewhere":
            emit(f"{info['label']}: being computed by another driver — left to it")
        elif kind == "load_error":
            emit(f"[red]{info['model']}: cannot load: {info['error']}[/red]")
        elif kind == "start":
            state["started"] = time.perf_counter()
            emit(f"[{info['index']}/{info['total']}] {info['label']} …")
        elif kind == "run":
            rec = info["record"]
            state["computed"] += 1
            took = f" in {_duration(time.perf_counter() - state['started'])}" if state["started"] else ""
            what = summary_line(rec) if rec.status == "completed" else f"[red]{summary_line(rec)}[/red]"
            emit(f"[{info['done']}/{info['total']}] {info['label']}: {what}  ({rec.run_id[:12]}){took}"
                 f"{eta(info['done'], info['total'])}")
    return on_event


def run(args) -> int:
    from rich.console import Console

    from esa.executors import run_study
    from esa.executors.one_off import log_path
    from esa.study import load_study
    from esa.tracking import from_args

    study = load_study(args.study)
    db = args.db or Path("runs") / f"{study.name}.db"
    console = Console()
    options = {"address": args.address, "num_gpus": args.num_gpus, "num_cpus": args.num_cpus,
               "replicas": args.replicas}
    on_event = from_args(args, progress_printer(console, log_path(db)), db)
    summary = run_study(study, db, args.executor, str(args.study.resolve()), on_event,
                        **(options if args.executor == "ray" else {}))
    console.print(f"study {study.name}: {summary.completed} completed now, {summary.skipped} already done, "
                  f"{len(summary.failed)} failed, of {summary.total} → {db}", soft_wrap=True)
    for label, error in summary.failed:
        console.print(f"[red]failed: {label}: {error}[/red]")
    for model, error in summary.load_errors:
        console.print(f"[red]not loaded: {model}: {error}[/red]")
    if summary.elsewhere:
        console.print(f"{len(summary.elsewhere)} run(s) were being computed by another driver on {db} and were "
                      "left to it; run again once it finishes to include them in your reports")
    return 0 if summary.ok else 1


def results(args) -> int:
    from esa.core.errors import EsaError
    from esa.store import export, study_names

    if not args.db.is_file():
        raise EsaError(f"results database {args.db} does not exist; run `esa run STUDY.yaml --db {args.db}` first")
    if args.out is None:
        for name, n in study_names(args.db):
            print(f"{name}: {n} run(s)")
        print("export with: esa results DB --out results.csv (or .parquet; --long: one row per run × metric)")
        return 0
    n = export(args.db, args.out, args.format, args.study, long=args.long)
    print(f"{n} {'run × metric row' if args.long else 'run'}(s) → {args.out}")
    return 0
