"""``esa sensitivity`` (score, rank, check stability across seeds) and ``esa compare-rankings A B``.

``esa sensitivity`` is a one-off study on the engine: the flags become a study with a ``sensitivity:`` section
(kind ``sensitivity`` only; one run per calibration seed — the first seed only for a data-free scorer), run into
``<out-dir>/esa.db``. Rerunning resumes: completed seeds are not scored again. Every file is exported from the
stored runs: ``ranking_seed<S>.*`` from each run's ranking arrays (:func:`esa.kinds.sensitivity.split_floor`),
``ranking.*`` and the plots from the first seed's run, and ``stability.json`` (the top-k overlap across seeds)
from all of them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from esa.commands.baseline import add_model_args, add_output_args, model_entry
from esa.core.errors import EsaError
from esa.sensitivity.ranking import read_ranking
from esa.sensitivity.scorers import SCORERS
from esa.sensitivity.stability import compare_rankings
from esa.sensitivity.topk import MODES

OWNED = ("manifest.json", "stability.json", "ranking.parquet")  # an earlier esa sensitivity run's exports
EXPORTS = ("ranking.*", "ranking_seed*.*", "score_hist.png", "topk_layer_role.png", "stability.json",
           "manifest.json")  # every name this command writes besides the database (globs)


def _check_flags(args: argparse.Namespace) -> None:
    """Fail on a typo or an impossible number before anything is loaded (flag names in the messages)."""
    SCORERS.get(args.scorer)
    for flag, value, low in (("--max-samples", args.max_samples, 1), ("--context-len", args.context_len, 2),
                             ("--batch-size", args.batch_size, 1), ("--k", args.k, 1), ("--probes", args.probes, 1),
                             ("--hist-sample", args.hist_sample, 0)):
        if value < low:
            raise EsaError(f"{flag} {value} must be ≥ {low}")
    if len(set(args.seeds)) != len(args.seeds):
        raise EsaError(f"--seeds {' '.join(map(str, args.seeds))}: list each seed once")


def one_off_study(args: argparse.Namespace):
    """The study ``esa sensitivity`` runs: one model, one scorer, the seeds, kind ``sensitivity`` only.

    ``--max-samples`` windows of ``--context-len`` tokens are ``calibration_tokens = max_samples × context_len``
    (the kind draws ``ceil(tokens / context_len)`` windows: exactly ``max_samples``)."""
    from esa.study import parse_study

    section = {"scorers": [args.scorer], "k": args.k, "mode": args.mode, "bottom": args.bottom,
               "calibration_dataset": args.calib_dataset, "context_len": args.context_len,
               "calibration_tokens": args.max_samples * args.context_len, "params": list(args.params),
               "include_embeddings": args.include_embeddings, "include_norms": args.include_norms,
               "include_biases": args.include_biases, "probes": args.probes, "batch_size": args.batch_size,
               "hist_sample": args.hist_sample}
    return parse_study({"name": "esa-sensitivity", "models": [model_entry(args)],
                        "datasets": [args.calib_dataset], "context_lens": [args.context_len],
                        "seeds": list(args.seeds), "kinds": ["sensitivity"], "sensitivity": section},
                       "esa sensitivity")


def _clear_exports(out: Path) -> None:
    """Remove an earlier run's exported files (they would contradict the database); nothing else."""
    for pattern in EXPORTS:
        for path in out.glob(pattern):
            if path.is_file():
                path.unlink()


def export(args: argparse.Namespace, outcome, seconds: float) -> dict:
    """Write every file of ``--out-dir`` from the stored runs of ``outcome``; return the stability summary."""
    from esa.kinds.sensitivity import SAMPLE_ARRAY, split_floor
    from esa.sensitivity import plots
    from esa.sensitivity.ranking import write_ranking
    from esa.sensitivity.stability import seed_overlap

    out = Path(args.out_dir)
    hits = outcome.of("sensitivity")  # one per seed run, in --seeds order
    _clear_exports(out)
    tables, files = {}, []
    for hit in hits:
        table, floor = split_floor(hit.arrays)
        tables[hit.run.seed] = table
        files += write_ranking(table, out / f"ranking_seed{hit.run.seed}", hit.row.model, floor)
    first, metrics = hits[0], [h.row.metrics for h in hits]
    table, floor = split_floor(first.arrays)
    files += write_ranking(table, out / "ranking", first.row.model, floor)
    label = f"{args.model} · {args.scorer} · seed {first.run.seed}"
    files.append(plots.score_histogram(first.arrays[SAMPLE_ARRAY], out / "score_hist.png",
                                       f"score distribution: {label}"))
    files.append(plots.layer_role_heatmap(table, out / "topk_layer_role.png",
                                          f"{'bottom' if args.bottom else 'top'}-{args.k} ({args.mode}): {label}"))
    stability = {
        "scorer": args.scorer, "k": args.k, "mode": args.mode, "direction": "bottom" if args.bottom else "top",
        "seed_invariant": all(m["seed_invariant"] for m in metrics), **seed_overlap(tables),
        "per_seed": [{"seed": h.run.seed, "tail": m["tail"], "calibration": m["calibration"],
                      "score_seconds": m["score_seconds"], "topk_seconds": m["topk_seconds"],
                      "stats_seconds": m["stats_seconds"]} for h, m in zip(hits, metrics)],
    }
    (out / "stability.json").write_text(json.dumps(stability, indent=1, default=float))
    flags = {k: v for k, v in vars(args).items() if k not in ("func", "no_progress", "verbose", "command")}
    manifest = {"command": "sensitivity", "config": json.loads(json.dumps(flags, default=str)),
                "model": first.row.model, "n_selected_params": metrics[0]["n_selected_params"],
                "n_selected_weights": metrics[0]["n_selected_weights"], "seeds_run": [h.run.seed for h in hits],
                "database": str(outcome.db), "run_ids": [h.row.run_id for h in hits],
                "provenance": first.row.provenance, "wall_seconds": seconds,
                "files": sorted({p.name for p in files} | {"stability.json"})}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    return stability


def _sensitivity(args: argparse.Namespace) -> int:
    from rich.console import Console

    from esa.commands.study import progress_printer
    from esa.executors.one_off import check_out_dir, log_path, run_one_off
    from esa.tracking import from_args

    _check_flags(args)
    out = Path(args.out_dir)
    db = Path(args.db) if args.db else out / "esa.db"
    check_out_dir(out, db, OWNED, args.overwrite, "esa sensitivity")
    study = one_off_study(args)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    console = Console()
    printer = from_args(args, progress_printer(console, log_path(db)), db)
    outcome = run_one_off(study, db, "esa sensitivity", args.overwrite, printer)
    stab = export(args, outcome, time.perf_counter() - start)
    print(f"{args.scorer}: {'bottom' if args.bottom else 'top'}-{args.k} ({args.mode}) written to {args.out_dir} "
          f"(database {db})")
    for row in stab["per_seed"]:
        t = row["tail"]
        print(f"  seed {row['seed']}: top 0.1% share {t['top_0.1pct_share']:.4f}, top 1% share "
              f"{t['top_1pct_share']:.4f}, gini {t['gini']:.4f}, non-finite {t['n_nonfinite']}")
    if stab["jaccard_mean"] is not None:
        print(f"  top-k Jaccard across seeds: mean {stab['jaccard_mean']:.3f}, min {stab['jaccard_min']:.3f}")
    if stab["seed_invariant"]:
        print("  note: seed-invariant (the scorer uses no data, or every calibration window was used)")
    return 0


def _compare(args: argparse.Namespace) -> int:
    result = compare_rankings(read_ranking(args.a), read_ranking(args.b))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"Jaccard {result['jaccard']:.4f} ({result['n_common']} common of {result['n_union']}), "
          f"Spearman on the union {result['spearman_union']:.4f}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sensitivity", help="score weight sensitivity, rank the top-k, check stability",
        description="A one-off study (kind sensitivity, one run per seed) in <out-dir>/esa.db: rerunning resumes "
                    "and scores only the seeds not yet stored. Exports ranking.* and ranking_seed<S>.* "
                    "(parquet, csv, meta.json, floor.parquet), score_hist.png, topk_layer_role.png, "
                    "stability.json and manifest.json from the stored runs.")
    p.add_argument("--model", default="smollm2-135m", help="alias, hub id, local dir or .gguf")
    add_model_args(p)
    p.add_argument("--scorer", default="grad_x_weight", help=f"one of: {', '.join(SCORERS.names())}")
    p.add_argument("--calib-dataset", "--dataset", dest="calib_dataset", default="python-docs",
                   help="calibration corpus name or .txt/.jsonl path")
    p.add_argument("--max-samples", type=int, default=32, help="calibration windows per seed")
    p.add_argument("--context-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward pass")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration seeds (resample windows)")
    p.add_argument("--params", nargs="+", default=["*"], help="fnmatch globs on parameter names")
    p.add_argument("--include-embeddings", action="store_true", help="also score input/output embeddings")
    p.add_argument("--include-norms", action="store_true", help="also score norm weights")
    p.add_argument("--include-biases", action="store_true", help="also score biases")
    p.add_argument("--k", type=int, default=100, help="weights to rank (global) or per tensor (per_layer)")
    p.add_argument("--mode", choices=MODES, default="global")
    p.add_argument("--bottom", action="store_true", help="rank the k least sensitive weights instead")
    p.add_argument("--probes", type=int, default=8, help="Hutchinson probes per calibration batch")
    p.add_argument("--hist-sample", type=int, default=200_000, help="scores sampled for the histogram")
    add_output_args(p, None, "the exported files")
    p.set_defaults(func=_sensitivity)

    c = subparsers.add_parser("compare-rankings", help="Jaccard + Spearman of two ranking files")
    c.add_argument("a", help="ranking .parquet or .csv")
    c.add_argument("b", help="ranking .parquet or .csv")
    c.add_argument("--json", help="also write the comparison to this JSON file")
    c.set_defaults(func=_compare)
