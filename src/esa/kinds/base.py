"""What a run kind is: the small protocol every kind module implements, and what its runs get at execution.

A **run kind** (``baseline``, ``sensitivity``, ``perturbation`` …) is one module of :mod:`esa.kinds` exposing
``KIND = RunKind(...)``. It owns everything about its runs: the strict schema of its study section, the
expansion of a study into runs, the kinds its runs may depend on, their execution, a cost estimate for
``esa plan``, a one-line summary and its report section. The engine (study, execution, store, report) reaches a
kind only through :mod:`esa.kinds` (the registry), by name — it never imports one.

A **run** is a frozen dataclass with ``kind`` (ClassVar str), ``model`` (a ModelSpec), ``config() -> dict``
(what, with the model fingerprint and the kind's version, determines the run id), ``label() -> str`` and
``dependencies() -> {role: run}`` (runs of other kinds whose results it reads; the engine adds them to the
study's runs when missing and puts their ids into ``depends_on``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pandas as pd


@dataclass
class RunContext:
    """What the runs of one model group share in one process, and the identity of the run being executed.

    ``rankings``: sensitivity run id → its ranking table (and ``<id>/floor`` → its floor table), filled by
    sensitivity runs of this process or by the driver from the store (:attr:`RunKind.load_result`).
    ``run_id`` / ``depends_on``: set by the executor before each run, so a kind never recomputes run ids.
    ``documents``: name → JSON document a kind's ``execute`` wants stored beside the row (artifacts/<id>/<name>.json,
    read back with :meth:`esa.store.Reader.documents`); emptied by the executor before each run.
    """

    corpora: dict = field(default_factory=dict)
    rankings: dict[str, pd.DataFrame] = field(default_factory=dict)
    run_id: str = ""
    depends_on: dict[str, str] = field(default_factory=dict)  # role → run id of the current run's dependencies
    documents: dict[str, dict] = field(default_factory=dict)  # JSON documents the current run stores beside its row


class KindRun:
    """Base of every kind's frozen run dataclass: ``config()`` and ``dependencies()`` from its fields.

    A field named ``<role>_run`` holds a run this one depends on (e.g. ``ranking_run``): it is a dependency
    under ``<role>`` when set, and it is left out of ``config()`` — the engine puts the dependency's run id in as
    ``depends_on`` instead. ``CONSTANT_CONFIG`` adds fixed entries (e.g. ``{"method": "chunks"}``).
    """

    kind: ClassVar[str]
    CONSTANT_CONFIG: ClassVar[dict] = {}

    def _dependency_fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if f.name.endswith("_run")]

    def config(self) -> dict:
        """The resolved run config: with the model fingerprint and the kind's version, it determines the run id."""
        cfg = {"kind": self.kind, **dataclasses.asdict(self), **self.CONSTANT_CONFIG}
        cfg["model"] = self.model.identity()  # esa.models.ModelSpec.identity: ids stable across added fields
        for name in self._dependency_fields():
            del cfg[name]
        return cfg

    def dependencies(self) -> dict:
        """{role: run} of the runs whose results this one reads."""
        deps = {name.removesuffix("_run"): getattr(self, name) for name in self._dependency_fields()}
        return {role: run for role, run in deps.items() if run is not None}


Metrics = dict  # JSON-ready metrics of one run (non-finite floats allowed)
Arrays = dict  # name → np.ndarray, stored as artifacts/<run_id>/per_window.npz


@dataclass(frozen=True)
class ReportSection:
    """How a kind's runs appear in ``esa report``: a heading, its place, and a renderer (runs → blocks)."""

    title: str  # "" when the renderer writes its own heading
    order: int  # position among the kinds' sections (ties: registry order)
    render: Callable[[list], list]  # list[esa.report.study_report.Run] → list[Block]


@dataclass(frozen=True)
class RunKind:
    """One run kind (see the module docstring). Optional hooks are None when a kind needs none."""

    name: str
    version: int  # semantic version: bump when the same config would store numbers that mean something else
    about: str  # one line: what a run of this kind measures
    section: str | None  # the study file's key for this kind's section; None: built from the study's own fields
    schema: type | None  # frozen dataclass of that section (strict: esa.core.schema.parse_section)
    check: Callable[[Any, Any, str], None]  # (section, study, where) → None or EsaError; types already checked
    expand: Callable[[Any], list]  # study → its runs of this kind, model-major
    depends_on: tuple[str, ...]  # kinds whose runs this kind's runs may depend on (a DAG; sorted topologically)
    execute: Callable[[Any, Any, RunContext], tuple[Metrics, Arrays]]  # (LoadedModel, run, ctx)
    cost: Callable[[Any], tuple[int | None, float]]  # run → (scored tokens, forward-equivalent passes)
    summary: Callable[[Any], str]  # completed RunRecord → one line of progress output
    report: ReportSection
    on_commit: Callable[[Any, Any], None] | None = None  # (store, record) before the row is written
    load_result: Callable[[Any, str], dict] | None = None  # (store, run id) → ctx.rankings entries for dependents
    warnings: Callable[[Any], list[str]] | None = None  # stored Run → kind-specific report warnings
    # whether data-parallel replicas (esa.core.parallel) split a run's work; False: each repeats all of it
    # (gradient passes, super-weight detection), so replicas do not shorten the run (esa plan --replicas)
    split_by_replicas: bool = True


def no_check(section, study, where: str) -> None:
    """For kinds whose section needs no checks beyond its types."""
    return None
