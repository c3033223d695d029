"""The ``scaling:`` section of a study file: every model of the study's ``models`` list is one point of a size
ladder, measured with the protocol of :mod:`esa.scaling` (expanded by :mod:`esa.study_scaling`).

Example (``studies/scaling.yaml``)::

    scaling:
      statistics: [bits_per_byte, sw_count, sw_delta_nll, magnitude_top_share]   # omit: all of them
      tail_fraction: 0.001
      context_len: 512          # omit: the study's first context length
      max_eval_tokens: 65536    # omit: the study's max_eval_tokens

The fields mirror :class:`esa.scaling.ScalingConfig` and its :class:`~esa.perturb.protocols.EvalConfig`;
``models``, ``dtype``, ``device`` and ``batch_tokens`` come from the study. This module holds only the schema
and its checks (no model, corpus or network), so :mod:`esa.study` can import it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScalingSection:
    """One scaling point per model of the study; ``None`` fields take the study's value."""

    statistics: tuple[str, ...] = ()  # esa.scaling.STATISTICS keys to measure and fit; empty → all
    op: str = "zero"  # perturbation of the super weights and of the size-matched random_k control
    control_seeds: tuple[int, ...] = (0, 1, 2)  # random_k draws
    tail_fraction: float = 0.001  # heavy-tail share: the top 0.1 % of |W|
    x_axis: str = "n_params"  # n_params (tied embeddings once) | n_params_non_embedding
    dataset: str | None = None  # None → the study's first dataset
    context_len: int | None = None  # chunks window length T; None → the study's first context length
    seed: int | None = None  # picks evaluation and calibration windows; None → the study's first seed
    max_eval_tokens: int | None = None  # scored tokens per model, in its own tokens; None → the study's
    calib_samples: int = 4  # windows for super-weight detection, drawn from those not evaluated
    n_boot: int = 10_000  # bootstrap resamples per ΔNLL CI


def _require(cond: bool, message: str) -> None:
    from esa.errors import EsaError

    if not cond:
        raise EsaError(message)


def check_scaling(study, where: str) -> None:
    """Semantic checks of ``study.scaling`` (types were checked while parsing); a no-op without the section."""
    from esa.errors import EsaError
    from esa.perturb.ops import parse_op
    from esa.registry import suggest
    from esa.scaling import X_AXES, resolve_statistics
    from esa.study import _check_dataset

    s: ScalingSection | None = getattr(study, "scaling", None)
    if s is None:
        return
    at = f"{where}.scaling"
    try:
        resolve_statistics(s.statistics)
    except EsaError as exc:
        raise EsaError(f"{at}.statistics: {exc}") from exc
    try:
        parse_op(s.op)
    except (EsaError, TypeError, ValueError) as exc:
        raise EsaError(f"{at}.op: {exc}") from exc
    _require(bool(s.control_seeds), f"{at}.control_seeds: give at least one random_k seed, e.g. [0, 1, 2]")
    _require(len(set(s.control_seeds)) == len(s.control_seeds) and min(s.control_seeds) >= 0,
             f"{at}.control_seeds: {list(s.control_seeds)} must be distinct and ≥ 0")
    _require(0 < s.tail_fraction < 1, f"{at}.tail_fraction: {s.tail_fraction} must be in (0, 1), e.g. 0.001")
    _require(s.x_axis in X_AXES, f"{at}.x_axis: " + suggest(s.x_axis, list(X_AXES), "x axis"))
    if s.dataset is not None:
        _check_dataset(s.dataset, f"{at}.dataset")
    _require(s.context_len is None or s.context_len >= 2, f"{at}.context_len must be ≥ 2 (or omitted)")
    _require(s.seed is None or s.seed >= 0, f"{at}.seed must be ≥ 0 (or omitted)")
    _require(s.max_eval_tokens is None or s.max_eval_tokens >= 1,
             f"{at}.max_eval_tokens must be ≥ 1 (omit it to use the study's)")
    _require(s.calib_samples >= 1 and s.n_boot >= 1, f"{at}: calib_samples and n_boot must be ≥ 1")
