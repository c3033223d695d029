"""The ``dose_response:`` and ``bitscan:`` sections of a study file: typed, strict, validated without a model.

They are the study forms of protocols 2 and 3 of :mod:`esa.perturb.protocols` (``esa dose-response`` and
``esa bitscan``); :mod:`esa.study_causal` expands them into runs. This module imports nothing from
:mod:`esa.study` at import time, so :class:`esa.study.Study` can name these types as its fields. Example::

    dose_response:
      targets:
        - {name: top_gxw, ranking: grad_x_weight}   # no k: one run per value of ks
        - {name: super, spec: superweights}
      ks: [1, 10, 100]                              # dose in k: sizes of a ranking target's top-k
      ops:                                          # dose in strength: the swept op parameter
        - {op: scale, values: [0.0, 0.5, 2.0, 10.0]}
        - {op: gauss_noise, values: [0.01, 0.1, 1.0], params: {relative_to: tensor_std}}
      controls: [random_k]                          # size-matched random elements of the same tensors
      trials: 3                                     # control seeds 0…2 (and noise seeds of a random op)
    bitscan:
      targets: [{name: top_gxw, ranking: grad_x_weight, k: 4}]
      top_n: 4                                      # the first 4 target weights, in ranking order
      bits: [sign, exponent_msb, 30]
      max_flips: 8                                  # greedy collapse search gives up after this many
      greedy_pool: 64

A ranking target reads the top-k of a scorer of the ``sensitivity:`` section (the scorer must be listed
there, and k ≤ ``sensitivity.k``). Ops without a strength parameter (``zero``, ``sign_flip``) have no dose to
sweep: write ``{op: scale, values: [0.0]}`` to zero the targets at each k, ``[-1.0]`` to flip their signs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from esa.errors import EsaError


@dataclass(frozen=True)
class CausalTarget:
    """A named weight set: a target spec string, or the top k of a scorer's ranking."""

    name: str
    spec: str | None = None  # esa.perturb.protocols.resolve_targets spec (superweights, rows:/tensor: glob, …)
    ranking: str | None = None  # scorer (in sensitivity.scorers) whose top-k gives the targets
    k: int | None = None  # with ranking; None → dose_response: each of ks, bitscan: top_n


@dataclass(frozen=True)
class DoseOp:
    """An op with a strength parameter, and the values it is swept over (one run covers every value)."""

    op: str  # scale (factor) | gauss_noise (sigma) | uniform_noise (width) | bit_flip (bit) | set (value) | …
    values: tuple[Any, ...]  # the swept parameter, in plotting order; bit_flip: positions or names
    params: dict[str, Any] = field(default_factory=dict)  # fixed parameters, e.g. {relative_to: tensor_std}


@dataclass(frozen=True)
class DoseResponseSection:
    targets: tuple[CausalTarget, ...]
    ops: tuple[DoseOp, ...]
    ks: tuple[int, ...] = ()  # top-k sizes of ranking targets without their own k
    controls: tuple[str, ...] = ("random_k",)  # random_k, or [] for the target arm alone
    trials: int = 1  # control seeds 0…trials-1: random_k draws, and noise seeds of a random op
    collapse_ppl: float | None = None  # collapsed: PPL above this (None → esa.stats.DEFAULT_COLLAPSE_PPL)
    datasets: tuple[str, ...] = ()  # evaluation corpora; empty → the study's datasets
    context_lens: tuple[int, ...] = ()  # evaluation window lengths; empty → the study's context_lens
    seeds: tuple[int, ...] = ()  # a subset of the study's seeds; empty → all of them


@dataclass(frozen=True)
class BitscanSection:
    targets: tuple[CausalTarget, ...]
    top_n: int = 4  # scanned weights: the first top_n target elements (ranking / super-weight order)
    bits: tuple[int | str, ...] = ("sign", "exponent_msb", "exponent_lsb", "mantissa_msb")
    max_flips: int = 8  # greedy collapse search: give up after this many flips
    greedy_pool: int = 64  # … choosing among this many of the most damaging single flips (64: all of 4 × 4)
    collapse_ppl: float | None = None  # collapsed: PPL above this (None → esa.stats.DEFAULT_COLLAPSE_PPL)
    datasets: tuple[str, ...] = ()
    context_lens: tuple[int, ...] = ()
    seeds: tuple[int, ...] = ()  # a subset of the study's seeds; empty → all of them


# ------------------------------------------------------------------------------------------- validation
def _require(cond: bool, message: str) -> None:
    if not cond:
        raise EsaError(message)


def _check_targets(targets: tuple[CausalTarget, ...], sens, where: str, k_from: str) -> None:
    """Names unique, exactly one of spec/ranking, a ranking scorer the sensitivity section runs, k in range."""
    from esa.registry import suggest

    _require(bool(targets), f"{where}.targets: give at least one target")
    names = [t.name for t in targets]
    _require(len(set(names)) == len(names), f"{where}.targets: duplicate target names in {names}")
    for i, t in enumerate(targets):
        at = f"{where}.targets[{i}]"
        _require((t.spec is None) != (t.ranking is None), f"{at}: give exactly one of 'spec' or 'ranking'")
        if t.spec is not None:
            _require(t.k is None, f"{at}.k: only a ranking target takes k; drop it (the spec names the weights)")
            continue
        _require(sens is not None, f"{at}.ranking: a ranking target needs a sensitivity: section that scores "
                 f"{t.ranking!r}; add one, or give a spec: instead")
        _require(t.ranking in sens.scorers, f"{at}.ranking: " + suggest(t.ranking, list(sens.scorers), "scorer")
                 + " (list it under sensitivity.scorers)")
        _require(t.k is None or 1 <= t.k <= sens.k,
                 f"{at}.k: a ranking target needs 1 ≤ k ≤ sensitivity.k ({sens.k}), got {t.k}")
        _require(t.k is not None or bool(k_from), f"{at}: give the ranking target a k, or list {k_from or 'ks'}")


def _check_places(section, study_seeds: tuple[int, ...], where: str) -> None:
    from esa.study import _check_dataset

    for i, d in enumerate(section.datasets):
        _check_dataset(d, f"{where}.datasets[{i}]")
    _require(all(c >= 2 for c in section.context_lens), f"{where}.context_lens: each must be ≥ 2")
    extra = [s for s in section.seeds if s not in study_seeds]
    _require(not extra, f"{where}.seeds: {extra} not among the study's seeds {list(study_seeds)}; "
             "these sections pick a subset of them")


def op_string(entry: DoseOp) -> str:
    """``name[:fixed=…]``: the DoseConfig.op of a dose op (the swept parameter is added per value)."""
    from esa.study_sections import op_spec

    return op_spec(entry.op, entry.params)


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


def check_dose_response(d: DoseResponseSection, sens, dtypes: set[str], where: str,
                        seeds: tuple[int, ...]) -> None:
    """Semantic checks of a dose_response section (types were checked while parsing)."""
    from esa.perturb.ops import OPS
    from esa.perturb.protocols import DOSE_PARAM, dose_ops
    from esa.registry import suggest

    _check_targets(d.targets, sens, where, "ks" if d.ks else "")
    top = sens.k if sens else None
    _require(len(set(d.ks)) == len(d.ks) and all(1 <= k and (top is None or k <= top) for k in d.ks),
             f"{where}.ks: distinct sizes with 1 ≤ k ≤ sensitivity.k ({top}), got {list(d.ks)}")
    _require(bool(d.ops), f"{where}.ops: give at least one op, e.g. {{op: scale, values: [0.0, 0.5, 2.0]}}")
    for i, entry in enumerate(d.ops):
        at = f"{where}.ops[{i}]"
        if entry.op not in OPS:
            raise EsaError(f"{at}.op: " + suggest(entry.op, OPS.names(), "perturbation op"))
        _require(entry.op in DOSE_PARAM, f"{at}.op: {entry.op!r} has no strength to sweep; use one of "
                 f"{', '.join(f'{k} ({v})' for k, v in DOSE_PARAM.items())} — e.g. scale with values [0.0] zeroes")
        _require(bool(entry.values) and len(set(map(str, entry.values))) == len(entry.values),
                 f"{at}.values: give distinct values of {DOSE_PARAM[entry.op]}, got {list(entry.values)}")
        _require(DOSE_PARAM[entry.op] not in entry.params,
                 f"{at}.params: {DOSE_PARAM[entry.op]!r} is the swept parameter; list it under values only")
        try:
            dose_ops(op_string(entry), list(entry.values))
        except (EsaError, TypeError, ValueError) as exc:
            raise EsaError(f"{at} {entry.op} {entry.params or ''}: {exc}") from exc
        if entry.op == "bit_flip":
            _check_bits(entry.values, dtypes, f"{at}.values")
    for i, c in enumerate(d.controls):
        _require(c == "random_k", f"{where}.controls[{i}]: " + suggest(c, ["random_k"], "dose-response control"))
    _require(d.trials >= 1, f"{where}.trials must be ≥ 1")
    _require(d.collapse_ppl is None or d.collapse_ppl > 1, f"{where}.collapse_ppl must be > 1 (or null)")
    _check_places(d, seeds, where)


def check_bitscan(b: BitscanSection, sens, dtypes: set[str], where: str, seeds: tuple[int, ...]) -> None:
    """Semantic checks of a bitscan section."""
    _check_targets(b.targets, sens, where, "top_n")
    for i, t in enumerate(b.targets):
        _require(t.ranking is None or t.k is not None or b.top_n <= sens.k,
                 f"{where}.targets[{i}]: without k the target is the top top_n={b.top_n} weights, more than "
                 f"sensitivity.k ({sens.k if sens else None}) keeps; give k or lower top_n")
    _require(b.top_n >= 1 and b.max_flips >= 1 and b.greedy_pool >= 1,
             f"{where}: top_n, max_flips and greedy_pool must be ≥ 1")
    _require(bool(b.bits), f"{where}.bits: give at least one bit, e.g. [sign, exponent_msb]")
    _check_bits(b.bits, dtypes, f"{where}.bits")
    _require(b.collapse_ppl is None or b.collapse_ppl > 1, f"{where}.collapse_ppl must be > 1 (or null)")
    _check_places(b, seeds, where)


def check_causal(study, where: str) -> None:
    """Validate the study's dose_response and bitscan sections (called by :func:`esa.study.validate`)."""
    dtypes = {m.dtype or study.dtype for m in study.models}
    if getattr(study, "dose_response", None) is not None:
        check_dose_response(study.dose_response, study.sensitivity, dtypes, f"{where}.dose_response",
                            study.seeds)
    if getattr(study, "bitscan", None) is not None:
        check_bitscan(study.bitscan, study.sensitivity, dtypes, f"{where}.bitscan", study.seeds)
