"""Executing ``scaling_point`` runs (:mod:`esa.study_scaling`): one model of a size ladder.

A runner is ``(lm, run, ctx) -> (metrics, arrays)`` (see :mod:`esa.executors.sections`). This one calls
:func:`esa.scaling.measure_model` — the same function, so a study's scaling point and an ``esa scaling``
model are measured identically — and stores:

* **metrics** — the scaling row exactly as ``measure_model`` returns it (model, n_params,
  n_params_non_embedding, perplexity, bits_per_byte, super-weight count/layer/depth/activations and
  coordinates, sw_/random_ ΔNLL with CIs and PPL ratios, sw_over_random, magnitude_top_share, data, the
  fingerprint, notes, wall_seconds), plus ``perturbation``: the full perturb.json document of the super
  weights vs random_k experiment (comparisons with p-values, arms, separation, the windows' indices), or
  null when no perturbation ran. Non-finite numbers are stored as "nan"/"inf" (as everywhere in the store).
* **arrays** (``artifacts/<run_id>/per_window.npz``) — the paired per-window data: ``window_index``,
  ``n_scored``, ``baseline_nll`` and, when the perturbation ran, ``target_nll``/``random_k_nll`` (and their
  per-seed arrays) and ``delta__<comparison>``, as in ``perturb.npz``.
"""

from __future__ import annotations

import numpy as np

from esa.models import LoadedModel


def execute_scaling_point(lm: LoadedModel, run, ctx) -> tuple[dict, dict[str, np.ndarray]]:
    """Measure one model of the ladder with ``run``'s protocol (``ctx`` is unused: the bench loads its own
    corpus, and a scaling point depends on no other run)."""
    from esa.scaling import measure_model

    row, doc, arrays = measure_model(lm, run.scaling_config())
    return {**row, "perturbation": doc}, arrays


def summary_line(metrics: dict) -> str:
    """One progress line of a finished point: bits per byte, super weights and their ΔNLL vs random_k."""
    def g(key: str) -> str:
        v = metrics.get(key)
        return "—" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    return f"bpb {g('bits_per_byte')} (ppl {g('perplexity')}), {g('sw_count')} super weight(s), " \
           f"ΔNLL super weights {g('sw_delta_nll')} vs random_k {g('random_delta_nll')}"
