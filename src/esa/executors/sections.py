"""Executing sensitivity and perturbation runs (:mod:`esa.study_sections`) on a loaded model.

A runner is ``(lm, run, ctx: RunContext) -> (metrics, arrays)``; the arrays become the run's ``per_window.npz``.

* **sensitivity** — :func:`~esa.sensitivity.ranking.score_and_rank` on seeded calibration windows. Arrays: the
  ranking table column by column (``param``, ``layer`` (-1: none), ``role``, ``row``, ``col`` (-1: 1-D),
  ``score``, ``weight``, ``rank``) — a ranking has no windows, and arrays are what travels back from a Ray
  worker. The driver also writes them as ``artifacts/<run_id>/ranking.parquet`` (and ``.csv``) through
  :func:`~esa.sensitivity.ranking.write_ranking` before committing the row (:func:`write_ranking_artifact`).
  Metrics: heavy-tail statistics, top-k counts per role and per layer, scorer / top-k / statistics seconds,
  the calibration set, and ``perplexity`` — the unperturbed model's on the calibration windows (where the
  scores were taken); NaN for a data-free scorer, which reads no calibration windows.
* **perturbation** — :func:`~esa.perturb.protocols.perturb_experiment` with the run's :class:`PerturbConfig`
  (:func:`perturb_config`). A ranking target reads the ranking of the sensitivity run it depends on, from the
  :class:`RunContext` (filled by sensitivity runs of this process, or by the driver from the store). Metrics:
  every paired comparison (mean ΔNLL, bootstrap-t CI, Wilcoxon/t-test p-values with Holm and BH, PPL ratio,
  collapsed), separation ratios, per-arm sizes and seeds, the baseline, notes; ``perplexity`` is the target
  arm's perturbed PPL. Arrays: perturb.npz's (window_index, n_scored, baseline_nll, ``<arm>_nll``,
  ``<arm>_nll_per_seed``, ``delta__<comparison>``).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from esa.errors import EsaError
from esa.models import LoadedModel

RANKING_FILE = "ranking.parquet"  # in artifacts/<run_id>/, next to per_window.npz


FLOOR_PREFIX = "floor__"  # arrays of a top ranking's floor table (the bottom_k control's source)


def floor_key(rid: str) -> str:
    """The :attr:`RunContext.rankings` key of sensitivity run ``rid``'s floor table."""
    return f"{rid}/floor"


@dataclass
class RunContext:
    """What the runs of one model group share in one process: corpora, and rankings by sensitivity run id
    (``<run id>`` → its table, ``floor_key(<run id>)`` → its floor table, for top rankings)."""

    corpora: dict = field(default_factory=dict)
    rankings: dict[str, pd.DataFrame] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- ranking <-> arrays
def ranking_arrays(table: pd.DataFrame) -> dict[str, np.ndarray]:
    """A ranking table as plain numpy columns (no pickled objects; -1 stands for a missing layer/col)."""
    return {"param": table["param"].to_numpy(dtype=str), "role": table["role"].to_numpy(dtype=str),
            "layer": table["layer"].astype("Int64").fillna(-1).to_numpy(dtype=np.int64),
            "row": table["row"].to_numpy(dtype=np.int64),
            "col": table["col"].astype("Int64").fillna(-1).to_numpy(dtype=np.int64),
            "score": table["score"].to_numpy(dtype=np.float64), "weight": table["weight"].to_numpy(np.float64),
            "rank": table["rank"].to_numpy(dtype=np.int64)}


def ranking_table(arrays: dict[str, np.ndarray]) -> pd.DataFrame:
    """Inverse of :func:`ranking_arrays`, in the column order and dtypes of esa.sensitivity.ranking."""
    from esa.sensitivity.ranking import COLUMNS

    def nullable(a: np.ndarray) -> pd.arrays.IntegerArray:
        return pd.array(np.where(a < 0, None, a), dtype="Int64")

    table = pd.DataFrame({"param": arrays["param"].astype(str), "layer": nullable(arrays["layer"]),
                          "role": arrays["role"].astype(str), "row": arrays["row"], "col": nullable(arrays["col"]),
                          "score": arrays["score"], "weight": arrays["weight"], "rank": arrays["rank"]})
    return table[COLUMNS]


def split_floor(arrays: dict[str, np.ndarray]) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(ranking table, floor table or None) of a sensitivity run's arrays."""
    floor = {k.removeprefix(FLOOR_PREFIX): v for k, v in arrays.items() if k.startswith(FLOOR_PREFIX)}
    top = {k: v for k, v in arrays.items() if not k.startswith(FLOOR_PREFIX)}
    return ranking_table(top), ranking_table(floor) if floor else None


def write_ranking_artifact(directory: Path, arrays: dict[str, np.ndarray], model: dict) -> Path:
    """Write ``ranking.parquet``/``.csv``/``.meta.json`` (+ ``ranking.floor.parquet``; with the scored model's
    fingerprint ``model``) into ``directory`` via a staging dir and renames (crash-safe)."""
    from esa.sensitivity.ranking import write_ranking

    directory.mkdir(parents=True, exist_ok=True)
    table, floor = split_floor(arrays)
    with tempfile.TemporaryDirectory(prefix=".ranking-", dir=directory) as stage:
        for path in write_ranking(table, Path(stage) / "ranking", model, floor):
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(path, directory / path.name)
    return directory / RANKING_FILE


# --------------------------------------------------------------------------------------------- sensitivity
def _calibration_perplexity(model, batches) -> float:
    """exp(mean NLL) of the unperturbed model over every scored calibration token."""
    from esa.evals.perplexity import score_batch

    device = model.get_input_embeddings().weight.device
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            out = score_batch(model, b.ids.to(device), b.attn.to(device), b.scored.to(device))
            nll, n = nll + float(out[0].sum()), n + int(out[1].sum())
    x = nll / n
    return x if math.isnan(x) else (math.exp(x) if x < 700 else math.inf)


def _topk_summary(table: pd.DataFrame) -> dict:
    layers = table["layer"].astype("Int64").fillna(-1).astype(int)
    return {"topk_by_role": {str(k): int(v) for k, v in table["role"].value_counts().sort_index().items()},
            "topk_by_layer": {str(k): int(v) for k, v in layers.value_counts().sort_index().items()},
            "topk_n_params": int(table["param"].nunique()), "topk_rows": len(table),
            "topk_score_min": float(table["score"].min()) if len(table) else None,
            "topk_score_max": float(table["score"].max()) if len(table) else None}


def execute_sensitivity(lm: LoadedModel, run, ctx: RunContext) -> tuple[dict, dict[str, np.ndarray]]:
    """Score and rank one (scorer, seed, direction) on seeded calibration windows."""
    from esa.executors import run_key
    from esa.sensitivity.calibration import CalibrationSpec, calibration_batches
    from esa.sensitivity.ranking import score_and_rank
    from esa.sensitivity.scorers import SCORERS, ScoreOptions, select_params

    start = time.perf_counter()
    needs_data = SCORERS.get(run.scorer).needs_data
    calib = None
    if needs_data:  # a data-free scorer (magnitude) reads no calibration windows at all
        limit = lm.fingerprint.max_positions
        if limit is not None and run.context_len > limit:
            raise EsaError(f"sensitivity.context_len {run.context_len} exceeds {run.model.name}'s {limit} "
                           f"positions; set sensitivity.context_len ≤ {limit}")
        spec = CalibrationSpec(run.dataset, run.max_samples, run.context_len, run.seed)
        calib = calibration_batches(lm.tokenizer, spec)
    params = select_params(lm.model, run.params)
    res = score_and_rank(lm.model, params, calib.batches if calib else (), run.scorer, run.k, run.mode,
                         not run.bottom, ScoreOptions(seed=run.seed))
    arrays = ranking_arrays(res.table)
    rid = run_key(run, lm.fingerprint.to_dict())
    ctx.rankings[rid] = res.table
    if res.floor is not None:
        arrays |= {FLOOR_PREFIX + k: v for k, v in ranking_arrays(res.floor).items()}
        ctx.rankings[floor_key(rid)] = res.floor
    ppl = _calibration_perplexity(lm.model, calib.batches) if calib else math.nan
    metrics = {"perplexity": ppl, "tail": res.tail,
               **_topk_summary(res.table), "score_seconds": res.score_seconds, "topk_seconds": res.topk_seconds,
               "stats_seconds": res.stats_seconds, "calibration": calib.describe() if calib else None,
               "seed_invariant": calib is None or calib.seed_invariant, "n_selected_params": len(params),
               "n_selected_weights": sum(p.numel() for p in params.values()),
               "wall_seconds": time.perf_counter() - start}
    return metrics, arrays


# -------------------------------------------------------------------------------------------- perturbation
def _ranking_of(ctx: RunContext, deps: dict, role: str, label: str) -> pd.DataFrame:
    rid = deps[role]
    if rid not in ctx.rankings:
        raise EsaError(f"{label} needs the ranking of sensitivity run {rid[:12]}, which has not completed; "
                       "see that run's error and rerun the study")
    return ctx.rankings[rid]


def perturb_config(run, ranking_file: str | None = None):
    """The :class:`PerturbConfig` of a perturbation run, given its ranking file (for ranking targets).

    A top-ranking target's bottom_k control comes from the floor table written beside that file."""
    from esa.perturb.protocols import EvalConfig, PerturbConfig

    targets = run.spec if run.spec is not None else f"topk:{ranking_file}:{run.k}"
    data = EvalConfig(run.dataset, run.context_len, run.max_eval_tokens, run.seed, run.batch_tokens)
    return PerturbConfig(targets, run.op, run.controls, None, run.control_seeds, data)


def write_dependency_ranking(run, ctx: RunContext, deps: dict, tmp: Path, model: dict) -> str | None:
    """The run's ranking (and its floor table) written to ``tmp``, or None without a ranking dependency.

    A bottom target keeps only its k lowest rows (``topk:`` takes the highest). A ranking read from the store
    carries its own fingerprint (which the protocol checks against the loaded model); one made in this process
    was scored on ``model``."""
    from esa.sensitivity.ranking import write_ranking

    if "ranking" not in deps:
        return None
    table = _ranking_of(ctx, deps, "ranking", run.label())
    scored_on = table.attrs.get("model") or model
    if getattr(run, "bottom", False):
        table = table.sort_values("score", ascending=True, kind="stable", na_position="last").head(run.k)
    return str(write_ranking(table, tmp / "ranking", scored_on, ctx.rankings.get(floor_key(deps["ranking"])))[0])


def _metrics(doc: dict, files: dict[str, str]) -> dict:
    """The stored metrics: perturb.json without provenance/model/config (in the row already) and element lists;
    temporary ranking file names are replaced by the sensitivity run ids they came from."""
    def source(text: str) -> str:
        for path, rid in files.items():
            text = text.replace(path, f"<ranking of run {rid}>")
        return text

    comps = {c["name"]: c for c in doc["comparisons"]}
    target = comps.get("target vs baseline", {})
    arms = [{k: a[k] for k in ("name", "op", "n_elements", "seeds", "tensors")} | {
            "source": source(a["source"]), "seed_spread": a["seed_spread"]} for a in doc["arms"]]
    data = {k: v for k, v in doc["data"].items() if k not in ("window_indices", "calibration_indices")}
    return {"perplexity": target.get("ppl_perturbed"), "baseline_perplexity": doc["baseline"]["perplexity"],
            "mean_delta_nll": target.get("mean_delta_nll"), "collapsed": target.get("collapsed"),
            "comparisons": comps, "separation": doc["separation"], "arms": arms, "baseline": doc["baseline"],
            "data": data, "targets": {k: v for k, v in doc["targets"].items() if k not in ("spec", "ranking")},
            "notes": [source(n) for n in doc["notes"]], "wall_seconds": doc["wall_seconds"]}


def execute_perturbation(lm: LoadedModel, run, ctx: RunContext) -> tuple[dict, dict[str, np.ndarray]]:
    """Protocol 1 (targets vs controls, paired on the same windows) for one target and one op setting."""
    from esa.executors import resolved_config
    from esa.perturb.protocols import perturb_experiment

    fingerprint = lm.fingerprint.to_dict()
    deps = resolved_config(run, fingerprint).get("depends_on", {})
    with tempfile.TemporaryDirectory(prefix="esa-perturb-") as tmp:
        ranking_file = write_dependency_ranking(run, ctx, deps, Path(tmp), fingerprint)
        doc, arrays = perturb_experiment(lm, perturb_config(run, ranking_file))
    return _metrics(doc, {ranking_file: deps["ranking"]} if ranking_file else {}), arrays


# ------------------------------------------------------------------------------------------- cost estimate
# Forward-equivalent passes per calibration token (a backward ≈ 2 forwards, a Hessian-vector product ≈ 2
# gradients), plus one forward for the calibration perplexity. An estimate for `esa plan`, not a measurement.
SCORER_PASSES = {"magnitude": 0, "grad": 4, "grad_x_weight": 4, "grad_squared": 4, "hutchinson_diag": 4 + 8 * 6,
                 "wanda": 2, "act_mag": 2}


def cost(run) -> tuple[int | None, float]:
    """(tokens, forward-equivalent passes over them) of a sensitivity or perturbation run."""
    if run.kind == "sensitivity":
        passes = float(SCORER_PASSES.get(run.scorer, 4))
        return (run.max_samples * (run.context_len - 1) if passes else 0), passes
    from esa.perturb.protocols import STOCHASTIC_OPS

    repeats = len(run.control_seeds) if run.op.partition(":")[0] in STOCHASTIC_OPS else 1
    arms = repeats + (len(run.control_seeds) if "random_k" in run.controls else 0) \
        + (repeats if "bottom_k" in run.controls else 0)
    return run.max_eval_tokens, 1.0 + arms  # the baseline pass + every trial (upper bound: prefix cache saves)
