"""``esa scaling``: the same protocol on each model of a size ladder, and log–log trends vs parameter count.

The numbers go through a results database (``--db``, default ``<out-dir>/scaling.db``): rerunning a stopped
ladder measures only the models it lacks, and ``esa report <db>`` shows the ladder's Scaling section."""

from __future__ import annotations

import math
from pathlib import Path

from esa.commands.baseline import add_model_args
from esa.commands.perturb import add_eval_args, eval_config
from esa.tracking import add_track_args


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "scaling", help="baseline, super weights, perturbation and heavy tails along a model-size ladder",
        description="Loads each model once and measures perplexity and bits per byte, super-weight candidates "
                    "(count, depth, max activation), zeroing them vs a size-matched random_k control (ΔNLL/token, "
                    "PPL ratio) and the heavy-tail share of |W|; then fits log10(statistic) = a + b·log10(N) "
                    "per statistic with a t-based 95% CI of the slope. Writes scaling.json, scaling.png and "
                    "plots/<statistic>.png from the rows of a results database (--db), which a rerun resumes. "
                    "GPU ladder: --models pythia-70m pythia-160m … pythia-12b.")
    p.add_argument("--models", nargs="+", default=["smollm2-135m"],
                   help="suite aliases, hub ids, local dirs or .gguf files, in ladder order")
    add_eval_args(p)  # the data flags of esa perturb: both build an EvalConfig
    p.add_argument("--op", default="zero", help="perturbation of the super weights and the control, e.g. zero")
    p.add_argument("--control-seeds", type=int, nargs="+", default=[0, 1, 2], help="random_k draws")
    p.add_argument("--tail-fraction", type=float, default=0.001, help="heavy-tail share of the top fraction of |W|")
    p.add_argument("--x-axis", default="n_params", choices=("n_params", "n_params_non_embedding"),
                   help="model size on the trend's x axis")
    add_model_args(p, revision=False)  # a revision names a commit of one repository, not of a ladder
    p.add_argument("--statistics", nargs="+", default=[],
                   help="statistics to measure and fit (default: all); e.g. perplexity bits_per_byte sw_count")
    p.add_argument("--out-dir", type=Path, default=Path("runs/scaling"), help="output directory")
    p.add_argument("--db", type=Path, default=None,
                   help="results database to write or append to (default: <out-dir>/scaling.db)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier scaling run's files in --out-dir")
    add_track_args(p)
    p.set_defaults(func=run)


def _config(args):
    from esa.scaling.fits import ScalingConfig

    return ScalingConfig(tuple(args.models), eval_config(args), args.op, tuple(args.control_seeds), args.tail_fraction,
                         args.x_axis, args.dtype, args.device, tuple(args.statistics), args.trust_remote_code,
                         args.allow_pickle, args.attention)


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _slope(entry: dict | None) -> str:
    """``slope [lo, hi]`` of one trend ('' for a row that is not fitted)."""
    if entry is None:
        return ""
    fit = entry["fit"]
    if fit is None:
        return f"no fit ({len(entry['models'])} usable point(s))"
    ci = fit["slope_ci95"]
    return f"{fit['slope']:.3g} " + (f"[{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "[undefined: 2 points]")


def _print(doc: dict, out_dir: Path) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    rows = doc["rows"]
    table = Table(title=f"scaling ladder ({len(rows)} model(s)); x = {doc['x_axis']}")
    table.add_column("statistic")
    for r in rows:
        table.add_column(escape(Path(r["model"]).name), justify="right")
    table.add_column("log–log slope [95% CI]", justify="right")
    for key in ("n_params", "n_params_non_embedding", *doc["fits"]):
        cells = (key, *(_fmt(r.get(key)) for r in rows), _slope(doc["fits"].get(key)))
        table.add_row(*(escape(c) for c in cells))  # "[…]" is rich markup otherwise
    console = Console()
    console.print(table)
    for note in doc["notes"]:
        console.print(f"note: {note}")
    console.print(f"results: {out_dir / 'scaling.json'} (from {doc['database']})\n"
                  f"plots: {out_dir / 'scaling.png'}, {out_dir / 'plots'}/")


def run(args) -> int:
    from functools import partial

    from rich.console import Console

    from esa.commands.study import progress_printer  # the same progress lines as `esa run`
    from esa.executors.one_off import log_path
    from esa.scaling.ladder import ladder_db, run_scaling
    from esa.tracking import from_args

    db = ladder_db(args.out_dir, args.db)
    out_dir, doc = run_scaling(_config(args), args.out_dir, args.overwrite, db,
                               progress_printer(Console(), log_path(db)), track=partial(from_args, args))
    _print(doc, out_dir)
    return 0
