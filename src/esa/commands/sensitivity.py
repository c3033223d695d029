"""``esa sensitivity`` (score, rank, check stability across seeds) and ``esa compare-rankings A B``."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from esa.models import ModelSpec, load_model
from esa.provenance import provenance
from esa.runs import check_out_dir
from esa.sensitivity import plots
from esa.sensitivity.calibration import CalibrationSpec, calibration_batches
from esa.sensitivity.ranking import read_ranking, score_and_rank, write_ranking
from esa.sensitivity.scorers import SCORERS, ScoreOptions, select_params
from esa.sensitivity.stability import compare_rankings, seed_overlap
from esa.sensitivity.topk import MODES, check_k


@dataclass(frozen=True)
class SensitivityConfig:
    model: str
    dtype: str
    device: str
    scorer: str
    calib_dataset: str
    max_samples: int  # calibration windows per seed
    context_len: int
    batch_size: int
    seeds: tuple[int, ...]  # each seed resamples the calibration windows (and Hutchinson probes)
    params: tuple[str, ...]  # fnmatch globs on named_parameters() names
    include_embeddings: bool
    include_norms: bool
    include_biases: bool
    k: int
    mode: str  # global | per_layer
    bottom: bool  # rank the k *least* sensitive weights instead
    probes: int
    hist_sample: int  # scores sampled for the histogram only
    out_dir: str


def _prepare_out(out_dir: Path, overwrite: bool) -> None:
    """An empty ``out_dir``: a non-empty one is cleared only with ``overwrite`` and only when it holds an
    earlier ``esa sensitivity`` run (its manifest, ranking or stability file)."""
    if check_out_dir(out_dir, overwrite, ("manifest.json", "ranking.parquet", "stability.json"),
                     "esa sensitivity").is_dir():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def _one_seed(cfg: SensitivityConfig, loaded, params, seed: int, out: Path) -> dict:
    needs_data = SCORERS.get(cfg.scorer).needs_data
    calib = None
    batches: tuple = ()
    if needs_data:
        spec = CalibrationSpec(cfg.calib_dataset, cfg.max_samples, cfg.context_len, seed, cfg.batch_size)
        calib = calibration_batches(loaded.tokenizer, spec)
        batches = calib.batches
    res = score_and_rank(loaded.model, params, batches, cfg.scorer, cfg.k, cfg.mode, not cfg.bottom,
                         ScoreOptions(cfg.probes, seed), cfg.hist_sample)
    write_ranking(res.table, out / f"ranking_seed{seed}", loaded.fingerprint.to_dict(), res.floor)
    return {"seed": seed, "result": res, "calibration": calib.describe() if calib else None}


def run_sensitivity(cfg: SensitivityConfig, overwrite: bool = False) -> dict:
    """Score, rank and write every artefact of one ``esa sensitivity`` run; return the stability summary."""
    info = SCORERS.get(cfg.scorer)
    out = Path(cfg.out_dir)
    _prepare_out(out, overwrite)
    start = time.perf_counter()
    loaded = load_model(ModelSpec(cfg.model, cfg.dtype, cfg.device))
    params = select_params(loaded.model, cfg.params, include_embeddings=cfg.include_embeddings,
                           include_norms=cfg.include_norms, include_biases=cfg.include_biases)
    check_k(cfg.k, cfg.mode, {n: p.numel() for n, p in params.items()})
    seeds = cfg.seeds if info.needs_data else cfg.seeds[:1]  # no data → the seed changes nothing
    runs = [_one_seed(cfg, loaded, params, s, out) for s in seeds]
    first = runs[0]["result"]
    files = write_ranking(first.table, out / "ranking", loaded.fingerprint.to_dict(), first.floor)
    label = f"{cfg.model} · {cfg.scorer} · seed {seeds[0]}"
    files.append(plots.score_histogram(first.sample, out / "score_hist.png", f"score distribution: {label}"))
    files.append(plots.layer_role_heatmap(first.table, out / "topk_layer_role.png",
                                          f"{'bottom' if cfg.bottom else 'top'}-{cfg.k} ({cfg.mode}): {label}"))
    stability = {
        "scorer": cfg.scorer, "k": cfg.k, "mode": cfg.mode, "direction": "bottom" if cfg.bottom else "top",
        "seed_invariant": not info.needs_data or all(r["calibration"]["seed_invariant"] for r in runs),
        **seed_overlap({r["seed"]: r["result"].table for r in runs}),
        "per_seed": [{"seed": r["seed"], "tail": r["result"].tail, "calibration": r["calibration"],
                      "score_seconds": r["result"].score_seconds, "topk_seconds": r["result"].topk_seconds,
                      "stats_seconds": r["result"].stats_seconds} for r in runs],
    }
    (out / "stability.json").write_text(json.dumps(stability, indent=1, default=float))
    manifest = {"command": "sensitivity", "config": asdict(cfg), "model": loaded.fingerprint.to_dict(),
                "n_selected_params": len(params), "n_selected_weights": sum(p.numel() for p in params.values()),
                "seeds_run": list(seeds), "provenance": provenance(loaded.device),
                "wall_seconds": time.perf_counter() - start,
                "files": [p.name for p in files]
                + [f"ranking_seed{s}.{e}" for s in seeds
                   for e in ("parquet", "csv", "meta.json") + (("floor.parquet",) if not cfg.bottom else ())]
                + ["stability.json"]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
    return stability


def _sensitivity(args: argparse.Namespace) -> int:
    cfg = SensitivityConfig(
        args.model, args.dtype, args.device, args.scorer, args.calib_dataset, args.max_samples, args.context_len,
        args.batch_size, tuple(args.seeds), tuple(args.params), args.include_embeddings, args.include_norms,
        args.include_biases, args.k, args.mode, args.bottom, args.probes, args.hist_sample, args.out_dir)
    SCORERS.get(cfg.scorer)  # fail on a typo before loading anything
    stab = run_sensitivity(cfg, args.overwrite)
    print(f"{cfg.scorer}: {'bottom' if cfg.bottom else 'top'}-{cfg.k} ({cfg.mode}) written to {cfg.out_dir}")
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
    p = subparsers.add_parser("sensitivity", help="score weight sensitivity, rank the top-k, check stability")
    p.add_argument("--model", default="smollm2-135m", help="alias, hub id, local dir or .gguf")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16 (scores are always fp32)")
    p.add_argument("--device", default="auto")
    p.add_argument("--scorer", default="grad_x_weight", help=f"one of: {', '.join(SCORERS.names())}")
    p.add_argument("--calib-dataset", default="python-docs", help="corpus name or .txt/.jsonl path")
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
    p.add_argument("--out-dir", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_sensitivity)

    c = subparsers.add_parser("compare-rankings", help="Jaccard + Spearman of two ranking files")
    c.add_argument("a", help="ranking .parquet or .csv")
    c.add_argument("b", help="ranking .parquet or .csv")
    c.add_argument("--json", help="also write the comparison to this JSON file")
    c.set_defaults(func=_compare)
