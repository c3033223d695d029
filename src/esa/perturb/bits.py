"""IEEE-754 bit flips on fp32, fp16 and bf16 values, done as XOR on the integer view of the same bytes.

Bit numbering follows the hardware: bit 0 is the mantissa's least significant bit and the top bit is the sign
(31 for fp32, 15 for fp16 and bf16). Layouts, low bits first::

    fp32  mantissa 0-22  exponent 23-30  sign 31    (1 + 8 + 23)
    fp16  mantissa 0-9   exponent 10-14  sign 15    (1 + 5 + 10)
    bf16  mantissa 0-6   exponent 7-14   sign 15    (1 + 8 + 7; the top half of the fp32 pattern)

Worked example: bf16 ``1.0`` is ``0x3F80`` (sign 0, exponent ``0111 1111``, mantissa 0). Flipping bit 14, the
top exponent bit, gives ``0x7F80`` — exponent all ones, mantissa zero — which is ``+inf``; flipping bit 15
gives ``0xBF80`` = ``-1.0``. A flip that produces Inf or NaN is applied as-is: those are results, not errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esa.core.errors import EsaError

# same-width signed integer dtype used to reinterpret the bytes (torch has no uint16/uint32 XOR everywhere)
INT_VIEW: dict[torch.dtype, torch.dtype] = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


@dataclass(frozen=True)
class BitLayout:
    """Where the sign, exponent and mantissa bits of one float format sit (bit 0 = mantissa LSB)."""

    dtype: torch.dtype
    width: int  # total bits
    n_mantissa: int  # explicit fraction bits, positions 0 … n_mantissa-1
    n_exponent: int  # exponent bits, positions n_mantissa … width-2

    @property
    def sign(self) -> int:
        return self.width - 1

    @property
    def exponent(self) -> tuple[int, ...]:
        """Exponent bit positions, least significant first."""
        return tuple(range(self.n_mantissa, self.n_mantissa + self.n_exponent))

    @property
    def mantissa(self) -> tuple[int, ...]:
        """Mantissa bit positions, least significant first."""
        return tuple(range(self.n_mantissa))

    def name_of(self, bit: int) -> str:
        """Human name of a bit position, e.g. fp32 bit 30 → ``exponent[7]`` (the exponent MSB)."""
        check_bit(self.dtype, bit)
        if bit == self.sign:
            return "sign"
        if bit >= self.n_mantissa:
            return f"exponent[{bit - self.n_mantissa}]"
        return f"mantissa[{bit}]"


LAYOUTS: dict[torch.dtype, BitLayout] = {
    torch.float32: BitLayout(torch.float32, 32, 23, 8),
    torch.float16: BitLayout(torch.float16, 16, 10, 5),
    torch.bfloat16: BitLayout(torch.bfloat16, 16, 7, 8),
}


def layout(dtype: torch.dtype) -> BitLayout:
    """The :class:`BitLayout` of a float dtype; EsaError for dtypes ESA cannot flip bits of."""
    if dtype not in LAYOUTS:
        valid = ", ".join(str(d).removeprefix("torch.") for d in LAYOUTS)
        raise EsaError(f"bit flips support {valid}, not {dtype}; load the model with one of those dtypes.")
    return LAYOUTS[dtype]


def check_bit(dtype: torch.dtype, bit: int) -> int:
    """Return ``bit`` if it is a valid position for ``dtype``, else raise EsaError naming the range."""
    width = layout(dtype).width
    if not isinstance(bit, int) or isinstance(bit, bool) or not 0 <= bit < width:
        raise EsaError(f"bit {bit!r} is out of range for {dtype}: use 0 (mantissa LSB) … {width - 1} (sign).")
    return bit


def parse_bit(dtype: torch.dtype, spec: int | str) -> int:
    """A bit position from an int or a name.

    Names: ``sign``, ``exponent_msb``, ``exponent_lsb``, ``mantissa_msb``, ``mantissa_lsb``,
    ``exponent[i]`` and ``mantissa[i]`` (i counted from the field's least significant bit), or a decimal
    position such as ``"30"``.
    Example: ``parse_bit(torch.bfloat16, "exponent_msb") == 14``.
    """
    lay = layout(dtype)
    if isinstance(spec, int):
        return check_bit(dtype, spec)
    text = spec.strip().lower()
    named = {"sign": lay.sign, "exponent_msb": lay.exponent[-1], "exponent_lsb": lay.exponent[0],
             "mantissa_msb": lay.mantissa[-1], "mantissa_lsb": lay.mantissa[0]}
    if text in named:
        return named[text]
    if text.lstrip("-").isdigit():
        return check_bit(dtype, int(text))
    for field_name, positions in (("exponent", lay.exponent), ("mantissa", lay.mantissa)):
        inner = text[len(field_name) + 1:-1]
        if text.startswith(field_name + "[") and text.endswith("]") and inner.isdigit():
            i = int(inner)
            if i < len(positions):
                return positions[i]
    raise EsaError(
        f"cannot read bit {spec!r} for {dtype}: use 0 … {lay.width - 1}, one of {', '.join(named)}, "
        f"exponent[0 … {lay.n_exponent - 1}] or mantissa[0 … {lay.n_mantissa - 1}]."
    )


def _signed_mask(bit: int, width: int) -> int:
    """``1 << bit`` as a signed ``width``-bit integer (the sign bit's mask is negative)."""
    return -(1 << bit) if bit == width - 1 else 1 << bit


def int_view(values: torch.Tensor) -> torch.Tensor:
    """The same bytes reinterpreted as the same-width signed integer dtype (no copy)."""
    return values.view(INT_VIEW[layout(values.dtype).dtype])


def flip_bit(values: torch.Tensor, bit: int) -> torch.Tensor:
    """A new tensor equal to ``values`` with bit ``bit`` of every element inverted (XOR); input untouched."""
    lay = layout(values.dtype)
    check_bit(values.dtype, bit)
    flipped = torch.bitwise_xor(int_view(values), _signed_mask(bit, lay.width))
    return flipped.view(values.dtype)


def xor_bits(values: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``values`` with each element XOR-ed by its own integer mask (same shape, the dtype's INT_VIEW type)."""
    ints = int_view(values)
    if masks.dtype != ints.dtype or masks.shape != ints.shape:
        raise EsaError(f"bit masks must be {ints.dtype} of shape {tuple(ints.shape)}, got {masks.dtype} "
                       f"{tuple(masks.shape)}.")
    return torch.bitwise_xor(ints, masks).view(values.dtype)


def mask_of(bits: list[int] | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Per-bit masks (len(bits),) in the INT_VIEW dtype, for building random multi-bit masks."""
    width = layout(dtype).width
    return torch.tensor([_signed_mask(check_bit(dtype, b), width) for b in bits], dtype=INT_VIEW[dtype])


def bit_string(value: float, dtype: torch.dtype) -> str:
    """The bit pattern of one value as ``sign exponent mantissa``, e.g. bf16 1.0 → ``0 01111111 0000000``."""
    lay = layout(dtype)
    raw = int(int_view(torch.tensor([value], dtype=dtype)).item()) & ((1 << lay.width) - 1)
    text = format(raw, f"0{lay.width}b")
    return f"{text[0]} {text[1:1 + lay.n_exponent]} {text[1 + lay.n_exponent:]}"
