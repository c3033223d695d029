"""IEEE-754 bit flips checked against independent bit views (struct, numpy)."""

import struct

import numpy as np
import pytest
import torch

from esa.core.errors import EsaError
from esa.perturb import bits
from esa.perturb.ops import make_op

RNG = np.random.default_rng(1234)
# ordinary, tiny, huge, negative, zero, -0.0, subnormal and special values
SPECIALS = [1.0, -1.0, 0.0, -0.0, 2.0, 0.5, 3.14159, -1e-3, 65504.0, 1e-7, 1e-40, float("inf"), float("-inf")]


def _fp32_values() -> np.ndarray:
    return np.concatenate([np.array(SPECIALS), RNG.standard_normal(40) * 10.0 ** RNG.integers(-8, 8, 40)]
                          ).astype(np.float32)


def _torch_bits(t: torch.Tensor) -> np.ndarray:
    """Unsigned bit patterns of a torch tensor, via the same-width integer view."""
    ints = t.view(bits.INT_VIEW[t.dtype]).numpy()
    return ints.view(np.uint32 if t.dtype == torch.float32 else np.uint16)


@pytest.mark.parametrize("bit", range(32))
def test_fp32_flip_matches_numpy_view(bit):
    values = _fp32_values()
    expected = values.view(np.uint32) ^ np.uint32(1 << bit)
    got = bits.flip_bit(torch.from_numpy(values.copy()), bit)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(_torch_bits(got), expected)


def test_fp32_flip_matches_struct():
    for value in (1.0, -2.5, 1e-30):
        raw = struct.unpack("<I", struct.pack("<f", value))[0]
        for bit in (0, 22, 23, 30, 31):
            want = struct.unpack("<f", struct.pack("<I", raw ^ (1 << bit)))[0]
            got = bits.flip_bit(torch.tensor([value]), bit).item()
            assert got == want or (np.isnan(got) and np.isnan(want)), (value, bit)


@pytest.mark.parametrize("bit", range(16))
def test_fp16_flip_matches_numpy_view(bit):
    with np.errstate(over="ignore"):  # large fp32 values become ±inf in fp16, which is part of the test
        values = _fp32_values().astype(np.float16)
    expected = values.view(np.uint16) ^ np.uint16(1 << bit)
    got = bits.flip_bit(torch.from_numpy(values.copy()), bit)
    assert got.dtype == torch.float16
    np.testing.assert_array_equal(_torch_bits(got), expected)


@pytest.mark.parametrize("bit", range(16))
def test_bf16_flip_is_top_half_of_fp32_pattern(bit):
    # bf16-representable values: fp32 patterns with the low 16 bits cleared
    u32 = _fp32_values().view(np.uint32) & np.uint32(0xFFFF0000)
    values = u32.view(np.float32)
    t = torch.from_numpy(values.copy()).to(torch.bfloat16)
    np.testing.assert_array_equal(_torch_bits(t), (u32 >> 16).astype(np.uint16))  # conversion is exact
    expected32 = u32 ^ np.uint32(1 << (bit + 16))
    got = bits.flip_bit(t, bit)
    assert got.dtype == torch.bfloat16
    np.testing.assert_array_equal(_torch_bits(got), (expected32 >> 16).astype(np.uint16))
    finite = np.isfinite(expected32.view(np.float32))
    np.testing.assert_array_equal(got.float().numpy()[finite], expected32.view(np.float32)[finite])


@pytest.mark.parametrize("dtype,bit,value,expected", [
    (torch.bfloat16, 14, 1.0, float("inf")),  # top exponent bit: 0x3F80 → 0x7F80
    (torch.bfloat16, 15, 1.0, -1.0),
    (torch.bfloat16, 7, 1.0, 0.5),  # exponent LSB: 127 → 126
    (torch.bfloat16, 6, 1.0, 1.5),  # mantissa MSB
    (torch.bfloat16, 14, 2.0, 0.0),  # 0x4000 → 0x0000
    (torch.float32, 30, 1.0, float("inf")),
    (torch.float32, 31, 1.0, -1.0),
    (torch.float32, 23, 1.0, 0.5),
    (torch.float32, 22, 1.0, 1.5),
    (torch.float32, 0, 1.0, 1.0 + 2.0 ** -23),
    (torch.float16, 14, 1.0, float("inf")),  # 0x3C00 → 0x7C00
    (torch.float16, 15, 1.0, -1.0),
    (torch.float16, 10, 1.0, 0.5),
    (torch.float16, 9, 1.0, 1.5),
    (torch.float16, 0, 1.0, 1.0 + 2.0 ** -10),
])
def test_known_flips(dtype, bit, value, expected):
    got = bits.flip_bit(torch.tensor([value], dtype=dtype), bit)
    assert got.dtype == dtype and got.item() == expected


def test_flip_twice_is_identity_and_input_untouched():
    for dtype in bits.LAYOUTS:
        x = torch.randn(100, generator=torch.Generator().manual_seed(0)).to(dtype)
        before = x.clone()
        for bit in range(bits.layout(dtype).width):
            once = bits.flip_bit(x, bit)
            assert not torch.equal(once.view(bits.INT_VIEW[dtype]), x.view(bits.INT_VIEW[dtype]))
            twice = bits.flip_bit(once, bit)
            assert torch.equal(twice.view(bits.INT_VIEW[dtype]), x.view(bits.INT_VIEW[dtype]))
        assert torch.equal(x, before)


def test_nan_producing_flip_applied_as_is():
    # fp32 1.5 has mantissa MSB set; setting the top exponent bit gives exponent all ones → NaN
    got = bits.flip_bit(torch.tensor([1.5]), 30)
    assert torch.isnan(got).all()


@pytest.mark.parametrize("dtype,width,n_mant,n_exp", [
    (torch.float32, 32, 23, 8), (torch.float16, 16, 10, 5), (torch.bfloat16, 16, 7, 8)])
def test_layouts(dtype, width, n_mant, n_exp):
    lay = bits.layout(dtype)
    assert (lay.width, len(lay.mantissa), len(lay.exponent), lay.sign) == (width, n_mant, n_exp, width - 1)
    assert sorted([*lay.mantissa, *lay.exponent, lay.sign]) == list(range(width))
    assert lay.name_of(width - 1) == "sign"
    assert lay.name_of(width - 2) == f"exponent[{n_exp - 1}]"
    assert lay.name_of(0) == "mantissa[0]"
    assert bits.parse_bit(dtype, "exponent_msb") == width - 2
    assert bits.parse_bit(dtype, "exponent_lsb") == n_mant
    assert bits.parse_bit(dtype, "mantissa_msb") == n_mant - 1
    assert bits.parse_bit(dtype, "mantissa[0]") == 0
    assert bits.parse_bit(dtype, f"exponent[{n_exp - 1}]") == width - 2
    assert bits.parse_bit(dtype, "sign") == bits.parse_bit(dtype, str(width - 1)) == width - 1


def test_bit_errors():
    with pytest.raises(EsaError, match="out of range"):
        bits.flip_bit(torch.ones(2, dtype=torch.float16), 16)
    with pytest.raises(EsaError, match="out of range"):
        bits.parse_bit(torch.float32, -1)
    with pytest.raises(EsaError, match="cannot read bit"):
        bits.parse_bit(torch.bfloat16, "exponent[8]")
    with pytest.raises(EsaError, match="cannot read bit"):
        bits.parse_bit(torch.bfloat16, "expo")
    with pytest.raises(EsaError, match="float64"):
        bits.flip_bit(torch.ones(2, dtype=torch.float64), 3)


def test_bit_string():
    assert bits.bit_string(1.0, torch.bfloat16) == "0 01111111 0000000"
    assert bits.bit_string(-2.0, torch.float16) == "1 10000 0000000000"
    assert bits.bit_string(1.0, torch.float32) == "0 01111111 " + "0" * 23


@pytest.mark.parametrize("dtype", list(bits.LAYOUTS))
def test_random_bit_flip_extremes(dtype):
    x = torch.randn(500, generator=torch.Generator().manual_seed(1)).to(dtype)
    ints = bits.INT_VIEW[dtype]
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(make_op("random_bit_flip", prob=0.0)(x, gen).view(ints), x.view(ints))
    for bit in (0, bits.layout(dtype).width - 2, bits.layout(dtype).width - 1):
        all_on = make_op("random_bit_flip", prob=1.0, bits=[bit])(x, gen)
        assert torch.equal(all_on.view(ints), bits.flip_bit(x, bit).view(ints))
    lay = bits.layout(dtype)
    expo = make_op("random_bit_flip", prob=1.0, bits="exponent")(x, gen)
    mask = int(bits.mask_of(list(lay.exponent), dtype).to(torch.int64).sum())
    want = torch.bitwise_xor(x.view(ints), torch.tensor(mask, dtype=torch.int64).to(ints))
    assert torch.equal(expo.view(ints), want)


def test_random_bit_flip_rate_and_seed():
    x = torch.zeros(20000)
    op = make_op("random_bit_flip", prob=0.01, bits="mantissa")
    a = op(x, torch.Generator().manual_seed(5))
    b = op(x, torch.Generator().manual_seed(5))
    c = op(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    flips = sum(int(((a.view(torch.int32) >> k) & 1).sum()) for k in range(32))
    expected = 20000 * 23 * 0.01  # 4600, sd ≈ 67
    assert abs(flips - expected) < 6 * 67
    assert int((a.view(torch.int32) >> 23).abs().sum()) == 0  # only mantissa bits touched
