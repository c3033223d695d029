"""Perturbation ops: registry, parsing, definitions, purity and seeding."""

import math

import pytest
import torch

from esa.core.errors import EsaError
from esa.perturb import OPS, make_op, parse_op, perturbed
from esa.perturb.ops import GaussNoise, RandomBitFlip, Scale

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_registry_names():
    assert set(OPS.names()) == {"zero", "sign_flip", "scale", "gauss_noise", "uniform_noise", "set",
                                "bit_flip", "random_bit_flip"}


def test_unknown_op_suggests():
    with pytest.raises(EsaError, match="Did you mean 'gauss_noise'"):
        make_op("gaus_noise", sigma=0.1)
    with pytest.raises(EsaError, match="'sigma'"):
        make_op("gauss_noise", sigm=0.1)
    with pytest.raises(EsaError, match="needs factor"):
        make_op("scale")
    with pytest.raises(EsaError, match="Did you mean 'tensor_std'"):
        make_op("uniform_noise", width=0.1, relative_to="tensor_sd")
    with pytest.raises(EsaError, match="prob"):
        make_op("random_bit_flip", prob=1.5)


def test_parse_op():
    assert parse_op("zero").describe() == {"op": "zero"}
    assert parse_op("scale:factor=-2") == Scale(-2)
    assert parse_op(" gauss_noise:sigma=0.05, relative_to=tensor_std") == GaussNoise(0.05, "tensor_std")
    op = parse_op("random_bit_flip:prob=1e-3,bits=[23,30],seed=7")
    assert op == RandomBitFlip(1e-3, [23, 30], 7)
    assert op.describe() == {"op": "random_bit_flip", "prob": 1e-3, "bits": [23, 30], "seed": 7}
    assert parse_op("bit_flip:bit=exponent_msb").bit == "exponent_msb"
    assert parse_op("set:value=nan").value != parse_op("set:value=nan").value  # nan
    with pytest.raises(EsaError, match="key=value"):
        parse_op("scale:2")


@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_ops(dtype):
    old = torch.tensor([1.5, -2.0, 0.0, 3.0], dtype=dtype)
    keep = old.clone()
    assert torch.equal(make_op("zero")(old, _gen()), torch.zeros(4, dtype=dtype))
    assert torch.equal(make_op("sign_flip")(old, _gen()), torch.tensor([-1.5, 2.0, -0.0, -3.0], dtype=dtype))
    doubled = make_op("scale", factor=2.0)(old, _gen())
    assert torch.equal(doubled, torch.tensor([3.0, -4.0, 0.0, 6.0], dtype=dtype))
    assert torch.equal(make_op("set", value=7.0)(old, _gen()), torch.full((4,), 7.0, dtype=dtype))
    assert torch.equal(make_op("bit_flip", bit="sign")(old, _gen()), make_op("sign_flip")(old, _gen()))
    for name in OPS.names():
        cls = OPS.get(name)
        args = {"scale": {"factor": 3.0}, "set": {"value": 1.0}, "gauss_noise": {"sigma": 0.5},
                "uniform_noise": {"width": 0.5}, "bit_flip": {"bit": 3}, "random_bit_flip": {"prob": 0.5}}
        out = cls(**args.get(name, {}))(old, _gen(), tensor_std=1.0)
        assert out.dtype == dtype and out.shape == old.shape, name
    assert torch.equal(old, keep)  # ops are pure


def test_sign_flip_of_zero_is_negative_zero():
    out = make_op("sign_flip")(torch.tensor([0.0]), _gen())
    assert math.copysign(1.0, out.item()) == -1.0


def test_gauss_noise_relative_to_weight():
    old = torch.linspace(-3, 3, 20001)
    old[10000] = 0.0
    new = make_op("gauss_noise", sigma=0.1)(old, _gen(1))
    assert new[10000] == 0.0  # zero weights stay zero under weight-relative noise
    nz = old != 0
    z = (new[nz] - old[nz]) / old[nz].abs()  # should be 0.1 · N(0, 1)
    assert abs(float(z.std()) - 0.1) < 0.005 and abs(float(z.mean())) < 0.005


def test_gauss_noise_relative_to_tensor_std():
    old = torch.zeros(20000)
    op = make_op("gauss_noise", sigma=0.5, relative_to="tensor_std")
    assert op.needs_tensor_std
    new = op(old, _gen(2), tensor_std=2.0)
    assert abs(float(new.std()) - 1.0) < 0.03  # 0.5 · 2.0
    with pytest.raises(EsaError, match="tensor_std"):
        op(old, _gen(2))


def test_uniform_noise_bounds():
    old = torch.full((20000,), -4.0)
    new = make_op("uniform_noise", width=0.5)(old, _gen(3))
    delta = new - old  # U(-1/2, 1/2) · 0.5 · |w| = U(-1, 1)
    assert float(delta.min()) >= -1.0 and float(delta.max()) <= 1.0
    assert float(delta.min()) < -0.99 and float(delta.max()) > 0.99
    op = make_op("uniform_noise", width=2.0, relative_to="tensor_std")
    new = op(torch.zeros(20000), _gen(3), tensor_std=3.0)
    assert -3.0 <= float(new.min()) < -2.99 and 2.99 < float(new.max()) <= 3.0


@pytest.mark.parametrize("name,params", [("gauss_noise", {"sigma": 0.3}), ("uniform_noise", {"width": 0.3}),
                                         ("random_bit_flip", {"prob": 0.2})])
def test_random_ops_are_seeded(name, params):
    old = torch.randn(1000, generator=_gen(9))
    op = make_op(name, **params)

    def run(seed):  # bit patterns, since random bit flips can make NaNs
        return op(old, _gen(seed)).view(torch.int32)

    assert torch.equal(run(4), run(4))
    assert not torch.equal(run(4), run(5))


def test_bf16_noise_rounds_once():
    old = torch.tensor([1.0, 2.0, -3.0], dtype=torch.bfloat16)
    new = make_op("gauss_noise", sigma=0.01)(old, _gen(0))
    ref_noise = torch.randn(3, generator=_gen(0))
    want = (old.float() + 0.01 * old.float().abs() * ref_noise).to(torch.bfloat16)
    assert torch.equal(new, want)


def test_tensor_std_passed_by_context():
    lin = torch.nn.Linear(30, 20)
    op = make_op("gauss_noise", sigma=0.0, relative_to="tensor_std")
    with perturbed(lin, {"weight": torch.tensor([0, 5])}, op) as rec:
        pass
    assert rec.tensors["weight"].tensor_std == pytest.approx(float(lin.weight.detach().std()), rel=1e-6)
    with perturbed(lin, {"weight": torch.tensor([0, 5])}, make_op("zero")) as rec:
        pass
    assert rec.tensors["weight"].tensor_std is None
