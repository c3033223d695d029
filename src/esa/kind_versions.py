"""Semantic versions of the run kinds: part of every run's identity, bumped when a kind's outputs change meaning.

A run's id hashes its resolved config, which carries ``kind_version`` (:func:`esa.executors.resolved_config`),
so a database written before a change is never silently reused: the same study rerun computes fresh rows, and
``esa report`` flags a kind whose stored rows come from more than one version (or an older one). Rows written
before versions were recorded have none and count as version 1.

Bump a kind here — and say why in the comment — whenever the same config would now store different numbers.
"""

from __future__ import annotations

UNVERSIONED = 1  # rows stored before kind versions were part of the run id

KIND_VERSIONS: dict[str, int] = {
    "baseline": 2,  # 2: word/byte counts on the source text the scored tokens cover (not per decoded window)
    "sensitivity": 2,  # 2: top rankings also keep a per-tensor floor table (bottom_k's source)
    "perturbation": 2,  # 2: bottom_k = lowest-scoring weights of the same tensors; CI method with measured coverage
    "dose_response": 2,  # 2: CI method with measured coverage
    "bitscan": 2,  # 2: the greedy search stops when a step would not raise the damage; pool = all flips
    "scaling_point": 2,  # 2: CI method and word/byte counts as above
}


def kind_version(kind: str) -> int:
    """The current semantic version of ``kind`` (KeyError for an unknown kind: a programming error)."""
    return KIND_VERSIONS[kind]


def stored_version(config: dict) -> int:
    """The kind version a stored run config was made with (:data:`UNVERSIONED` before versions were stored)."""
    return int(config.get("kind_version", UNVERSIONED))
