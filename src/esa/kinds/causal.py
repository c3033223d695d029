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
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from esa.core.errors import EsaError
from esa.kinds.base import KindRun, RunContext
from esa.kinds.sensitivity import SensitivityRun, dependency_ranking_file, sensitivity_run
from esa.models import LoadedModel, ModelSpec
from esa.core.registry import suggest
from esa.core.files import as_float
from esa.study import Study, check_dataset, model_specs, require


@dataclass(frozen=True)
class CausalTarget:
    """A named weight set: a target spec string, or the top k of a scorer's ranking."""

    name: str
    spec: str | None = None  # esa.perturb.protocols.resolve_targets spec (superweights, rows:/tensor: glob, …)
    ranking: str | None = None  # scorer (in sensitivity.scorers) whose top-k gives the targets
    k: int | None = None  # with ranking; None → dose_response: each of ks, bitscan: top_n


@dataclass(frozen=True, kw_only=True)
class ProtocolSettings:
    """Settings every causal section shares (the :class:`~esa.perturb.protocols.EvalConfig` statistics): the
    bootstrap size of each ΔNLL CI, the windows a ``superweights`` target is detected on, and the collapse
    threshold. A section dataclass inherits them; its runs carry them (:class:`CausalRun`)."""

    n_boot: int = 10_000  # bootstrap-t resamples per mean-ΔNLL CI
    calib_samples: int = 4  # windows for super-weight detection, none of them evaluated
    collapse_ppl: float | None = None  # collapsed: PPL above this (None → esa.stats.DEFAULT_COLLAPSE_PPL)
    tasks: tuple[str, ...] = ()  # zero-shot tasks scored under every perturbation, paired item by item
    task_data: dict[str, str] = field(default_factory=dict)  # task → local JSONL in the dataset's schema
    task_limit: int | None = None  # items per task (seeded subsample by the run's seed); None: every item


@dataclass(frozen=True, kw_only=True)
class CausalRun(KindRun):
    """The fields every causal run (perturbation, dose_response, bitscan) has; a kind's run adds its own.

    Keyword-only, built by :func:`causal_fields`: the model and the named target (a spec, or a scorer's top k
    with its ``ranking_run`` dependency), where it is evaluated (one model's fixed chunks windows), the
    :class:`ProtocolSettings`, and ``inputs`` — the sha256 of every user file the target reads, so a rewritten
    ranking or coordinate file means a new run rather than a stale reuse."""

    CONSTANT_CONFIG: ClassVar[dict] = {"method": "chunks"}  # every window of these kinds is a chunks window
    model: ModelSpec
    target: str  # the target's name in the study
    spec: str | None  # target spec (esa.perturb.protocols.resolve_targets), or None for a ranking target
    ranking: str | None  # scorer whose ranking gives the targets
    k: int | None  # with ranking
    dataset: str
    context_len: int
    seed: int  # picks the evaluation windows (and the super-weight calibration windows)
    max_eval_tokens: int | None
    batch_tokens: int
    ranking_run: SensitivityRun | None = None  # gives the targets of a ranking target
    n_boot: int = 10_000
    calib_samples: int = 4
    collapse_ppl: float | None = None
    tasks: tuple[tuple[str, str | None], ...] = ()  # (zero-shot task, local JSONL or None)
    task_limit: int | None = None
    inputs: tuple[tuple[str, str], ...] = ()  # (path, sha256) of user files the target and tasks read

    def label(self) -> str:
        return f"{self.model.name} {self.what()} {self.dataset} ctx={self.context_len} seed={self.seed}"

    def what(self) -> str:
        """The kind's own part of the label: what is perturbed, and how."""
        raise NotImplementedError


def causal_fields(study: Study, section, model: ModelSpec, t, k: int | None, dataset: str, ctx: int, seed: int,
                  ranking_run, bottom_ranking: str | None = None) -> dict:
    """The :class:`CausalRun` keyword arguments of target ``t`` of ``section`` at one (model, dataset, ctx, seed)."""
    return {"model": model, "target": t.name, "spec": t.spec, "ranking": t.ranking, "k": k, "dataset": dataset,
            "context_len": ctx, "seed": seed, "max_eval_tokens": study.max_eval_tokens,
            "batch_tokens": study.batch_tokens, "ranking_run": ranking_run, **settings(section),
            "tasks": tuple((name, section.task_data.get(name)) for name in section.tasks),
            "task_limit": section.task_limit,
            "inputs": input_hashes(t.spec, bottom_ranking) + task_hashes(section.task_data)}


def settings(section) -> dict:
    """The statistics settings of ``section`` (:class:`ProtocolSettings`) as run keyword arguments."""
    return {name: getattr(section, name) for name in ("n_boot", "calib_samples", "collapse_ppl")}


def task_hashes(task_data: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """(path, sha256) of every local task file — a rewritten file is a new run."""
    from esa.core.hashing import sha256_file

    return tuple((path, sha256_file(Path(path))) for _, path in sorted(task_data.items()) if Path(path).is_file())


def referenced_files(spec: str | None, ranking_file: str | None = None) -> list[Path]:
    """The user files a target reads: a ``topk:<file>:<k>`` ranking (and its floor table), a .json/.csv
    coordinate file, and a ranking file given for the bottom_k control (and its floor table)."""
    from esa.sensitivity.ranking import floor_path

    spec = (spec or "").strip()
    rankings = [ranking_file] if ranking_file else []
    if spec.startswith("topk:"):
        rankings.append(spec[len("topk:"):].rpartition(":")[0])
    files = [Path(spec)] if spec.lower().endswith((".json", ".csv")) else []
    for r in rankings:
        files += [Path(r)] + ([floor_path(r)] if floor_path(r).is_file() else [])
    return files


def check_files(spec: str | None, ranking_file: str | None, where: str) -> None:
    for f in referenced_files(spec, ranking_file):
        require(f.is_file(), f"{where}: file {f} does not exist (write it with `esa sensitivity`, or fix the path)")


def input_hashes(spec: str | None, ranking_file: str | None = None) -> tuple[tuple[str, str], ...]:
    """(path, sha256) of every file :func:`referenced_files` names — part of the run's config."""
    from esa.core.hashing import sha256_file

    return tuple((str(f), sha256_file(f)) for f in referenced_files(spec, ranking_file))


def _check_settings(section, where: str) -> None:
    from esa.kinds.zeroshot import check_tasks

    check_tasks(section.tasks, section.task_data, where)
    require(section.task_limit is None or section.task_limit >= 1, f"{where}.task_limit: ≥ 1 item, or omit it")
    require(section.n_boot >= 100, f"{where}.n_boot must be ≥ 100 (bootstrap resamples per CI)")
    require(section.calib_samples >= 1, f"{where}.calib_samples must be ≥ 1")
    require(section.collapse_ppl is None or section.collapse_ppl > 1, f"{where}.collapse_ppl must be > 1 (or null)")


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
            check_files(t.spec, None, f"{at}.spec")
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


def eval_config(run):
    """The :class:`~esa.perturb.protocols.EvalConfig` of a causal run (its windows and statistics settings)."""
    from esa.perturb.protocols import EvalConfig

    data = EvalConfig(run.dataset, run.context_len, run.max_eval_tokens, run.seed, run.batch_tokens,
                      run.calib_samples, run.n_boot, tasks=run.tasks, task_limit=run.task_limit)
    return data if run.collapse_ppl is None else dataclasses.replace(data, collapse_ppl=run.collapse_ppl)


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


def execute_protocol(lm: LoadedModel, run, ctx: RunContext, experiment, make_config, to_metrics
                     ) -> tuple[dict, dict[str, np.ndarray]]:
    """Run ``experiment`` on ``make_config(run, ranking file)``; metrics name the ranking by its run id.

    The protocol's whole document (the ``<stem>.json`` of its command, less the provenance and model fingerprint
    that the row holds) is stored beside the row as the ``protocol`` document (:attr:`RunContext.documents`)."""
    with tempfile.TemporaryDirectory(prefix="esa-causal-") as tmp:
        ranking_file = dependency_ranking_file(run, ctx, Path(tmp), lm.fingerprint.to_dict())
        doc, arrays = experiment(lm, make_config(run, ranking_file))
    files = {ranking_file: ctx.depends_on["ranking"]} if ranking_file else {}
    ctx.documents["protocol"] = _scrub({k: v for k, v in doc.items() if k not in ("provenance", "model")}, files)
    return _scrub(to_metrics(doc), files), arrays


def severity(comparison: dict) -> float:
    """Mean ΔNLL for ranking "most damaging", a non-finite one (a collapse) counted as +inf."""
    x = as_float(comparison.get("mean_delta_nll"))
    return x if x == x and x != -math.inf else math.inf


def model_dtypes(study: Study) -> set[str]:
    """The dtypes the study's models are loaded in (bit positions must exist in each; ``auto`` as resolved here)."""
    from esa.models import concrete_dtype

    return {concrete_dtype(m.dtype or study.dtype, m.device or study.device) for m in study.models}
