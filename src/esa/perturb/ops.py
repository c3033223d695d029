"""Perturbation ops: pure functions from the touched elements' old values to their new values.

An op sees only the gathered 1-D tensor of touched elements (N,) in the weight's dtype, a ``torch.Generator``
for its randomness, and — when it declares ``needs_tensor_std`` — the standard deviation of the *whole*
original tensor (fp32, computed by :func:`esa.perturb.context.perturbed` before anything is written). It
returns a new (N,) tensor of the same dtype and never modifies its input; :mod:`esa.perturb.context` is the
only code that writes weights.

Arithmetic happens in at least fp32 and is rounded once to the weight dtype. Random numbers are drawn on the
generator's device (CPU by default) and then moved, so a seed gives the same perturbation on every device.

Noise definitions (``w`` = old value, ``s`` = the scale chosen by ``relative_to``):

* ``relative_to="weight"``     → ``s = |w|``: noise proportional to each weight's own magnitude
  (zeros stay zero).
* ``relative_to="tensor_std"`` → ``s = std(whole tensor)``: one absolute scale for the tensor.
* ``gauss_noise(sigma)``   → ``w + sigma · s · N(0, 1)``
* ``uniform_noise(width)`` → ``w + width · s · U(-1/2, 1/2)``: an interval of total width ``width · s``.

Build ops with :func:`make_op` (``make_op("scale", factor=2.0)``) or :func:`parse_op`
(``parse_op("gauss_noise:sigma=0.1,relative_to=tensor_std")``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from esa.core.errors import EsaError
from esa.perturb.bits import flip_bit, layout, mask_of, parse_bit, xor_bits
from esa.core.registry import Registry, suggest

RELATIVE_TO = ("weight", "tensor_std")


class Op(Protocol):
    """What :func:`esa.perturb.context.perturbed` needs from an op."""

    name: ClassVar[str]
    needs_tensor_std: bool

    def __call__(self, old: torch.Tensor, generator: torch.Generator,
                 tensor_std: float | None = None) -> torch.Tensor: ...


OPS: Registry[type] = Registry("perturbation op")


def register_op(cls: type) -> type:
    """Class decorator: add a frozen-dataclass op to :data:`OPS` under its ``name``."""
    return OPS.register(cls.name, cls)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _draw(kind: str, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n,) fp32 standard normal or U[0, 1) numbers from ``generator``, moved to ``device``."""
    fn = torch.randn if kind == "normal" else torch.rand
    return fn(n, generator=generator, device=generator.device, dtype=torch.float32).to(device)


class _Base:
    """Shared helpers: parameters as a dict, and the default ``needs_tensor_std``."""

    name: ClassVar[str]

    @property
    def needs_tensor_std(self) -> bool:
        return getattr(self, "relative_to", None) == "tensor_std"

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> dict[str, Any]:
        """JSON-safe description stored with results: ``{"op": name, **params}``."""
        return {"op": self.name, **self.params()}


@register_op
@dataclass(frozen=True)
class Zero(_Base):
    """Set every touched element to +0.0 (the super-weight ablation of Yu et al. 2024)."""

    name: ClassVar[str] = "zero"

    def __call__(self, old, generator, tensor_std=None):
        return torch.zeros_like(old)


@register_op
@dataclass(frozen=True)
class SignFlip(_Base):
    """Negate every touched element (``w → -w``; ``+0.0 → -0.0``)."""

    name: ClassVar[str] = "sign_flip"

    def __call__(self, old, generator, tensor_std=None):
        return torch.neg(old)


@register_op
@dataclass(frozen=True)
class Scale(_Base):
    """Multiply by ``factor`` (computed in fp32 or wider, rounded once to the weight dtype)."""

    factor: float
    name: ClassVar[str] = "scale"

    def __call__(self, old, generator, tensor_std=None):
        return (old.to(_compute_dtype(old.dtype)) * self.factor).to(old.dtype)


@register_op
@dataclass(frozen=True)
class SetValue(_Base):
    """Set every touched element to ``value`` (rounded to the weight dtype; may be inf or nan)."""

    value: float
    name: ClassVar[str] = "set"

    def __call__(self, old, generator, tensor_std=None):
        return torch.full_like(old, self.value)


def _noise_scale(op, old: torch.Tensor, tensor_std: float | None) -> torch.Tensor | float:
    """|w| per element (``relative_to="weight"``) or the whole tensor's std (``"tensor_std"``)."""
    if op.relative_to == "weight":
        return old.to(_compute_dtype(old.dtype)).abs()
    if tensor_std is None:
        raise EsaError(f"{op.name} with relative_to='tensor_std' needs the tensor's std; call it through "
                       "esa.perturb.perturbed or pass tensor_std=.")
    return float(tensor_std)


def _check_relative_to(op) -> None:
    if op.relative_to not in RELATIVE_TO:
        raise EsaError(suggest(op.relative_to, list(RELATIVE_TO), f"{op.name} relative_to"))


@register_op
@dataclass(frozen=True)
class GaussNoise(_Base):
    """``w + sigma · s · N(0, 1)`` with ``s = |w|`` or ``std(tensor)`` (see module docstring)."""

    sigma: float
    relative_to: str = "weight"
    name: ClassVar[str] = "gauss_noise"

    def __post_init__(self):
        _check_relative_to(self)

    def __call__(self, old, generator, tensor_std=None):
        scale = _noise_scale(self, old, tensor_std)
        noise = _draw("normal", old.numel(), generator, old.device)  # (N,)
        return (old.to(_compute_dtype(old.dtype)) + self.sigma * scale * noise).to(old.dtype)


@register_op
@dataclass(frozen=True)
class UniformNoise(_Base):
    """``w + width · s · U(-1/2, 1/2)`` with ``s = |w|`` or ``std(tensor)`` (see module docstring)."""

    width: float
    relative_to: str = "weight"
    name: ClassVar[str] = "uniform_noise"

    def __post_init__(self):
        _check_relative_to(self)

    def __call__(self, old, generator, tensor_std=None):
        scale = _noise_scale(self, old, tensor_std)
        u = _draw("uniform", old.numel(), generator, old.device) - 0.5  # (N,) in [-1/2, 1/2)
        return (old.to(_compute_dtype(old.dtype)) + self.width * scale * u).to(old.dtype)


@register_op
@dataclass(frozen=True)
class BitFlip(_Base):
    """Invert one IEEE-754 bit of every touched element (``bit``: position or name, see ``parse_bit``)."""

    bit: int | str
    name: ClassVar[str] = "bit_flip"

    def __call__(self, old, generator, tensor_std=None):
        return flip_bit(old, parse_bit(old.dtype, self.bit))


def _bit_positions(spec, dtype: torch.dtype) -> list[int]:
    """Positions for ``random_bit_flip``: None/"all", a field name, or a list of positions/names."""
    lay = layout(dtype)
    fields = {"all": range(lay.width), "sign": (lay.sign,), "exponent": lay.exponent,
              "mantissa": lay.mantissa}
    if spec is None:
        return list(fields["all"])
    if isinstance(spec, str) and spec in fields:
        return list(fields[spec])
    items = [spec] if isinstance(spec, (int, str)) else list(spec)
    return sorted({parse_bit(dtype, b) for b in items})


@register_op
@dataclass(frozen=True)
class RandomBitFlip(_Base):
    """Flip each of ``bits`` of each touched element independently with probability ``prob``.

    ``bits`` is ``None``/``"all"`` (every bit), ``"sign"``, ``"exponent"``, ``"mantissa"`` or a list of
    positions/names. ``seed``, when set, is the seed :func:`~esa.perturb.context.perturbed` uses for its
    generator (it must agree with a ``seed=`` passed there); called directly, the op uses the generator given.
    """

    prob: float
    bits: Any = None
    seed: int | None = None
    name: ClassVar[str] = "random_bit_flip"

    def __post_init__(self):
        if not 0.0 <= self.prob <= 1.0:
            raise EsaError(f"random_bit_flip prob must be in [0, 1], got {self.prob!r}.")

    def __call__(self, old, generator, tensor_std=None):
        positions = _bit_positions(self.bits, old.dtype)
        masks = mask_of(positions, old.dtype).to(old.device)  # (nbits,)
        hits = _draw("uniform", old.numel() * len(positions), generator, old.device) < self.prob
        hits = hits.view(old.numel(), len(positions))  # (N, nbits)
        # distinct single-bit masks never carry, so their sum is their OR
        combined = (hits.to(torch.int64) * masks.to(torch.int64)).sum(dim=1).to(masks.dtype)  # (N,)
        return xor_bits(old, combined)

    def describe(self) -> dict[str, Any]:
        bits = self.bits if self.bits is None or isinstance(self.bits, (int, str)) else list(self.bits)
        return {"op": self.name, "prob": self.prob, "bits": bits, "seed": self.seed}


def make_op(name: str, **params: Any) -> Op:
    """Build a registered op by name; unknown names or parameters raise EsaError listing the valid ones."""
    cls = OPS.get(name)
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in params:
        if key not in fields:
            raise EsaError(suggest(key, fields, f"parameter of op {name!r}"))
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in params and f.default is dataclasses.MISSING]
    if missing:
        raise EsaError(f"op {name!r} needs {', '.join(missing)}, e.g. {name}:{missing[0]}=…")
    return cls(**params)


def _literal(text: str) -> Any:
    """int, float, None, a ``[a,b]`` list, or the string itself."""
    text = text.strip()
    if text.lower() in ("none", "null"):
        return None
    if text.startswith("[") and text.endswith("]"):
        return [_literal(t) for t in text[1:-1].split(",") if t.strip()]
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_op(spec: str) -> Op:
    """Build an op from ``name`` or ``name:key=value,key=value``.

    Examples: ``zero``, ``scale:factor=-1``, ``gauss_noise:sigma=0.05,relative_to=tensor_std``,
    ``bit_flip:bit=exponent_msb``, ``random_bit_flip:prob=1e-3,bits=[23,30],seed=7``.
    """
    name, _, rest = spec.strip().partition(":")
    params: dict[str, Any] = {}
    for item in re.split(r",(?![^\[]*\])", rest) if rest.strip() else []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise EsaError(f"cannot read op parameter {item!r} in {spec!r}: write key=value, "
                           "e.g. scale:factor=2.")
        params[key.strip()] = _literal(value)
    return make_op(name.strip(), **params)
