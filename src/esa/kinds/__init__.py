"""The run-kind registry: kind name → the module that holds everything about it (:mod:`esa.kinds.base`).

The engine finds a kind only here, by name, and imports its module when first asked — as lm-evaluation-harness
resolves ``"module:object"`` — so the study, execution, store and report core never import a kind and no
import cycle can form. Adding a kind: write ``esa/kinds/<name>.py`` with ``KIND = RunKind(...)`` and add one
line to :data:`KIND_MODULES`.
"""

from __future__ import annotations

import importlib
from functools import cache

from esa.core.errors import EsaError
from esa.kinds.base import RunKind
from esa.core.registry import suggest

KIND_MODULES: dict[str, str] = {  # registry order breaks ties of the dependency order
    "baseline": "esa.kinds.baseline",
    "superweights": "esa.kinds.superweights",
    "sensitivity": "esa.kinds.sensitivity",
    "perturbation": "esa.kinds.perturbation",
    "dose_response": "esa.kinds.dose_response",
    "bitscan": "esa.kinds.bitscan",
    "scaling_point": "esa.kinds.scaling_point",
    "long_context": "esa.kinds.long_context",
    "zeroshot": "esa.kinds.zeroshot",
    "vulnerability": "esa.kinds.vulnerability",
}


def names() -> list[str]:
    return list(KIND_MODULES)


@cache
def get(name: str) -> RunKind:
    """The :class:`RunKind` registered as ``name`` (EsaError with near matches for an unknown name)."""
    if name not in KIND_MODULES:
        raise EsaError(suggest(name, names(), "run kind"))
    kind = importlib.import_module(KIND_MODULES[name]).KIND
    if kind.name != name:
        raise EsaError(f"{KIND_MODULES[name]} defines kind {kind.name!r}, registered as {name!r}")
    return kind


def ordered() -> list[RunKind]:
    """Every kind, dependencies first (a topological order of ``depends_on``; ties keep registry order)."""
    done: dict[str, RunKind] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in path:
            raise EsaError(f"run kinds depend on each other in a cycle: {' → '.join(path + (name,))}")
        for dep in get(name).depends_on:
            visit(dep, path + (name,))
        done[name] = get(name)

    for name in names():
        visit(name, ())
    return list(done.values())


def with_section() -> dict[str, RunKind]:
    """Study-file section key → the kind that owns that section."""
    return {k.section: k for k in ordered() if k.section}
