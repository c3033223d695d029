"""Damage prediction (esa.predict.taylor): exact Δw of bit flips against struct/numpy bit views, the Taylor model
against finite differences with an exact Hessian diagonal, the diagonal estimators against loops written here,
the regime rule, and refusals."""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from esa.core.errors import EsaError
from esa.models.tiny import random_model, TINY_CONFIGS
from esa.perturb.ops import make_op
from esa.predict.taylor import REGIMES, curvature, edit_delta, predict
from esa.sensitivity.calibration import batches_from_ids
from esa.sensitivity.scorers import select_params

VALUES = [1.0, -0.15625, 3.0e-3, -7.5, 0.0, 1.5e-6, 65000.0]
NAME = "model.layers.1.mlp.down_proj.weight"


def _fp32_flip(x: float, bit: int) -> float:
    (i,) = struct.unpack("<I", struct.pack("<f", x))
    return struct.unpack("<f", struct.pack("<I", i ^ (1 << bit)))[0]


def _fp16_flip(x: float, bit: int) -> float:
    return float(np.array([x], dtype=np.float16).view(np.uint16).__xor__(np.uint16(1 << bit)).view(np.float16)[0])


def _bf16_flip(x: float, bit: int) -> float:
    """bf16 = the top half of the fp32 pattern: round x to bf16 via torch, flip in the upper 16 bits."""
    rounded = float(torch.tensor([x], dtype=torch.bfloat16).float())
    return _fp32_flip(rounded, bit + 16)


@pytest.mark.parametrize("dtype,width,flip", [(torch.float32, 32, _fp32_flip), (torch.float16, 16, _fp16_flip),
                                              (torch.bfloat16, 16, _bf16_flip)])
def test_bit_flip_delta_equals_struct_and_numpy_bit_views_for_every_bit(dtype, width, flip):
    values = torch.tensor(VALUES, dtype=dtype)
    stored = values.double().tolist()
    for bit in range(width):
        got = edit_delta(values, make_op("bit_flip", bit=bit)).tolist()
        with np.errstate(over="ignore", invalid="ignore"):
            want = [flip(x, bit) - x for x in stored]
        np.testing.assert_array_equal(np.array(got), np.array(want), err_msg=f"{dtype} bit {bit}")


def test_op_deltas_are_what_the_op_writes():
    values = torch.tensor([0.5, -2.0, 3.0])
    assert edit_delta(values, make_op("zero")).tolist() == [-0.5, 2.0, -3.0]
    assert edit_delta(values, make_op("sign_flip")).tolist() == [-1.0, 4.0, -6.0]
    assert edit_delta(values, make_op("scale", factor=3.0)).tolist() == [1.0, -4.0, 6.0]
    noise = edit_delta(values, make_op("gauss_noise", sigma=0.1), torch.Generator().manual_seed(3))
    again = make_op("gauss_noise", sigma=0.1)(values.clone(), torch.Generator().manual_seed(3))
    assert torch.equal(noise, again.double() - values.double())


@pytest.fixture(scope="module")
def f64():
    """A tiny Llama in float64 (finite differences need the precision) and its calibration batches."""
    model = random_model(TINY_CONFIGS["llama"], seed=5, dtype=torch.float64)
    ids = torch.randint(0, 200, (4, 24), generator=torch.Generator().manual_seed(0))
    return model, list(batches_from_ids(ids, 2))


def _loss(model, batches) -> float:
    with torch.no_grad():
        total, n = 0.0, 0
        for b in batches:
            logits = model(input_ids=b.ids).logits[:, :-1]
            total += float(F.cross_entropy(logits.flatten(0, 1), b.ids[:, 1:].flatten(), reduction="sum"))
            n += b.ids[:, 1:].numel()
    return total / n


def _exact_diag(model, batches, flat: list[int]) -> torch.Tensor:
    """∂²L/∂w_i² for the chosen elements by double backward on e_i (exact, no estimator)."""
    w = model.get_parameter(NAME)
    n = sum(b.ids[:, 1:].numel() for b in batches)
    with torch.enable_grad():
        loss = sum(F.cross_entropy(model(input_ids=b.ids).logits[:, :-1].flatten(0, 1), b.ids[:, 1:].flatten(),
                                   reduction="sum") for b in batches) / n
        (g,) = torch.autograd.grad(loss, w, create_graph=True)
        return torch.stack([torch.autograd.grad(g.reshape(-1)[i], w, retain_graph=True)[0].reshape(-1)[i]
                            for i in flat])


def test_second_order_prediction_matches_finite_differences_within_the_cubic_truncation(f64):
    model, batches = f64
    params = {NAME: model.get_parameter(NAME)}
    curv = curvature(model, params, batches, "grad_squared")
    flat = [3, 77, 200, 1000]
    diag = torch.zeros_like(curv.diag[NAME]).reshape(-1)
    diag[flat] = _exact_diag(model, batches, flat)
    exact = dataclasses.replace(curv, diag={NAME: diag.reshape(curv.diag[NAME].shape)})
    base, w = _loss(model, batches), model.get_parameter(NAME)
    errors = {}
    for step in (0.4, 0.2, 0.1):  # below ~0.05 the float32 rotary tables set a 1e-9 floor
        delta = torch.full((len(flat),), step, dtype=torch.float64)
        pred = predict(exact, NAME, torch.tensor(flat), delta)
        measured = []
        for i in flat:
            with torch.no_grad():
                w.view(-1)[i] += step
                measured.append(_loss(model, batches) - base)
                w.view(-1)[i] -= step
        measured = np.array(measured)
        errors[step] = (np.abs(pred.first.numpy() - measured), np.abs(pred.second.numpy() - measured))
    for (big, small) in ((0.4, 0.2), (0.2, 0.1)):
        first_ratio = errors[big][0] / errors[small][0]  # O(Δ²) error: ≈ 4 per halving (less with a big cubic)
        second_ratio = errors[big][1] / errors[small][1]  # O(Δ³) error: ≈ 8 per halving
        assert np.all((first_ratio > 2.5) & (first_ratio < 5)), first_ratio
        assert np.all((second_ratio > 6) & (second_ratio < 10)), second_ratio
    assert np.all(errors[0.1][1] < errors[0.1][0] / 5)  # the second-order term is the one that matters


def test_fisher_and_grad_squared_equal_loops_written_here(f64):
    model, batches = f64
    params = {NAME: model.get_parameter(NAME)}
    w = params[NAME]
    n_total = sum(b.n_scored for b in batches)

    def grad_of(ids) -> torch.Tensor:  # gradient of the mean NLL of these rows
        with torch.enable_grad():
            loss = model(input_ids=ids, labels=ids).loss
            return torch.autograd.grad(loss, w)[0]

    fisher = sum(grad_of(b.ids[i:i + 1]).square() * (b.ids.shape[1] - 1) for b in batches
                 for i in range(len(b.ids))) / n_total
    batch_sq = sum(grad_of(b.ids).square() * b.n_scored for b in batches) / n_total
    grad = sum(grad_of(b.ids) * b.n_scored for b in batches) / n_total
    got_f, got_b = curvature(model, params, batches, "fisher"), curvature(model, params, batches, "grad_squared")
    torch.testing.assert_close(got_f.diag[NAME], fisher, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(got_b.diag[NAME], batch_sq, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(got_b.grad[NAME], grad, rtol=1e-5, atol=1e-12)


def test_hutchinson_is_the_scorers_estimator_on_the_mean_nll(f64):
    """Convergence of the estimator itself is tested in tests/sensitivity/test_scorers.py; here: the loss it
    differentiates is the calibration mean NLL L, with the same seeded probes."""
    from esa.sensitivity.scorers import hutchinson_diagonal

    model, batches = f64
    params = {NAME: model.get_parameter(NAME)}
    n_total = sum(b.n_scored for b in batches)
    with torch.enable_grad():
        fns = [lambda b=b: model(input_ids=b.ids, labels=b.ids).loss * b.n_scored / n_total for b in batches]
        (want,) = hutchinson_diagonal(fns, [params[NAME]], 4, seed=1)
    got = curvature(model, params, batches, "hutchinson", probes=4, seed=1).diag[NAME]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-12)


def test_regimes_follow_the_stated_rule():
    model = random_model(TINY_CONFIGS["llama"], seed=5)
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    curv = curvature(model, {NAME: model.get_parameter(NAME)}, list(batches_from_ids(ids, 2)), "grad_squared")
    scale = float(curv.x_rms[NAME][5]) / curv.y_rms[NAME]  # column 5's input channel
    flat = torch.tensor([5, 5, 5])
    delta = torch.tensor([0.5 / scale, 2.0 / scale, float("inf")], dtype=torch.float64)
    pred = predict(curv, NAME, flat, delta, tau=1.0)
    assert [REGIMES[int(r)] for r in pred.regime] == ["taylor", "large", "nonfinite"]
    np.testing.assert_allclose(pred.ratio[:2].numpy(), [0.5, 2.0], rtol=1e-6)


def test_integer_tensors_non_linear_weights_and_bad_bits_are_refused():
    model = random_model(TINY_CONFIGS["llama"], seed=5)
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    batches = list(batches_from_ids(ids, 2))
    ints = {"codes": torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)}
    with pytest.raises(EsaError, match="codes is torch.int8: damage prediction needs a floating-point"):
        curvature(model, ints, batches)
    norms = select_params(model, ["*.input_layernorm.weight"], include_norms=True)
    with pytest.raises(EsaError, match="not the weight of a Linear/Conv1D layer"):
        curvature(model, norms, batches)
    with pytest.raises(EsaError, match="bit 32"):
        edit_delta(torch.ones(2), make_op("bit_flip", bit=32))
    with pytest.raises(EsaError, match="bit 16"):
        edit_delta(torch.ones(2, dtype=torch.bfloat16), make_op("bit_flip", bit=16))
    with pytest.raises(EsaError, match="estimator 'fishr'"):
        curvature(model, {NAME: model.get_parameter(NAME)}, batches, "fishr")
