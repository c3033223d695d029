"""Executing a study's runs: run ids, grouping by model, one run's execution, commits, and the cost plan.

Every executor follows the same protocol (see :mod:`esa.executors.local`, :mod:`esa.executors.ray_executor`):

1. runs are grouped by model (:func:`group_by_model`) so each model is loaded once for all its runs;
2. a group whose model was seen before and whose runs are all completed is skipped without loading
   (:func:`known_complete`);
3. after loading, run ids are computed from the resolved run config and the model's fingerprint
   (:func:`run_id`), completed runs are skipped, the others executed (:func:`execute_run`);
4. only the driver process writes to the :class:`esa.store.Store`, one transaction per finished run.

``run_id = sha256(canonical JSON {"config": resolved run config, "model": fingerprint without its
machine-local path})`` — the same run on another machine, or in another study, gets the same id. The resolved
config carries the kind's semantic version (``RunKind.version``), so rows made before a change to what a
kind's numbers mean are never reused. A run that depends on others (a perturbation of a sensitivity ranking)
has their run ids in its resolved config (``depends_on``, :func:`resolved_config`), so a changed ranking changes
the id of every run that used it. Runs are ordered so dependencies come first (:func:`esa.study.expand`); a run
whose dependency completed in an earlier invocation gets its result from the store (:func:`load_dependencies`,
through the dependency kind's ``load_result``).

Everything kind-specific — execution, commit hooks, summaries, costs — is reached through the registry
:mod:`esa.kinds` by the run's ``kind``; this module never imports a kind.

:func:`plan` estimates what executing a study costs (tokens and forward time per run) without running it, from
rates measured in a results database (each run's ``provenance.cost``, :mod:`esa.executors.cost`), timed here
or assumed.
"""

from __future__ import annotations

import gc
import logging
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path


from esa import kinds
from esa.core.errors import EsaError
from esa.executors.cost import forward_rate, run_cost
from esa.kinds.base import RunContext
from esa.models import SUITE, LoadedModel, ModelSpec, resolve_source
from esa.store import Reader, RunRecord, Store, sha256_json, utc_now
from esa.study import expand, model_specs

log = logging.getLogger(__name__)

# on_event(kind, **info): "skip_group" (model, runs), "group" (model, pending, completed),
# "run" (record, done, total), "load_error" (model, error). Library code never prints; the CLI does.
EventFn = Callable[..., None]


def quiet(kind: str, **info) -> None:
    return None


def model_identity(fingerprint: dict) -> dict:
    """The fingerprint without ``source`` (a machine-local path): what the weights are, not where."""
    return {k: v for k, v in fingerprint.items() if k != "source"}


def run_id(config: dict, fingerprint: dict) -> str:
    return sha256_json({"config": config, "model": model_identity(fingerprint)})


def resolved_config(run, fingerprint: dict) -> dict:
    """``run.config()`` plus ``kind_version`` (``RunKind.version``) and ``depends_on: {role: run id}`` for
    runs that use other runs' results."""
    config = {**run.config(), "kind_version": kinds.get(run.kind).version}
    deps = run.dependencies() if hasattr(run, "dependencies") else {}
    if deps:
        config["depends_on"] = {role: run_key(dep, fingerprint) for role, dep in deps.items()}
    return config


def run_key(run, fingerprint: dict) -> str:
    """The run id of ``run`` on the model with ``fingerprint``."""
    return run_id(resolved_config(run, fingerprint), fingerprint)


def group_by_model(runs: list) -> list[tuple[ModelSpec, list]]:
    """Runs grouped by their ModelSpec, in first-appearance order."""
    groups: dict[ModelSpec, list] = {}
    for run in runs:
        groups.setdefault(run.model, []).append(run)
    return list(groups.items())


def model_key(spec: ModelSpec) -> str | None:
    """A cache key for the model's fingerprint, or None when its weights are not content-addressed here.

    Embedded/GGUF models (sha256 of the file) and local directories (digest of config and file sizes)
    qualify, as do hub models pinned to a 40-hex commit; an unpinned hub id ("main" moves) or a model that
    cannot be resolved on this machine does not, and is always loaded to learn its fingerprint.
    """
    try:
        kind, location, revision = resolve_source(spec.name, spec.revision)
    except EsaError:
        return None
    content_id = revision.startswith(("sha256:", "content-sha256:", "sampled-sha256:"))
    pinned = content_id or (len(revision) == 40 and kind == "hub")
    return sha256_json({"spec": asdict(spec), "revision": revision}) if pinned else None


def known_complete(store: Store, spec: ModelSpec, runs: list, study_id: str) -> bool:
    """True when this model's fingerprint is known and every run of the group is completed in ``store``."""
    key = model_key(spec)
    fingerprint = store.known_model(key) if key else None
    if fingerprint is None:
        return False
    ids = [run_key(r, fingerprint) for r in runs]
    if len(store.completed(ids)) != len(ids):
        return False
    store.link_runs(study_id, ids)
    return True


# ------------------------------------------------------------------------------------ executing one run


def execute_run(lm: LoadedModel, run, rid: str, ctx: RunContext, prov: dict) -> RunRecord:
    """Execute one run on a loaded model. Errors become a ``failed`` record (Ctrl-C still stops the study).

    The record's provenance is ``prov`` plus ``cost`` (:func:`esa.executors.cost.run_cost`: wall time,
    device-hours, tokens/s, MFU); provenance is not part of the run id.
    """
    started, clock = utc_now(), time.perf_counter()
    fingerprint = lm.fingerprint.to_dict()
    config = resolved_config(run, fingerprint)
    ctx.run_id, ctx.depends_on, ctx.documents = rid, dict(config.get("depends_on", {})), {}
    try:
        metrics, arrays = kinds.get(run.kind).execute(lm, run, ctx)
    except Exception as exc:  # noqa: BLE001 — recorded in the row and shown in the summary
        log.warning("run %s failed: %s", run.label(), exc)
        error = str(exc) if isinstance(exc, EsaError) else "".join(traceback.format_exception_only(exc)).strip()
        failed = {**prov, "cost": run_cost(lm, run, None, time.perf_counter() - clock)}
        return RunRecord(rid, run.kind, config, fingerprint, failed, {}, "failed", started, utc_now(), error)
    done = {**prov, "cost": run_cost(lm, run, metrics, time.perf_counter() - clock)}
    return RunRecord(rid, run.kind, config, fingerprint, done, metrics, "completed", started, utc_now(),
                     arrays=arrays, documents=ctx.documents)


def summary_line(record: RunRecord) -> str:
    """A one-line result of a run for progress output (what the CLI may print per finished run)."""
    if record.status != "completed":
        return f"FAILED: {record.error}"
    return kinds.get(record.kind).summary(record)


def commit(store: Store, record: RunRecord, holder: str | None = None) -> None:
    """Commit a finished run in one transaction (dropping ``holder``'s claim on it), after its kind's
    ``on_commit`` hook (e.g. a sensitivity run's ranking files, written atomically before its row)."""
    hook = kinds.get(record.kind).on_commit
    if hook is not None:
        hook(store, record)
    store.commit_run(record, holder)


def load_dependencies(store: Store, runs: list, fingerprint: dict, have: dict) -> dict:
    """``RunContext.rankings`` entries of the completed runs that ``runs`` depend on and ``have`` lacks, read
    from the store by each dependency's kind (``RunKind.load_result``)."""
    wanted = {}
    for run in runs:
        deps = resolved_config(run, fingerprint).get("depends_on", {})
        wanted |= {deps[role]: dep.kind for role, dep in run.dependencies().items() if deps[role] not in have}
    out = {}
    for rid in sorted(store.completed(wanted)):
        load = kinds.get(wanted[rid]).load_result
        out |= load(store, rid) if load else {}
    return out


def release() -> None:
    """Return a dropped model's (GPU) memory before the next group loads (call after ``del model``)."""
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass


# ----------------------------------------------------------------------------------------- cost estimate
ASSUMED_FLOPS = 0.4 * 989e12  # assumption for models not timed here: one H100 (bf16 dense) at 40 % MFU
CHEAP_TO_TIME_B = 0.5  # time models up to this many billion parameters when their weights are on this machine


@dataclass(frozen=True)
class Throughput:
    tokens_per_second: float | None
    basis: str  # "measured …" or "assumed …", shown by `esa plan`


def measure_throughput(spec: ModelSpec, context_lens: tuple[int, ...], batch_tokens: int) -> dict[int, float]:
    """Scored tokens/s of one timed forward batch (after a warm-up) per context length, on this machine."""
    import time

    import torch

    from esa.evals.perplexity import score_batch
    from esa.models import load_model

    lm = load_model(spec)
    vocab = lm.model.get_input_embeddings().weight.shape[0]
    out = {}
    for ctx in context_lens:
        B = max(1, min(batch_tokens, 512) // ctx)  # a small batch keeps `esa plan` quick
        ids = torch.randint(0, vocab, (B, ctx), generator=torch.Generator().manual_seed(0))  # (B, T)
        attn, scored = torch.ones_like(ids), torch.ones_like(ids, dtype=torch.bool)
        scored[:, 0] = False
        score_batch(lm.model, ids, attn, scored)  # warm-up
        start = time.perf_counter()
        score_batch(lm.model, ids, attn, scored)
        out[ctx] = int(scored.sum()) / (time.perf_counter() - start)
    return out


def _local_weights(spec: ModelSpec) -> bool:
    from esa.models import embedded_gguf_path

    if spec.name in SUITE:
        source = SUITE.get(spec.name).source
        if not source.startswith("embedded:"):
            return False
        try:
            embedded_gguf_path(source)
        except EsaError:
            return False
        return SUITE.get(spec.name).n_params_b <= CHEAP_TO_TIME_B
    path = Path(spec.name).expanduser()
    size = sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else 0
    return 0 < size <= CHEAP_TO_TIME_B * 4e9  # fp32 bytes of CHEAP_TO_TIME_B billion parameters


def throughputs(spec: ModelSpec, study, measure: bool, context_lens: tuple[int, ...] | None = None
                ) -> dict[int, Throughput]:
    """Tokens/s per context length: measured for a small model whose weights are here, else assumed."""
    context_lens = context_lens or study.context_lens
    if measure and _local_weights(spec):
        rates = measure_throughput(spec, context_lens, study.batch_tokens)
        return {ctx: Throughput(r, f"measured here ({r:,.0f} tok/s at ctx {ctx}, {spec.dtype})")
                for ctx, r in rates.items()}
    n_b = SUITE.get(spec.name).n_params_b if spec.name in SUITE else None
    if n_b is None:
        basis = "unknown: not timed here and no nominal parameter count; time not estimated"
        return {ctx: Throughput(None, basis) for ctx in context_lens}
    rate = ASSUMED_FLOPS / (2 * n_b * 1e9)
    basis = f"assumed {rate:,.0f} tok/s: one H100 at 40% MFU, 2·N FLOPs/token, N={n_b}B"
    return {ctx: Throughput(rate, basis) for ctx in context_lens}


@dataclass(frozen=True)
class PlanRow:
    run: object  # a run of esa.study.expand (BaselineRun, SensitivityRun, PerturbationRun)
    tokens: int | None  # scored tokens (upper bound: the corpus may be smaller); None = whole split
    seconds: float | None  # tokens × passes / measured or assumed forward throughput
    basis: str
    passes: float = 1.0  # forward-equivalent passes over the tokens (backward ≈ 2 forwards; RunKind.cost)


def completed_costs(db: str | Path) -> list:
    """The completed runs of the results database ``db`` whose ``provenance.cost`` holds a measured rate."""
    with Reader(db) as reader:
        return [r for r in reader.runs(completed=True) if forward_rate((r.provenance or {}).get("cost"))]


def _same_model(spec: ModelSpec, stored: list) -> list:
    """The stored runs on the weights last stored under ``spec``, with its attention kernel: the newest run whose
    resolved config names the spec's model and dtype gives the fingerprint; every run with that fingerprint (less
    ``source``) and kernel counts (the kernel as :meth:`ModelSpec.identity` stores it: absent for ``auto``)."""
    kernel = spec.identity().get("attention")
    named = [r for r in stored if {k: (r.config.get("model") or {}).get(k) for k in ("name", "dtype")}
             == {"name": spec.name, "dtype": spec.dtype}]
    identity = model_identity(named[-1].model) if named else None
    return [r for r in stored if identity is not None and model_identity(r.model) == identity
            and (r.config.get("model") or {}).get("attention") == kernel]


def rate_in_db(stored: list, run, db: str | Path, replicas: int = 1) -> Throughput | None:
    """The median measured rate of the ``stored`` runs of ``run``'s model and kind at the nearest context
    length (exact preferred; ties: the shorter), for ``replicas`` data-parallel replicas; None when there are none.

    A stored run's rate is its forward-equivalent tokens/s per process (:func:`esa.executors.cost.forward_rate`),
    so ``tokens × passes / rate`` is the planned run's time. Example: runs at ctx 64 and 256, planned at 128 →
    the ctx-64 runs' median. With ``replicas`` > 1 the runs measured with that many replicas are used when there
    are any (their rate holds how well the split scaled); see :func:`_scale`.
    """
    split = kinds.get(run.kind).split_by_replicas
    same = [r for r in _same_model(run.model, stored) if r.kind == run.kind]
    at_replicas = [r for r in same if _replicas_of(r) == replicas]
    same = at_replicas if split and at_replicas else same
    ctx = getattr(run, "context_len", None)
    lens = {r.config.get("context_len") for r in same} - {None}
    near = min(lens, key=lambda c: (abs(c - ctx), c)) if ctx is not None and lens else None
    used = [r.provenance["cost"] for r in same if r.config.get("context_len") == near]
    if not used:
        return None
    rate = statistics.median(forward_rate(c, split) for c in used)
    at = "" if near is None else f" at ctx {near}" + ("" if near == ctx else f" (nearest to {ctx})")
    devices = ", ".join(sorted({str(c.get("device")) for c in used}))
    measured = Throughput(rate, f"measured in {db}: {len(used)} run{'s' * (len(used) != 1)} of kind {run.kind}"
                                f"{at}, median {rate:,.0f} tok/s on {devices}")
    return _scale(measured, run.kind, replicas, measured_with=bool(at_replicas) and split)


def _replicas_of(record) -> int:
    return int(((record.provenance or {}).get("cost") or {}).get("replicas") or 1)


def _scale(tp: Throughput, kind: str, replicas: int, measured_with: bool = False) -> Throughput:
    """``tp`` (one process's rate) for a run shared by ``replicas`` replicas: × replicas when the kind's work is
    split between them (linear scaling unless ``measured_with`` that many), unchanged when each repeats it."""
    if replicas == 1 or tp.tokens_per_second is None:
        return tp
    if not kinds.get(kind).split_by_replicas:
        return Throughput(tp.tokens_per_second, f"{tp.basis}; every replica repeats a {kind} run, so "
                                                f"{replicas} replicas do not shorten it")
    how = f"measured with {replicas} replicas" if measured_with else \
        f"× {replicas} replicas, linear scaling assumed (none measured with {replicas})"
    return Throughput(tp.tokens_per_second * replicas, f"{tp.basis}; {how}")


def plan(study, measure: bool = True, db: str | Path | None = None, replicas: int = 1) -> list[PlanRow]:
    """Every run with its token budget and estimated compute time; nothing is executed or written.

    With ``db`` (a results database), a run whose model and kind completed there is timed at their measured
    rate (:func:`rate_in_db`); the others are timed here or assumed (:func:`throughputs`). ``replicas``: the
    data-parallel replicas each run will be shared by (``esa run --replicas``).
    """
    if replicas < 1:
        raise EsaError(f"--replicas {replicas}: use 1 or more model replicas")
    runs = expand(study)
    ctxs = tuple(sorted({getattr(r, "context_len", None) for r in runs} - {None} | set(study.context_lens)))
    stored = completed_costs(db) if db is not None else []
    found = [rate_in_db(stored, run, db, replicas) for run in runs]
    need = {run.model for run, tp in zip(runs, found) if tp is None}
    rates = {spec: throughputs(spec, study, measure, ctxs) for spec in model_specs(study) if spec in need}
    rows = []
    for run, tp in zip(runs, found):  # a run without windows (zero-shot items) is timed at the shortest context
        tp = tp or _scale(rates[run.model][getattr(run, "context_len", None) or ctxs[0]], run.kind, replicas)
        tokens, passes = kinds.get(run.kind).cost(run)
        secs = tokens * passes / tp.tokens_per_second if tokens is not None and tp.tokens_per_second else None
        rows.append(PlanRow(run, tokens, secs, tp.basis, passes))
    return rows


# ------------------------------------------------------------------------------------------ the summary
@dataclass
class Summary:
    """What an executor did: counts, failed runs and models that could not be loaded."""

    total: int
    skipped: int = 0  # already completed before this invocation
    completed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (run label, error)
    elsewhere: list[str] = field(default_factory=list)  # labels of runs another driver was computing (claimed)
    load_errors: list[tuple[str, str]] = field(default_factory=list)  # (model, error)

    def add(self, record: RunRecord, label: str) -> None:
        if record.status == "completed":
            self.completed += 1
        else:
            self.failed.append((label, record.error or ""))

    @property
    def ok(self) -> bool:
        return not self.failed and not self.load_errors


