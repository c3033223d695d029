"""Experiment tracking, an optional extra (``pip install 'esa[tracking]'``): MLflow and Weights & Biases
loggers fed by the executor's events.

One tracked run per ESA run, logged when the executor's ``run`` event fires — after the run's commit, so its
artifact files exist:

* name = the run's label; tags ``esa_run_id``, ``esa_kind``, ``esa_status`` and, for a failed run (MLflow
  status FAILED, W&B exit code 1), ``esa_error``;
* params = the resolved config flattened to dotted keys (:func:`flat_params`);
* metrics = every finite number of the record's metrics (:func:`flat_metrics`);
* artifacts = the files of the run's folder ``artifacts/<run_id>/`` beside the results database.

Each tracked run is opened and ended within one event (FAILED when logging breaks halfway), so none stays open
between runs or after an exception; ``close()`` — or ``with tracked(...)`` — ends the trackers' sessions. A
tracker that cannot log a run logs a warning and the study goes on: the ESA database is the record, a tracker
one view of it. ``mlflow``/``wandb`` are imported only when a tracker starts.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
from datetime import datetime
from pathlib import Path
from typing import Protocol

from esa.core.errors import EsaError
from esa.core.registry import Registry
from esa.store import RunRecord, canonical_json
from esa.store.reader import numeric_leaves

log = logging.getLogger(__name__)

INSTALL = "pip install 'esa[tracking]'"
PARAM_LIMIT = 6000  # MLflow's MAX_PARAM_VAL_LENGTH (characters); a longer value is refused, not cut
TAG_LIMIT = 8000  # MLflow's MAX_TAG_VAL_LENGTH
KEY_LIMIT = 250  # MLflow's MAX_ENTITY_KEY_LENGTH
TRUNCATED = "...[truncated]"


def _key(name: str) -> str:
    """A key MLflow accepts: alphanumerics, ``_ - . space`` only (``/`` and ``:`` are not portable), ≤ 250."""
    return "".join(c if c.isalnum() or c in "_-. " else "_" for c in name)[:KEY_LIMIT]


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - len(TRUNCATED)] + TRUNCATED


def _as_stored(obj: dict) -> dict:
    """``obj`` as the store's JSON reads back (tuples as lists, numpy scalars as numbers, NaN as "nan"), so a
    tracker logs what the results database holds, whether fed a fresh record or a stored row."""
    return json.loads(canonical_json(obj))


def flat_params(config: dict) -> dict[str, str]:
    """The resolved config as tracker params: nested dicts flattened to dotted keys, every value a string —
    strings as they are, anything else as the store's JSON of it (lists whole), cut to MLflow's 6000
    characters; a key outside MLflow's alphabet gets ``_`` for each other character::

        {"model": {"name": "m", "revision": None}, "seeds": [0, 1], "dataset": "d", "fit": {}}
        → {"model.name": "m", "model.revision": "null", "seeds": "[0,1]", "dataset": "d", "fit": "{}"}
    """
    out: dict[str, str] = {}

    def walk(obj: dict, prefix: str) -> None:
        for key, value in obj.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                walk(value, f"{name}.")
            else:
                text = value if isinstance(value, str) else canonical_json(value)
                out[_key(name)] = _clip(text, PARAM_LIMIT)

    walk(_as_stored(config), "")
    return out


def flat_metrics(metrics: dict) -> tuple[dict[str, float], dict[str, str]]:
    """``(finite, nonfinite)``: every number of ``metrics`` by dotted name (nested dicts, list items by index,
    booleans and strings skipped: :func:`esa.store.reader.numeric_leaves`), the finite ones as floats and the
    non-finite ones as "nan"/"inf"/"-inf". Trackers log the latter as strings (tags/summary ``nonfinite.<name>``),
    not as metrics: MLflow stores ±inf as ±1.8e308 and a NaN point breaks its charts, yet a collapsed perplexity
    is a result worth seeing."""
    finite, nonfinite = {}, {}
    for name, value in numeric_leaves(_as_stored(metrics)):
        if math.isfinite(value):
            finite[_key(name)] = value
        else:
            nonfinite[_key(name)] = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return finite, nonfinite


def _require(module: str, tracker: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise EsaError(f"--track {tracker} needs the {module} package: {INSTALL}") from None


def _ms(stamp: str) -> int:
    return int(datetime.fromisoformat(stamp).timestamp() * 1000)


class Tracker(Protocol):
    """Where tracked runs go. ``start`` once before the first run (fails early on a bad setup),
    ``log_run`` per finished ESA run (opens and ends one tracked run), ``close`` once at the end."""

    name: str

    def start(self) -> None: ...

    def log_run(self, record: RunRecord, label: str, artifacts: Path | None) -> None: ...

    def close(self) -> None: ...


class MlflowTracker:
    """MLflow through ``MlflowClient`` (no global active run, so it never touches a caller's own runs).

    ``uri``: a tracking URI (``sqlite:///abs/path/mlflow.db``, ``http://host:5000``, or ``file:`` with
    ``MLFLOW_ALLOW_FILE_STORE=true``: MLflow 3 keeps its file store in maintenance mode). A new experiment on a
    local ``sqlite:`` store keeps its artifacts in ``mlartifacts/`` beside the database, not in the cwd.
    """

    name = "mlflow"

    def __init__(self, uri: str, experiment: str = "esa") -> None:
        self.uri, self.experiment = uri, experiment
        self._client, self._experiment_id = None, None

    def start(self) -> None:
        _require("mlflow", self.name)
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        local = self.uri.startswith("sqlite:///") and self.uri.removeprefix("sqlite:///") != ":memory:"
        artifacts = (Path(self.uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri() \
            if local else None
        try:
            self._client = MlflowClient(tracking_uri=self.uri)
            exp = self._client.get_experiment_by_name(self.experiment)
            self._experiment_id = exp.experiment_id if exp else \
                self._client.create_experiment(self.experiment, artifact_location=artifacts)
        except MlflowException as exc:
            raise EsaError(f"MLflow tracking URI {self.uri}: {exc.message}") from None

    def log_run(self, record: RunRecord, label: str, artifacts: Path | None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        finite, nonfinite = flat_metrics(record.metrics)
        tags = {"esa_run_id": record.run_id, "esa_kind": record.kind, "esa_status": record.status}
        if record.error:
            tags["esa_error"] = _clip(record.error, TAG_LIMIT)
        run = self._client.create_run(self._experiment_id, start_time=_ms(record.started_at), tags=tags,
                                      run_name=label)
        rid, status, end = run.info.run_id, "FAILED", _ms(record.finished_at)
        try:
            batches = (("params", [Param(k, v) for k, v in flat_params(record.config).items()], 100),
                       ("tags", [RunTag(_key(f"nonfinite.{k}"), v) for k, v in nonfinite.items()], 100),
                       ("metrics", [Metric(k, v, end, 0) for k, v in finite.items()], 1000))
            for field, items, size in batches:  # MLflow's per-request limits
                for i in range(0, len(items), size):
                    self._client.log_batch(rid, **{field: items[i:i + size]})
            if artifacts is not None and artifacts.is_dir():
                self._client.log_artifacts(rid, str(artifacts))
            status = "FINISHED" if record.status == "completed" else "FAILED"
        finally:
            self._client.set_terminated(rid, status, end_time=end)

    def close(self) -> None:
        self._client = None


class WandbTracker:
    """Weights & Biases, one ``wandb.init(reinit="create_new")`` … ``finish()`` per run, so a caller's own
    active run is never reused. ``mode``: "online", "offline" or "disabled" (None: W&B's own, ``WANDB_MODE``);
    ``dir``: where ``wandb/`` goes (None: W&B's own, ``WANDB_DIR`` or the cwd). Config = the resolved config
    (nested) plus ``esa_run_id``; summary = the finite metrics and ``nonfinite.<name>`` strings; the artifact
    files are saved into the run's files (``run.save``, linked until synced)."""

    name = "wandb"

    def __init__(self, project: str = "esa", mode: str | None = None, dir: str | Path | None = None) -> None:
        self.project, self.mode, self.dir = project, mode, dir
        self._wandb = None

    def start(self) -> None:
        self._wandb = _require("wandb", self.name)
        if self.dir is not None:
            Path(self.dir).mkdir(parents=True, exist_ok=True)

    def log_run(self, record: RunRecord, label: str, artifacts: Path | None) -> None:
        finite, nonfinite = flat_metrics(record.metrics)
        config = {**_as_stored(record.config), "esa_run_id": record.run_id}
        run = self._wandb.init(project=self.project, mode=self.mode, dir=self.dir, name=label, job_type=record.kind,
                               tags=[record.kind, record.status], config=config, reinit="create_new")
        exit_code = 1
        try:
            run.summary.update({**finite, **{f"nonfinite.{k}": v for k, v in nonfinite.items()},
                                **({"esa_error": record.error} if record.error else {})})
            files = sorted(artifacts.rglob("*")) if artifacts is not None and artifacts.is_dir() else []
            for path in (f for f in files if f.is_file()):
                run.save(str(path), base_path=str(artifacts), policy="now")
            exit_code = 0 if record.status == "completed" else 1
        finally:
            run.finish(exit_code=exit_code)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.teardown()
            self._wandb = None


# name → factory(db, uri, project); uri None: $MLFLOW_TRACKING_URI, else sqlite:///<db folder>/mlflow.db
TRACKERS: Registry = Registry("tracker")
TRACKERS.register("mlflow", lambda db, uri, project: MlflowTracker(
    uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(db).resolve().parent / 'mlflow.db'}", project))
TRACKERS.register("wandb", lambda db, uri, project: WandbTracker(
    project, dir=None if os.environ.get("WANDB_DIR") else Path(db).resolve().parent))


def make_trackers(names: list[str], db: str | Path, uri: str | None = None, project: str = "esa") -> list[Tracker]:
    """Trackers by name (``["mlflow", "wandb"]`` or ``["mlflow,wandb"]``); an unknown name raises with near
    matches and the valid names. ``db``: the results database, whose folder holds the default stores."""
    wanted = dict.fromkeys(n.strip() for name in names for n in name.split(",") if n.strip())
    factories = [TRACKERS.get(n) for n in wanted]  # every name checked before any tracker is made
    return [make(db, uri, project) for make in factories]


class Tracked:
    """An ``on_event`` that passes every event on, then logs each finished run to every tracker."""

    def __init__(self, on_event, trackers: list[Tracker], db: str | Path | None = None) -> None:
        self.on_event, self.trackers = on_event, list(trackers)
        self.artifacts = Path(db).parent / "artifacts" if db is not None else None  # as Store.artifact_dir
        for i, tracker in enumerate(self.trackers):
            try:
                tracker.start()
            except BaseException:
                for started in self.trackers[:i]:
                    started.close()
                raise

    def __call__(self, kind: str, **info) -> None:
        self.on_event(kind, **info)
        if kind != "run":
            return
        record = info["record"]
        folder = self.artifacts / record.run_id if self.artifacts is not None else None
        for tracker in self.trackers:
            try:
                tracker.log_run(record, info.get("label", record.run_id), folder)
            except Exception as exc:  # noqa: BLE001 — the run is committed; tracking is a view of it
                log.warning("%s could not track run %s (%s): %s — it is in the results database all the same",
                            tracker.name, info.get("label"), record.run_id[:12], exc)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()

    def __enter__(self) -> Tracked:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def tracked(on_event, trackers: list[Tracker], db: str | Path | None = None):
    """``on_event`` plus tracking: each ``run`` event is also logged to ``trackers`` (started here, so a
    missing package or a bad URI fails before any run). ``db``: the results database, whose
    ``artifacts/<run_id>/`` files are logged with each run (None: no artifacts). No trackers: ``on_event``."""
    return Tracked(on_event, trackers, db) if trackers else on_event


def add_track_args(parser) -> None:
    """``--track``, ``--track-uri`` and ``--track-project`` of ``esa run`` and every one-off command."""
    parser.add_argument("--track", nargs="+", default=[], metavar="TRACKER",
                        help=f"also log each run to {' and/or '.join(TRACKERS.names())} (needs {INSTALL})")
    parser.add_argument("--track-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                        "else sqlite:///<db folder>/mlflow.db)")
    parser.add_argument("--track-project", default="esa", help="W&B project and MLflow experiment (default esa)")


def from_args(args, on_event, db: str | Path):
    """``on_event`` tracked as the flags of :func:`add_track_args` ask; without ``--track``, ``on_event`` itself."""
    names = getattr(args, "track", None)
    if not names:
        return on_event
    return tracked(on_event, make_trackers(names, db, args.track_uri, args.track_project), db)
