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

Every other top-level key is the section of one run kind (``sensitivity:``, ``perturbation:``,
``dose_response:`` …): the registry :mod:`esa.kinds` says which kind owns it, and that kind parses, checks and
expands it. This module never imports a kind. Every mistake raises :class:`EsaError` naming the file, the key's
path and the fix: an unknown key lists the valid keys (with "did you mean"), a type error names the field and
the expected type.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from esa import kinds
from esa.core.errors import EsaError
from esa.models import DTYPE_NAMES, SUITE, ModelSpec, canonical_dtype, check_attention, concrete_dtype
from esa.core.registry import suggest
from esa.core.schema import SHORTHAND, coerce, parse_section


@dataclass(frozen=True)
class ModelEntry:
    """One model of a study; a plain string in YAML is shorthand for ``{name: ...}``."""

    name: str  # suite alias, hub id (org/name), local directory or .gguf path
    dtype: str | None = None  # None → the study's dtype
    device: str | None = None  # None → the study's device
    revision: str | None = None  # hub branch/tag/commit; pin a commit for exact reruns
    trust_remote_code: bool = False
    allow_pickle: bool = False
    attention: str | None = None  # None → the study's attention kernel


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
    attention: str = "auto"  # attention kernel (esa.models.ATTENTION_NAMES) for models that do not set one
    method: str = "chunks"  # chunks | rolling | sliding (esa.data.windows)
    stride: int | None = None  # sliding only
    bos: str = "auto"  # auto | always | never
    max_eval_tokens: int | None = 65_536  # scored tokens per run; None → whole split, first seed only
    batch_tokens: int = 32_768  # micro-batch token budget (B · T)
    kinds: tuple[str, ...] = ()  # run only these kinds (and what they depend on); empty → every kind
    sections: dict[str, Any] = field(default_factory=dict)  # section key → its kind's parsed section

    def section(self, key: str):
        """The parsed section ``key`` (e.g. ``"sensitivity"``), or None when the study has none."""
        return self.sections.get(key)

    def to_dict(self) -> dict:
        """The study as its file would say it: top-level fields, then each present section."""
        out = asdict(dataclasses.replace(self, sections={}))
        del out["sections"]
        return {**out, **{k: asdict(v) for k, v in self.sections.items()}}


# ---------------------------------------------------------------------------------------------- parsing
SECTION_PATH_KEYS = {"datasets", "dataset", "calibration_dataset", "task_data"}  # section keys holding paths
SHORTHAND[ModelEntry] = "name"  # `models: [smollm2-135m]` is shorthand for `models: [{name: smollm2-135m}]`


# ------------------------------------------------------------------------------------------- validation
def require(cond: bool, message: str) -> None:
    """EsaError(message) unless ``cond`` (the checks of study sections, here and in the kinds)."""
    if not cond:
        raise EsaError(message)


def _check_unique_positive(values: tuple, where: str, allow_zero: bool = False) -> None:
    require(len(values) > 0, f"{where}: give at least one value")
    require(len(set(values)) == len(values), f"{where}: duplicate values in {list(values)}; list each once")
    low = 0 if allow_zero else 1
    bad = [v for v in values if isinstance(v, int) and v < low]
    require(not bad, f"{where}: {bad} must be ≥ {low}")


def _is_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith((".txt", ".jsonl", ".gguf"))


def _check_model(m: ModelEntry, where: str) -> None:
    dtype_ok = m.dtype is None or m.dtype in DTYPE_NAMES
    require(dtype_ok, f"{where}.dtype: unknown dtype {m.dtype!r}; choose one of {', '.join(DTYPE_NAMES)} "
                      "(or bfloat16, float16, float32)")
    if m.attention is not None:
        check_attention(m.attention, f"{where}.attention")
    if m.name in SUITE or _is_path(m.name) or Path(m.name).exists() or m.name.count("/") == 1:
        return
    raise EsaError(f"{where}.name: " + suggest(m.name, SUITE.names(), "model alias")
                   + " Or give a hub id (org/name), a local directory or a .gguf file.")


def check_dataset(name: str, where: str) -> None:
    from esa.data.corpora import corpus_names
    from esa.data.specs import is_spec

    if name in corpus_names() or _is_path(name) or is_spec(name):  # esa.data.specs: a hub id or dataset path
        return
    raise EsaError(f"{where}: " + suggest(name, corpus_names(), "dataset") + " Or give a .txt/.jsonl/.parquet/"
                   ".arrow path, a save_to_disk directory or a hub dataset org/name[:config][:split][:field].")


def validate(study: Study, where: str) -> None:
    """Semantic checks that need no model, corpus or network (types were checked while parsing)."""
    from esa.data.windows import METHODS

    require(bool(study.name.strip()), f"{where}.name: give the study a name")
    require(bool(study.models), f"{where}.models: give at least one model")
    for i, m in enumerate(study.models):
        _check_model(m, f"{where}.models[{i}]")
    names = [m.name for m in study.models]
    require(len(set(names)) == len(names), f"{where}.models: a model is listed twice in {names}")
    _check_unique_positive(study.datasets, f"{where}.datasets")
    for i, d in enumerate(study.datasets):
        check_dataset(d, f"{where}.datasets[{i}]")
    _check_unique_positive(study.context_lens, f"{where}.context_lens")
    _check_unique_positive(study.seeds, f"{where}.seeds", allow_zero=True)
    require(study.dtype in DTYPE_NAMES, f"{where}.dtype: unknown dtype {study.dtype!r}; choose "
                                        f"{', '.join(DTYPE_NAMES)} (or bfloat16, float16, float32)")
    check_attention(study.attention, f"{where}.attention")
    require(study.method in METHODS, f"{where}.method: " + suggest(study.method, list(METHODS), "method"))
    require(study.bos in ("auto", "always", "never"), f"{where}.bos: choose auto, always or never")
    require(study.stride is None or (study.method == "sliding" and study.stride >= 1),
             f"{where}.stride: only for method: sliding, and ≥ 1")
    require(study.max_eval_tokens is None or study.max_eval_tokens >= 1,
             f"{where}.max_eval_tokens: ≥ 1, or null for the whole split")
    require(study.batch_tokens >= 1, f"{where}.batch_tokens must be ≥ 1")
    for i, name in enumerate(study.kinds):
        require(name in kinds.names(), f"{where}.kinds[{i}]: " + suggest(name, kinds.names(), "run kind"))
    for key, kind in kinds.with_section().items():  # dependencies first: a section may read an earlier one
        if study.section(key) is not None:
            kind.check(study.section(key), study, f"{where}.{key}")


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
    for section in (k for k, v in out.items() if isinstance(v, dict)):  # any section's corpus and data paths
        for key in set(out[section]) & SECTION_PATH_KEYS:
            value = out[section][key]
            out[section] = {**out[section], key: [fix(d) for d in value] if isinstance(value, list) else
                            {k: fix(v) for k, v in value.items()} if isinstance(value, dict) else fix(value)}
        out[section] = _rebase_tasks(out[section], fix)
    return out


def _rebase_tasks(section: dict, fix) -> dict:
    """Corpus-derived task names (``corpus_mc:./notes.txt``) read their corpus relative to the study file too;
    a ``task_data`` key naming such a task is rewritten the same way, so the two still match."""
    from esa.evals.tasks.corpus import rebase

    def name(task):
        return rebase(task, fix) if isinstance(task, str) else task

    out = dict(section)
    if isinstance(out.get("tasks"), list):
        out["tasks"] = [name(t) for t in out["tasks"]]
    if isinstance(out.get("task_data"), dict):
        out["task_data"] = {name(k): v for k, v in out["task_data"].items()}
    return out


def _canonical_dtypes(data: dict) -> dict:
    """The study's and its models' dtypes in one spelling each (``bfloat16`` → ``bf16``): one run id per dtype."""
    out = dict(data)
    if "dtype" in out:
        out["dtype"] = canonical_dtype(out["dtype"])
    if isinstance(out.get("models"), list):
        out["models"] = [{**m, "dtype": canonical_dtype(m["dtype"])} if isinstance(m, dict) and "dtype" in m else m
                         for m in out["models"]]
    return out


def parse_study(data, where: str = "study", base: Path | None = None) -> Study:
    """Validate a loaded YAML mapping into a :class:`Study` (``where`` prefixes error messages)."""
    if isinstance(data, dict) and base is not None:
        data = _resolve_paths(data, base)
    if isinstance(data, dict):
        data = _canonical_dtypes(data)
    if not isinstance(data, dict):
        return coerce(data, Study, where)  # the type error that names what a study file must be
    owners = kinds.with_section()
    fields = [f.name for f in dataclasses.fields(Study) if f.name != "sections"]
    for key in data:
        if key not in fields and key not in owners:
            raise EsaError(f"{where}: " + suggest(str(key), fields + list(owners), "key"))
    core = {k: v for k, v in data.items() if k in fields}
    sections = {k: parse_section(owners[k].schema, v, f"{where}.{k}") for k, v in data.items()
                if k in owners and v is not None}
    study = dataclasses.replace(coerce(core, Study, where), sections=sections)
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
def model_specs(study: Study) -> list[ModelSpec]:
    """The study's models as load specs; dtype ``auto`` resolved on this machine (it decides the numbers)."""
    out = []
    for m in study.models:
        device = m.device or study.device
        out.append(ModelSpec(m.name, concrete_dtype(m.dtype or study.dtype, device), device, m.revision,
                             m.trust_remote_code, m.allow_pickle, m.attention or study.attention))
    return out


# Run kinds ESA can execute now, in execution order; a later capability registers its own expander here.


def with_dependencies(runs: list) -> list:
    """``runs`` plus every run they depend on (transitively) that is missing, each once, dependencies first:
    ordered by kind (:func:`esa.kinds.ordered`), then by first appearance. A bottom ranking, for example, is a
    run only because a bottom target depends on it."""
    seen: dict = {}

    def add(run) -> None:
        for dep in run.dependencies().values():
            add(dep)
        seen.setdefault(run, None)

    for run in runs:
        add(run)
    rank = {k.name: i for i, k in enumerate(kinds.ordered())}
    return sorted(seen, key=lambda r: rank[r.kind])  # stable: first appearance within a kind


def expand(study: Study) -> list:
    """Every run of the study, in execution order: each kind's runs (:attr:`RunKind.expand`; only the kinds in
    ``study.kinds`` when it names some) and their dependencies, dependencies first."""
    chosen = [k for k in kinds.ordered() if not study.kinds or k.name in study.kinds]
    return with_dependencies([run for kind in chosen for run in kind.expand(study)])
