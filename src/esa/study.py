"""Study files: a strict YAML schema, validated without loading a model, and its expansion into runs.

A study names models, datasets, context lengths and seeds; :func:`expand` turns it into one run per
cell (model × dataset × ctx × seed for baselines). Example ``studies/demo.yaml``::

    name: demo
    models: [smollm2-135m]                # alias, hub id, local dir, .gguf — or {name: ..., dtype: bf16}
    datasets: [python-docs]
    context_lens: [128, 512]
    seeds: [0, 1]                         # a seed picks which windows are scored
    max_eval_tokens: 1024                 # scored tokens per run; null = the whole split (seed-invariant)
    batch_tokens: 4096

Optional ``sensitivity:`` (scorers, k) and ``perturbation:`` (targets, ops with parameter grids, controls)
sections expand into their own run kinds (:mod:`esa.study_sections`). Every mistake raises :class:`EsaError`
naming the file, the key's path and the fix: an unknown key lists the valid keys (with "did you mean"), a
type error names the field and the expected type.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from esa.errors import EsaError
from esa.models import DTYPES, SUITE, ModelSpec
from esa.registry import Registry, suggest
from esa.schema import SHORTHAND, coerce
from esa.study_causal_schema import BitscanSection, DoseResponseSection, check_causal
from esa.study_scaling_schema import ScalingSection, check_scaling

CONTROLS = ("random_k", "bottom_k")  # size-matched random weights; the least-sensitive k (a ranking's tail)


@dataclass(frozen=True)
class ModelEntry:
    """One model of a study; a plain string in YAML is shorthand for ``{name: ...}``."""

    name: str  # suite alias, hub id (org/name), local directory or .gguf path
    dtype: str | None = None  # None → the study's dtype
    device: str | None = None  # None → the study's device
    revision: str | None = None  # hub branch/tag/commit; pin a commit for exact reruns
    trust_remote_code: bool = False
    allow_pickle: bool = False


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


@dataclass(frozen=True)
class TargetEntry:
    """A named set of weights to perturb: a target string, or the top/bottom k of a scorer's ranking."""

    name: str
    spec: str | None = None  # esa.perturb.targets.parse_targets string (rows:/cols:/tensor: glob, coords, file)
    ranking: str | None = None  # scorer whose ranking gives the targets
    k: int | None = None  # with ranking: how many
    bottom: bool = False  # with ranking: the least sensitive k instead of the top k


@dataclass(frozen=True)
class OpEntry:
    """A perturbation op and a grid over its parameters (a scalar is a one-point axis)."""

    op: str  # name in esa.perturb.ops.OPS
    grid: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PerturbationSection:
    targets: tuple[TargetEntry, ...]
    ops: tuple[OpEntry, ...]
    controls: tuple[str, ...] = ()  # see CONTROLS
    trials: int = 1  # control seeds 0…trials-1: random_k draws, and op seeds of random ops
    datasets: tuple[str, ...] = ()  # evaluation corpora; empty → the study's datasets
    context_lens: tuple[int, ...] = ()  # evaluation window lengths; empty → the study's context_lens


@dataclass(frozen=True)
class Study:
    """A whole study, resolved: every field has its final value (stored with the study in the database)."""

    name: str
    models: tuple[ModelEntry, ...]
    datasets: tuple[str, ...]  # corpus names or .txt/.jsonl paths (relative to the study file)
    context_lens: tuple[int, ...]  # window length T in tokens
    seeds: tuple[int, ...] = (0,)  # each seed picks a different random subset of windows
    description: str = ""
    dtype: str = "fp32"  # default weights dtype for models that do not set one
    device: str = "auto"
    method: str = "chunks"  # chunks | rolling | sliding (esa.data.windows)
    stride: int | None = None  # sliding only
    bos: str = "auto"  # auto | always | never
    max_eval_tokens: int | None = 65_536  # scored tokens per run; None → whole split, first seed only
    batch_tokens: int = 32_768  # micro-batch token budget (B · T)
    sensitivity: SensitivitySection | None = None
    perturbation: PerturbationSection | None = None
    dose_response: DoseResponseSection | None = None  # esa.study_causal_schema
    bitscan: BitscanSection | None = None  # esa.study_causal_schema
    scaling: ScalingSection | None = None  # esa.study_scaling_schema: every model is a point of a size ladder

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- parsing
SHORTHAND[ModelEntry] = "name"  # `models: [smollm2-135m]` is shorthand for `models: [{name: smollm2-135m}]`


# ------------------------------------------------------------------------------------------- validation
def _require(cond: bool, message: str) -> None:
    if not cond:
        raise EsaError(message)


def _check_unique_positive(values: tuple, where: str, allow_zero: bool = False) -> None:
    _require(len(values) > 0, f"{where}: give at least one value")
    _require(len(set(values)) == len(values), f"{where}: duplicate values in {list(values)}; list each once")
    low = 0 if allow_zero else 1
    bad = [v for v in values if isinstance(v, int) and v < low]
    _require(not bad, f"{where}: {bad} must be ≥ {low}")


def _is_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith((".txt", ".jsonl", ".gguf"))


def _check_model(m: ModelEntry, where: str) -> None:
    dtype_ok = m.dtype is None or m.dtype in DTYPES
    _require(dtype_ok, f"{where}.dtype: unknown dtype {m.dtype!r}; choose one of {', '.join(DTYPES)}")
    if m.name in SUITE or _is_path(m.name) or Path(m.name).exists() or m.name.count("/") == 1:
        return
    raise EsaError(f"{where}.name: " + suggest(m.name, SUITE.names(), "model alias")
                   + " Or give a hub id (org/name), a local directory or a .gguf file.")


def _check_dataset(name: str, where: str) -> None:
    from esa.data.corpora import corpus_names

    if name in corpus_names() or _is_path(name) or "/" in name:
        return
    raise EsaError(f"{where}: " + suggest(name, corpus_names(), "dataset") + " Or give a .txt/.jsonl path.")


def _check_sensitivity(s: SensitivitySection, where: str) -> None:
    from esa.sensitivity.scorers import SCORERS

    for i, name in enumerate(s.scorers):
        if name not in SCORERS:
            raise EsaError(f"{where}.scorers[{i}]: " + suggest(name, SCORERS.names(), "scorer"))
    _require(len(set(s.scorers)) == len(s.scorers), f"{where}.scorers: duplicate scorer names")
    _require(s.k >= 1 and s.calibration_tokens >= 1, f"{where}: k and calibration_tokens must be ≥ 1")
    _require(s.mode in ("global", "per_layer"), f"{where}.mode: " + suggest(s.mode, ["global", "per_layer"], "mode"))
    _require(s.context_len is None or s.context_len >= 2, f"{where}.context_len must be ≥ 2 (or null)")
    if s.calibration_dataset is not None:
        _check_dataset(s.calibration_dataset, f"{where}.calibration_dataset")


def grid_points(entry: OpEntry) -> list[dict]:
    """Every parameter combination of an op's grid (a scalar value is a one-point axis)."""
    axes = {k: v if isinstance(v, list) else [v] for k, v in entry.grid.items()}
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def _check_perturbation(p: PerturbationSection, sens: SensitivitySection | None, where: str) -> None:
    from esa.perturb.ops import OPS, make_op
    from esa.sensitivity.scorers import SCORERS

    _require(bool(p.targets) and bool(p.ops), f"{where}: give at least one target and one op")
    _require(p.trials >= 1, f"{where}.trials must be ≥ 1")
    scorers = sens.scorers if sens else tuple(SCORERS.names())
    names = [t.name for t in p.targets]
    _require(len(set(names)) == len(names), f"{where}.targets: duplicate target names in {names}")
    for i, t in enumerate(p.targets):
        at = f"{where}.targets[{i}]"
        _require((t.spec is None) != (t.ranking is None), f"{at}: give exactly one of 'spec' or 'ranking'")
        if t.ranking is not None:
            _require(t.ranking in scorers, f"{at}.ranking: " + suggest(t.ranking, list(scorers), "scorer")
                     + (" (list it under sensitivity.scorers)" if sens else ""))
            _require(sens is not None, f"{at}.ranking: a ranking target needs a sensitivity: section that "
                     f"scores {t.ranking!r}; add one, or give a spec: instead")
            _require(t.k is not None and 1 <= t.k <= sens.k,
                     f"{at}: a ranking target needs 1 ≤ k ≤ sensitivity.k ({sens.k}), got {t.k}")
    for i, op in enumerate(p.ops):
        if op.op not in OPS:
            raise EsaError(f"{where}.ops[{i}].op: " + suggest(op.op, OPS.names(), "perturbation op"))
        for point in grid_points(op):
            try:
                make_op(op.op, **point)
            except (EsaError, TypeError, ValueError) as exc:
                raise EsaError(f"{where}.ops[{i}] {op.op} {point}: {exc}") from exc
    for i, c in enumerate(p.controls):
        _require(c in CONTROLS, f"{where}.controls[{i}]: " + suggest(c, list(CONTROLS), "control"))
    for i, d in enumerate(p.datasets):
        _check_dataset(d, f"{where}.datasets[{i}]")
    _require(all(c >= 2 for c in p.context_lens), f"{where}.context_lens: each must be ≥ 2")


def validate(study: Study, where: str) -> None:
    """Semantic checks that need no model, corpus or network (types were checked while parsing)."""
    from esa.data.windows import METHODS

    _require(bool(study.name.strip()), f"{where}.name: give the study a name")
    _require(bool(study.models), f"{where}.models: give at least one model")
    for i, m in enumerate(study.models):
        _check_model(m, f"{where}.models[{i}]")
    names = [m.name for m in study.models]
    _require(len(set(names)) == len(names), f"{where}.models: a model is listed twice in {names}")
    _check_unique_positive(study.datasets, f"{where}.datasets")
    for i, d in enumerate(study.datasets):
        _check_dataset(d, f"{where}.datasets[{i}]")
    _check_unique_positive(study.context_lens, f"{where}.context_lens")
    _check_unique_positive(study.seeds, f"{where}.seeds", allow_zero=True)
    _require(study.dtype in DTYPES, f"{where}.dtype: unknown dtype {study.dtype!r}; choose {', '.join(DTYPES)}")
    _require(study.method in METHODS, f"{where}.method: " + suggest(study.method, list(METHODS), "method"))
    _require(study.bos in ("auto", "always", "never"), f"{where}.bos: choose auto, always or never")
    _require(study.stride is None or (study.method == "sliding" and study.stride >= 1),
             f"{where}.stride: only for method: sliding, and ≥ 1")
    _require(study.max_eval_tokens is None or study.max_eval_tokens >= 1,
             f"{where}.max_eval_tokens: ≥ 1, or null for the whole split")
    _require(study.batch_tokens >= 1, f"{where}.batch_tokens must be ≥ 1")
    if study.sensitivity:
        _check_sensitivity(study.sensitivity, f"{where}.sensitivity")
    if study.perturbation:
        _check_perturbation(study.perturbation, study.sensitivity, f"{where}.perturbation")
    check_causal(study, where)
    check_scaling(study, where)


def _resolve_paths(data: dict, base: Path) -> dict:
    """Local dataset/model paths in a study are relative to the study file, not the working directory."""
    def fix(name):
        return str((base / name).resolve()) if isinstance(name, str) and name.startswith(".") else name

    out = dict(data)
    if isinstance(out.get("datasets"), list):
        out["datasets"] = [fix(d) for d in out["datasets"]]
    if isinstance(out.get("models"), list):
        out["models"] = [fix(m) if isinstance(m, str) else ({**m, "name": fix(m.get("name"))}
                                                            if isinstance(m, dict) else m)
                         for m in out["models"]]
    for section, key in (("sensitivity", "calibration_dataset"), ("perturbation", "datasets"),
                         ("dose_response", "datasets"), ("bitscan", "datasets"),
                         ("scaling", "dataset")):
        if isinstance(out.get(section), dict) and key in out[section]:
            value = out[section][key]
            out[section] = {**out[section], key: [fix(d) for d in value] if isinstance(value, list) else fix(value)}
    return out


def parse_study(data, where: str = "study", base: Path | None = None) -> Study:
    """Validate a loaded YAML mapping into a :class:`Study` (``where`` prefixes error messages)."""
    if isinstance(data, dict) and base is not None:
        data = _resolve_paths(data, base)
    study = coerce(data, Study, where)
    validate(study, where)
    return study


def load_study(path: str | Path) -> Study:
    """Read and validate a study YAML file."""
    path = Path(path)
    if not path.is_file():
        raise EsaError(f"study file {str(path)!r} does not exist; give the path of a study .yaml "
                       "(see studies/demo.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise EsaError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the syntax") from exc
    return parse_study(data, str(path), path.parent)


# -------------------------------------------------------------------------------------------- expansion
@dataclass(frozen=True)
class BaselineRun:
    """One baseline cell: one model on one dataset at one context length with one seed."""

    kind: ClassVar[str] = "baseline"
    model: ModelSpec
    dataset: str
    context_len: int
    seed: int
    method: str
    stride: int | None
    bos: str
    max_eval_tokens: int | None  # None → the whole split
    batch_tokens: int

    def config(self) -> dict:
        """The resolved run config: with the model fingerprint, it determines the run id."""
        return {"kind": self.kind, **asdict(self)}

    def label(self) -> str:
        return f"{self.model.name} {self.dataset} ctx={self.context_len} seed={self.seed}"


def model_specs(study: Study) -> list[ModelSpec]:
    return [ModelSpec(m.name, m.dtype or study.dtype, m.device or study.device, m.revision,
                      m.trust_remote_code, m.allow_pickle) for m in study.models]


def expand_baseline(study: Study) -> list[BaselineRun]:
    """model × dataset × ctx × seed, model-major (executors load each model once).

    With ``max_eval_tokens: null`` every window is scored, so every seed would give the same number: only
    the first seed is expanded and the result is marked seed-invariant.
    """
    seeds = study.seeds if study.max_eval_tokens is not None else study.seeds[:1]
    return [BaselineRun(spec, d, ctx, s, study.method, study.stride, study.bos, study.max_eval_tokens,
                        study.batch_tokens)
            for spec in model_specs(study) for d in study.datasets for ctx in study.context_lens for s in seeds]


# Run kinds ESA can execute now, in execution order; a later capability registers its own expander here.
EXPANDERS: Registry = Registry("run kind")
EXPANDERS.register("baseline", expand_baseline)


def expand(study: Study) -> list:
    """Every run of the study that this version of ESA can execute, in execution order."""
    import esa.study_sections  # noqa: F401 — registers the sensitivity and perturbation expanders
    import esa.study_causal  # noqa: F401 — registers the dose_response and bitscan expanders
    import esa.study_scaling  # noqa: F401 — registers the scaling_point expander

    return [run for kind in EXPANDERS for run in EXPANDERS.get(kind)(study)]


def deferred_sections(study: Study) -> list[str]:
    """Sections that validate but are not executed by this version (no expander registered yet)."""
    import esa.study_sections  # noqa: F401

    out = []
    if study.sensitivity and "sensitivity" not in EXPANDERS:
        s = study.sensitivity
        out.append(f"sensitivity: {len(s.scorers)} scorer(s) ({', '.join(s.scorers)}), k={s.k}")
    if study.perturbation and "perturbation" not in EXPANDERS:
        p = study.perturbation
        points = sum(len(grid_points(op)) for op in p.ops)
        out.append(f"perturbation: {len(p.targets)} target set(s) × {points} op setting(s) × {p.trials} "
                   f"trial(s), controls {list(p.controls) or 'none'}")
    return out

