"""What the causal-validation kinds (``dose_response``, ``bitscan``) share: their target entries and checks,
where their runs are placed (model × dataset × context × seed), their ranking dependency, and how a protocol
document becomes stored metrics. Not a kind itself; :mod:`esa.kinds.dose_response` and
:mod:`esa.kinds.bitscan` are.

A ranking target reads the top-k of a scorer of the ``sensitivity:`` section (the scorer must be listed
there, and k ≤ ``sensitivity.k``) and depends on the top-k sensitivity run of its scorer with the *same seed*
(seed 0's run for a data-free scorer), exactly as a perturbation run does: its id is part of the run's
resolved config (``depends_on``), so a new ranking means a new run. With ``max_eval_tokens: null`` only the
first seed is expanded (every window is scored, so seeds would repeat the same result).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from esa.errors import EsaError
from esa.kinds.base import RunContext
from esa.kinds.sensitivity import SensitivityRun, dependency_ranking_file, sensitivity_run
from esa.models import LoadedModel, ModelSpec
from esa.registry import suggest
from esa.runs import as_float
from esa.study import Study, check_dataset, model_specs, require


@dataclass(frozen=True)
class CausalTarget:
    """A named weight set: a target spec string, or the top k of a scorer's ranking."""

    name: str
    spec: str | None = None  # esa.perturb.protocols.resolve_targets spec (superweights, rows:/tensor: glob, …)
    ranking: str | None = None  # scorer (in sensitivity.scorers) whose top-k gives the targets
    k: int | None = None  # with ranking; None → dose_response: each of ks, bitscan: top_n


def _check_targets(targets: tuple[CausalTarget, ...], sens, where: str, k_from: str) -> None:
    """Names unique, exactly one of spec/ranking, a ranking scorer the sensitivity section runs, k in range."""
    require(bool(targets), f"{where}.targets: give at least one target")
    names = [t.name for t in targets]
    require(len(set(names)) == len(names), f"{where}.targets: duplicate target names in {names}")
    for i, t in enumerate(targets):
        at = f"{where}.targets[{i}]"
        require((t.spec is None) != (t.ranking is None), f"{at}: give exactly one of 'spec' or 'ranking'")
        if t.spec is not None:
            require(t.k is None, f"{at}.k: only a ranking target takes k; drop it (the spec names the weights)")
            continue
        require(sens is not None, f"{at}.ranking: a ranking target needs a sensitivity: section that scores "
                 f"{t.ranking!r}; add one, or give a spec: instead")
        require(t.ranking in sens.scorers, f"{at}.ranking: " + suggest(t.ranking, list(sens.scorers), "scorer")
                 + " (list it under sensitivity.scorers)")
        require(t.k is None or 1 <= t.k <= sens.k,
                 f"{at}.k: a ranking target needs 1 ≤ k ≤ sensitivity.k ({sens.k}), got {t.k}")
        require(t.k is not None or bool(k_from), f"{at}: give the ranking target a k, or list {k_from or 'ks'}")


def _check_places(section, study_seeds: tuple[int, ...], where: str) -> None:
    for i, d in enumerate(section.datasets):
        check_dataset(d, f"{where}.datasets[{i}]")
    require(all(c >= 2 for c in section.context_lens), f"{where}.context_lens: each must be ≥ 2")
    extra = [s for s in section.seeds if s not in study_seeds]
    require(not extra, f"{where}.seeds: {extra} not among the study's seeds {list(study_seeds)}; "
             "these sections pick a subset of them")


def _check_bits(values, dtypes: set[str], where: str) -> None:
    """Every bit position or name must exist in every model dtype of the study."""
    from esa.models import DTYPES
    from esa.perturb.bits import parse_bit
    from esa.perturb.protocols.experiments import parse_value

    for dtype in sorted(dtypes):
        for v in values:
            try:
                parse_bit(DTYPES[dtype], parse_value(v))
            except EsaError as exc:
                raise EsaError(f"{where}: {exc} (models are loaded as {dtype})") from exc


def _cells(study: Study, section) -> list[tuple[ModelSpec, str, int, int]]:
    """(model, dataset, ctx, seed), model-major; the first seed only when the whole split is scored."""
    seeds = section.seeds or study.seeds
    seeds = seeds if study.max_eval_tokens is not None else seeds[:1]
    return [(spec, d, ctx, seed) for spec in model_specs(study) for d in (section.datasets or study.datasets)
            for ctx in (section.context_lens or study.context_lens) for seed in seeds]


def _ranking_run(study: Study, spec: ModelSpec, t: CausalTarget, seed: int) -> SensitivityRun | None:
    return sensitivity_run(study, spec, t.ranking, seed, False) if t.ranking is not None else None


def _targets(run, ranking_file: str | None) -> str:
    return run.spec if run.spec is not None else f"topk:{ranking_file}:{run.k}"


def _eval(run, collapse_ppl: float | None = None):
    from esa.perturb.protocols import EvalConfig

    data = EvalConfig(run.dataset, run.context_len, run.max_eval_tokens, run.seed, run.batch_tokens)
    return data if collapse_ppl is None else dataclasses.replace(data, collapse_ppl=collapse_ppl)


def _scrub(obj, files: dict[str, str]):
    """``obj`` with every temporary ranking path replaced by ``<ranking of run ID>`` (recursively)."""
    if isinstance(obj, str):
        for path, rid in files.items():
            obj = obj.replace(path, f"<ranking of run {rid}>")
        return obj
    if isinstance(obj, dict):
        return {k: _scrub(v, files) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrub(v, files) for v in obj]
    return obj


def _common(doc: dict) -> dict:
    data = {k: v for k, v in doc["data"].items() if k not in ("window_indices", "calibration_indices")}
    targets = {k: v for k, v in doc["targets"].items() if k not in ("spec", "ranking", "elements")}
    return {"baseline_perplexity": doc["baseline"]["perplexity"], "baseline": doc["baseline"], "data": data,
            "targets": targets, "notes": doc["notes"], "wall_seconds": doc["wall_seconds"]}


def _execute(lm: LoadedModel, run, ctx: RunContext, experiment, make_config, to_metrics
             ) -> tuple[dict, dict[str, np.ndarray]]:
    """Run ``experiment`` on ``make_config(run, ranking file)``; metrics name the ranking by its run id."""
    with tempfile.TemporaryDirectory(prefix="esa-causal-") as tmp:
        ranking_file = dependency_ranking_file(run, ctx, Path(tmp), lm.fingerprint.to_dict())
        doc, arrays = experiment(lm, make_config(run, ranking_file))
    files = {ranking_file: ctx.depends_on["ranking"]} if ranking_file else {}
    return _scrub(to_metrics(doc), files), arrays


def severity(comparison: dict) -> float:
    """Mean ΔNLL for ranking "most damaging", a non-finite one (a collapse) counted as +inf."""
    x = as_float(comparison.get("mean_delta_nll"))
    return x if x == x and x != -math.inf else math.inf


def model_dtypes(study: Study) -> set[str]:
    """The dtypes the study's models are loaded in (bit positions must exist in each)."""
    return {m.dtype or study.dtype for m in study.models}
