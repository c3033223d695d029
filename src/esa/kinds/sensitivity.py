"""Run kind ``sensitivity``: score every selected weight of one model with one scorer and keep the top (or
bottom) k — plus, for top rankings, the per-tensor floor table that a bottom_k control draws from.

Study section ``sensitivity:`` (:class:`SensitivitySection`). Runs — one per model × scorer × calibration seed ×
direction:

* a data-free scorer (``magnitude``) runs for the first seed only (the seed would change nothing);
* direction ``top`` (a top ranking keeps its floor table, for ``bottom_k``), or ``bottom`` (the k *least*
  sensitive weights) with the section's ``bottom: true``; a perturbation section's ``bottom: true`` target adds
  the bottom ranking it needs as a dependency;
* ``calibration_tokens`` becomes ``ceil(tokens / context_len)`` chunks windows. Example: 65 536 tokens at
  context 512 → 128 windows (127 scored tokens each: the first token of a window is never predicted).

Execution: :func:`~esa.sensitivity.ranking.score_and_rank` on seeded calibration windows. Arrays: the ranking
table column by column (``param``, ``layer`` (-1: none), ``role``, ``row``, ``col`` (-1: 1-D), ``score``,
``weight``, ``rank``; the floor table's columns prefixed ``floor__``) and ``hist__score``, a uniform sample of
``hist_sample`` finite scores for the score histogram — a ranking has no windows, and arrays are what travels
back from a Ray worker. Before the row is committed the driver writes them as
``artifacts/<run_id>/ranking.parquet`` (+ ``.csv``, ``ranking.floor.parquet``) through
:func:`~esa.sensitivity.ranking.write_ranking`. Metrics: heavy-tail statistics, top-k counts per role and per
layer, scorer / top-k / statistics seconds, the calibration set, and ``perplexity`` — the unperturbed model's on
the calibration windows (NaN for a data-free scorer, which reads no calibration windows).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from esa.core.errors import EsaError
from esa.kinds.base import KindRun, ReportSection, RunContext, RunKind
from esa.models import LoadedModel, ModelSpec, check_context
from esa.core.registry import suggest
from esa.report.study_sensitivity import sensitivity_section
from esa.sensitivity.scorers import SCORERS
from esa.study import Study, check_dataset, model_specs, require

RANKING_FILE = "ranking.parquet"  # in artifacts/<run_id>/, next to per_window.npz
FLOOR_PREFIX = "floor__"  # arrays of a top ranking's floor table (the bottom_k control's source)
SAMPLE_ARRAY = "hist__score"  # a uniform random sample of the finite scores, for the histogram only
# Forward-equivalent passes per calibration token (a backward ≈ 2 forwards, a Hessian-vector product ≈ 2
# gradients), plus one forward for the calibration perplexity. An estimate for `esa plan`, not a measurement.
SCORER_PASSES = {"magnitude": 0, "grad": 4, "grad_x_weight": 4, "grad_squared": 4, "hutchinson_diag": 4 + 8 * 6,
                 "wanda": 2, "act_mag": 2}


# ------------------------------------------------------------------------------------------------- section
@dataclass(frozen=True)
class SensitivitySection:
    """Which scorers rank weights, and how many top weights each ranking keeps."""

    scorers: tuple[str, ...]  # names in esa.sensitivity.scorers.SCORERS
    k: int  # top-k weights kept per scorer
    calibration_dataset: str | None = None  # None → the study's first dataset
    calibration_tokens: int = 65_536  # ≈ scored tokens used by data-dependent scorers (whole windows)
    params: tuple[str, ...] = ()  # fnmatch globs of parameters to score; empty → every 2-D weight
    mode: str = "global"  # global: k over the model | per_layer: k per tensor
    context_len: int | None = None  # calibration window length; None → the study's first context length
    bottom: bool = False  # rank the k *least* sensitive weights instead (no floor table)
    include_embeddings: bool = False  # also score input/output embeddings (excluded from every glob otherwise)
    include_norms: bool = False  # also score norm weights
    include_biases: bool = False  # also score biases
    probes: int = 8  # Hutchinson probes per calibration batch (hutchinson_diag only)
    batch_size: int = 8  # calibration windows per forward/backward pass (B)
    hist_sample: int = 200_000  # scores sampled (stored as an array) for the score histogram only


def check(s: SensitivitySection, study: Study, where: str) -> None:
    for i, name in enumerate(s.scorers):
        if name not in SCORERS:
            raise EsaError(f"{where}.scorers[{i}]: " + suggest(name, SCORERS.names(), "scorer"))
    require(len(set(s.scorers)) == len(s.scorers), f"{where}.scorers: duplicate scorer names")
    require(s.k >= 1 and s.calibration_tokens >= 1, f"{where}: k and calibration_tokens must be ≥ 1")
    require(s.mode in ("global", "per_layer"), f"{where}.mode: " + suggest(s.mode, ["global", "per_layer"], "mode"))
    require(s.context_len is None or s.context_len >= 2, f"{where}.context_len must be ≥ 2 (or null)")
    require(s.probes >= 1 and s.batch_size >= 1, f"{where}: probes and batch_size must be ≥ 1")
    require(s.hist_sample >= 0, f"{where}.hist_sample must be ≥ 0 (0: no histogram sample)")
    if s.calibration_dataset is not None:
        check_dataset(s.calibration_dataset, f"{where}.calibration_dataset")


# ----------------------------------------------------------------------------------------------- expansion
@dataclass(frozen=True)
class SensitivityRun(KindRun):
    """Score every selected weight of one model with one scorer and keep the top (or bottom) k."""

    kind: ClassVar[str] = "sensitivity"
    model: ModelSpec
    scorer: str
    k: int
    mode: str  # global | per_layer
    bottom: bool  # True: the k least sensitive weights
    dataset: str  # calibration corpus
    context_len: int  # calibration window length T
    max_samples: int  # calibration windows
    seed: int  # picks the calibration windows (and Hutchinson probes)
    params: tuple[str, ...]  # fnmatch globs; ("*",) → every 2-D weight but embeddings and norms
    include_embeddings: bool = False  # the select_params flags: parameters the globs skip unless set
    include_norms: bool = False
    include_biases: bool = False
    probes: int = 8  # Hutchinson probes per calibration batch
    batch_size: int = 8  # calibration windows per pass (B)
    hist_sample: int = 200_000  # scores sampled for the histogram (array ``hist__score``)

    def label(self) -> str:
        side = "bottom" if self.bottom else "top"
        return f"{self.model.name} sensitivity {self.scorer} {side}-{self.k} ({self.mode}) seed={self.seed}"



def _calib(study: Study) -> tuple[str, int]:
    s = study.section("sensitivity")
    return s.calibration_dataset or study.datasets[0], s.context_len or study.context_lens[0]


def sensitivity_run(study: Study, spec: ModelSpec, scorer: str, seed: int, bottom: bool) -> SensitivityRun:
    """The ranking run of ``scorer`` for ``seed`` (seed-invariant scorers: the study's first seed); other kinds
    depend on it, and the engine adds it to the study's runs (a bottom ranking exists only as a dependency)."""
    s = study.section("sensitivity")
    dataset, ctx = _calib(study)
    if not SCORERS.get(scorer).needs_data:
        seed = study.seeds[0]
    return SensitivityRun(spec, scorer, s.k, s.mode, bottom, dataset, ctx, math.ceil(s.calibration_tokens / ctx),
                          seed, s.params or ("*",), s.include_embeddings, s.include_norms, s.include_biases,
                          s.probes, s.batch_size, s.hist_sample)


def expand(study: Study) -> list[SensitivityRun]:
    """model × scorer × seed (first seed only for data-free scorers) rankings, model-major: top rankings, or
    bottom ones with ``bottom: true``."""
    s = study.section("sensitivity")
    if s is None:
        return []
    return [sensitivity_run(study, spec, scorer, seed, s.bottom) for spec in model_specs(study)
            for scorer in s.scorers for seed in (study.seeds if SCORERS.get(scorer).needs_data else study.seeds[:1])]


# ---------------------------------------------------------------------------------------- ranking <-> arrays
def floor_key(rid: str) -> str:
    """The :attr:`RunContext.rankings` key of sensitivity run ``rid``'s floor table."""
    return f"{rid}/floor"


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
    top = {k: v for k, v in arrays.items() if not k.startswith(FLOOR_PREFIX) and k != SAMPLE_ARRAY}
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


def ranking_of(ctx: RunContext, label: str) -> pd.DataFrame:
    """The ranking of the current run's ``ranking`` dependency (made in this process or read from the store)."""
    rid = ctx.depends_on["ranking"]
    if rid not in ctx.rankings:
        raise EsaError(f"{label} needs the ranking of sensitivity run {rid[:12]}, which has not completed; "
                       "see that run's error and rerun the study")
    return ctx.rankings[rid]


def dependency_ranking_file(run, ctx: RunContext, tmp: Path, model: dict) -> str | None:
    """The current run's ranking (and its floor table) written to ``tmp``, or None without a ranking dependency.

    A bottom target keeps only its k lowest rows (``topk:`` takes the highest). A ranking read from the store
    carries its own fingerprint (which the protocol checks against the loaded model); one made in this process
    was scored on ``model``."""
    from esa.sensitivity.ranking import write_ranking

    if "ranking" not in ctx.depends_on:
        return None
    table = ranking_of(ctx, run.label())
    scored_on = table.attrs.get("model") or model
    if getattr(run, "bottom", False):
        table = table.sort_values("score", ascending=True, kind="stable", na_position="last").head(run.k)
    floor = ctx.rankings.get(floor_key(ctx.depends_on["ranking"]))
    return str(write_ranking(table, tmp / "ranking", scored_on, floor)[0])


# ----------------------------------------------------------------------------------------------- execution
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


def execute(lm: LoadedModel, run, ctx: RunContext) -> tuple[dict, dict[str, np.ndarray]]:
    """Score and rank one (scorer, seed, direction) on seeded calibration windows."""
    from esa.sensitivity.calibration import CalibrationSpec, calibration_batches
    from esa.sensitivity.ranking import score_and_rank
    from esa.sensitivity.scorers import SCORERS, ScoreOptions, select_params

    start = time.perf_counter()
    needs_data = SCORERS.get(run.scorer).needs_data
    calib = None
    if needs_data:  # a data-free scorer (magnitude) reads no calibration windows at all
        check_context(lm, run.context_len, "sensitivity.context_len")
        spec = CalibrationSpec(run.dataset, run.max_samples, run.context_len, run.seed, run.batch_size)
        calib = calibration_batches(lm.tokenizer, spec)
    params = select_params(lm.model, run.params, include_embeddings=run.include_embeddings,
                           include_norms=run.include_norms, include_biases=run.include_biases)
    res = score_and_rank(lm.model, params, calib.batches if calib else (), run.scorer, run.k, run.mode,
                         not run.bottom, ScoreOptions(run.probes, run.seed), run.hist_sample)
    arrays = {**ranking_arrays(res.table), SAMPLE_ARRAY: np.asarray(res.sample, dtype=np.float32)}
    rid = ctx.run_id
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



# ---------------------------------------------------------------------------------- store, cost, summary
def write_ranking(store, record) -> None:
    """Write the ranking files (atomically) before the row, and name them in the metrics."""
    if record.status == "completed":
        path = write_ranking_artifact(store.artifact_dir(record.run_id), record.arrays, record.model)
        record.metrics["ranking_file"] = str(path.relative_to(store.path.parent))


def load_ranking(store, rid: str) -> dict:
    """ctx.rankings entries of a stored run: its ranking (files, else arrays) and its floor table, if any."""
    from esa.sensitivity.ranking import floor_path, read_ranking

    path = store.artifact_dir(rid) / RANKING_FILE
    if path.is_file():
        table = read_ranking(path)
        floor = read_ranking(floor_path(path)) if floor_path(path).is_file() else None
    else:
        table, floor = split_floor(store.load_arrays(rid))
    return {rid: table, **({floor_key(rid): floor} if floor is not None else {})}


def cost(run: SensitivityRun) -> tuple[int | None, float]:
    passes = float(SCORER_PASSES.get(run.scorer, 4))
    return (run.max_samples * (run.context_len - 1) if passes else 0), passes


def summary(record) -> str:
    m = record.metrics
    roles = ", ".join(f"{k} {v}" for k, v in sorted(m["topk_by_role"].items(), key=lambda kv: -kv[1])[:3])
    return f"{m['topk_rows']} weights in {m['topk_n_params']} tensors ({roles}); " \
           f"top 1% share {m['tail'].get('top_1pct_share', float('nan')):.3g}"


KIND = RunKind(
    name="sensitivity", version=2, about="score every weight with one scorer; keep the top (or bottom) k",
    section="sensitivity", schema=SensitivitySection, check=check, expand=expand, depends_on=(),
    execute=execute, cost=cost, summary=summary, report=ReportSection("Sensitivity", 1, sensitivity_section),
    on_commit=write_ranking, load_result=load_ranking, split_by_replicas=False)
