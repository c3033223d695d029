"""``esa superweights``: find super-weight candidates and massive activations (Yu et al. 2024; Sun et al. 2024).

A one-off study on the engine: the flags become a study with a ``superweights:`` section (kind ``superweights``
only, one run), run into ``<out-dir>/esa.db`` — rerunning resumes without loading the model — and
``superweights.json`` (schema ``esa.superweights/1``) and ``superweights.png`` are exported from the stored row.
"""

from __future__ import annotations

from pathlib import Path

from esa.commands.baseline import add_model_args, add_output_args, model_entry
from esa.core.errors import EsaError
from esa.sensitivity.superweights import Thresholds

OWNED = ("superweights.json", "superweights.png")  # an earlier esa superweights run's exports


def register(subparsers) -> None:
    d = Thresholds()
    p = subparsers.add_parser(
        "superweights", help="locate super weights in the MLP output projections (one forward pass)",
        description="Hooks every layer's MLP output projection (Llama down_proj, GPT-NeoX dense_4h_to_h, GPT-2 "
                    "c_proj; Gemma-2/3: the post-feed-forward norm's output) on a few windows, flags output channels "
                    "that spike far above their layer's median channel maximum and names the single weight "
                    "(row = out, col = in) that writes the spike. A one-off study in <out-dir>/esa.db (a rerun "
                    "resumes); exports superweights.json and superweights.png from the stored run.")
    p.add_argument("--model", default="smollm2-135m", help="suite alias, hub id, local dir or .gguf file")
    p.add_argument("--dataset", default="python-docs", help="corpus name or .txt/.jsonl path")
    p.add_argument("--context-len", type=int, default=128, help="tokens per window (chunks method)")
    p.add_argument("--max-samples", type=int, default=4, help="windows in the forward pass")
    p.add_argument("--seed", type=int, default=0, help="picks which windows")
    p.add_argument("--iterate", type=int, default=0, metavar="N",
                   help="after the first search, zero what was found and search again up to N more times "
                        "(weights are restored afterwards)")
    p.add_argument("--spike-ratio", type=float, default=d.spike_ratio,
                   help="spike = a channel's max |activation| > this × its layer's median channel max")
    p.add_argument("--spike-floor", type=float, default=d.spike_floor, help="… and > this absolute value")
    p.add_argument("--min-share", type=float, default=d.min_share,
                   help="the weight's product must carry at least this fraction of the spiking output")
    p.add_argument("--require-input-spike", action="store_true",
                   help="paper-strict: the weight's input channel must spike as well")
    p.add_argument("--massive-ratio", type=float, default=d.massive_ratio,
                   help="residual |h| is massive when > this × its layer's median |h|")
    p.add_argument("--massive-floor", type=float, default=d.massive_floor, help="… and > this absolute value")
    add_model_args(p)
    add_output_args(p, "runs/superweights", "superweights.json and superweights.png")
    p.set_defaults(func=run)


def one_off_study(args):
    """The study ``esa superweights`` runs: one model, one seed, kind ``superweights`` only."""
    from esa.study import parse_study

    if args.iterate < 0:
        raise EsaError(f"--iterate {args.iterate} must be ≥ 0 (extra search rounds)")
    if args.max_samples < 1 or args.context_len < 2:
        raise EsaError(f"--max-samples {args.max_samples} must be ≥ 1 and --context-len {args.context_len} ≥ 2")
    Thresholds(args.spike_ratio, args.spike_floor, args.min_share, args.require_input_spike, args.massive_ratio,
               args.massive_floor)  # fail on an impossible threshold with its own message, before anything loads
    model = model_entry(args)
    section = {"dataset": args.dataset, "context_len": args.context_len, "max_samples": args.max_samples,
               "iterations": 1 + args.iterate, "spike_ratio": args.spike_ratio, "spike_floor": args.spike_floor,
               "min_share": args.min_share, "require_input_spike": args.require_input_spike,
               "massive_ratio": args.massive_ratio, "massive_floor": args.massive_floor}
    return parse_study({"name": "esa-superweights", "models": [model], "datasets": [args.dataset],
                        "context_lens": [args.context_len], "seeds": [args.seed], "kinds": ["superweights"],
                        "superweights": section}, "esa superweights")


def document(result, db: Path) -> dict:
    """``superweights.json`` of a stored ``superweights`` run (what the detector found, its windows, provenance)."""
    from dataclasses import asdict

    from esa.sensitivity.superweight_run import SuperWeightRun

    run, m = result.run, result.row.metrics
    cfg = SuperWeightRun(run.dataset, run.context_len, run.max_samples, run.seed, run.iterations, run.thresholds)
    report = ("thresholds", "candidates", "massive_activations", "rounds", "n_sequences", "n_tokens")
    return {"schema": "esa.superweights/1", "provenance": result.row.provenance, "model": result.row.model,
            "run": asdict(cfg),
            "data": {**m["data"], "n_sequences": m["n_sequences"], "n_tokens": m["n_tokens"]},
            **{k: m[k] for k in report}, "tokens": m["tokens"], "wall_seconds": m["wall_seconds"],
            "database": str(db), "run_id": result.row.run_id}


def _print(report, json_path, png_path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"super-weight candidates ({len(report.candidates)}): W(row = out, col = in)",
                  caption="|x|, |y|: input and output activation at the spike token t; y/typ: |y| over the "
                          "layer's median channel max; share: fraction of y that vanishes without W·x")
    for col in ("round", "layer", "row", "col", "weight", "|x|", "|y|", "y/typ", "share", "x spike", "t"):
        table.add_column(col, justify="right")
    for w in report.candidates:
        table.add_row(str(w.iteration), str(w.layer), str(w.row), str(w.col), f"{w.weight:.4g}",
                      f"{w.input_activation:.4g}", f"{w.output_activation:.4g}", f"{w.output_ratio:.0f}×",
                      f"{w.share:.2f}", "yes" if w.input_spike else "no", str(w.position))
    console = Console()
    console.print(table)
    layers = sorted({m.layer for m in report.massive_activations})
    channels = sorted({m.channel for m in report.massive_activations})
    console.print(f"massive residual activations: {len(report.massive_activations)} (layer, channel) pairs"
                  + (f" in layers {layers[0]}–{layers[-1]}, channels {channels}" if layers else ""))
    console.print(f"results: {json_path}\nplot: {png_path}")


def _write_doc(path: Path, doc: dict) -> Path:
    """Atomically (temp file + rename); non-finite floats as JSON's NaN/Infinity extension, as always."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, allow_nan=True))
    tmp.replace(path)
    return path


def run(args) -> int:
    from rich.console import Console

    from esa.commands.study import progress_printer
    from esa.executors.one_off import check_out_dir, log_path, run_one_off
    from esa.sensitivity.superweight_plots import plot_activation_profile
    from esa.sensitivity.superweights import report_from_dict
    from esa.tracking import from_args

    out = Path(args.out_dir)
    db = args.db or out / "esa.db"
    check_out_dir(out, db, OWNED, args.overwrite, "esa superweights")
    study = one_off_study(args)
    printer = from_args(args, progress_printer(Console(), log_path(db)), db)
    outcome = run_one_off(study, db, "esa superweights", args.overwrite, printer)
    (result,) = outcome.of("superweights")
    doc = document(result, db)
    for name in OWNED:
        (out / name).unlink(missing_ok=True)  # an older run's files would contradict the database
    json_path = _write_doc(out / "superweights.json", doc)
    report = report_from_dict(doc)
    png_path = plot_activation_profile(report, out / "superweights.png",
                                       title=f"{args.model}: MLP output projection activations "
                                             f"({doc['data']['dataset']})")
    _print(report, json_path, png_path)
    return 0
