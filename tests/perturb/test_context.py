"""``perturbed``: bit-exact restore under all ops and dtypes, exceptions, duplicates, aliases, verify."""

import copy
import math

import pytest
import torch
from torch import nn

from esa.core.errors import EsaError
from esa.perturb import OPS, PerturbationError, make_op, perturbed
from esa.perturb import context as ctx
from esa.perturb.bits import INT_VIEW

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SPECIAL = [float("nan"), -0.0, 0.0, float("inf"), float("-inf"), 1e-40, -1e-45, 65504.0, -3.0]


class Small(nn.Module):
    """A few parameters of one dtype, seeded with special values (NaN, ±0, ±inf, subnormals)."""

    def __init__(self, dtype, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Parameter(torch.randn(7, 5, generator=g).to(dtype))
        self.b = nn.Parameter(torch.randn(13, generator=g).to(dtype))
        c = torch.randn(4, 4, 3, generator=g)
        c.view(-1)[: len(SPECIAL)] = torch.tensor(SPECIAL)
        self.c = nn.Parameter(c.to(dtype))


def _ops():
    """Every registered op, in several configurations, including ones that write NaN/Inf."""
    ops = [make_op("zero"), make_op("sign_flip"), make_op("scale", factor=-3.5),
           make_op("scale", factor=1e30), make_op("set", value=float("nan")),
           make_op("set", value=float("-inf")), make_op("set", value=0.25),
           make_op("gauss_noise", sigma=0.3), make_op("gauss_noise", sigma=2.0, relative_to="tensor_std"),
           make_op("uniform_noise", width=1.0), make_op("uniform_noise", width=0.1, relative_to="tensor_std"),
           make_op("random_bit_flip", prob=0.3), make_op("random_bit_flip", prob=1.0, bits="exponent")]
    ops += [make_op("bit_flip", bit=b) for b in range(16)] + [make_op("bit_flip", bit="sign")]
    assert {op.name for op in ops} == set(OPS.names())
    return ops


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _bits(t):
    return t.view(INT_VIEW[t.dtype]) if t.dtype in INT_VIEW else t


def _run(module, targets, op, **kwargs):
    """Enter and leave ``perturbed`` with an empty body."""
    with perturbed(module, targets, op, **kwargs):
        pass


def _assert_bit_equal(module, snap):
    for name, p in module.named_parameters():
        assert torch.equal(_bits(p.detach()), _bits(snap[name])), name


def test_bit_exact_restore_property():
    """≥10,000 seeded perturb/restore cycles over all ops x fp32/fp16/bf16, with duplicates and exceptions."""
    modules = [Small(dtype, seed) for dtype in DTYPES for seed in range(2)]
    snaps = [_snapshot(m) for m in modules]
    ops = _ops()
    rng = torch.Generator().manual_seed(2024)
    n_cycles, n_raised, n_written = 10_500, 0, 0
    for cycle in range(n_cycles):
        k = int(torch.randint(len(modules), (1,), generator=rng))
        module = modules[k]
        op = ops[int(torch.randint(len(ops), (1,), generator=rng))]
        targets = {}
        for name, p in module.named_parameters():
            if torch.rand(1, generator=rng) < 0.6:  # random subset of tensors, indices with duplicates
                targets[name] = torch.randint(p.numel(), (int(torch.randint(1, 12, (1,), generator=rng)),),
                                              generator=rng)
        raise_inside = cycle % 7 == 0
        try:
            with perturbed(module, targets, op, seed=cycle) as record:
                for name, t in record.tensors.items():  # the new values really are in the weights
                    now = dict(module.named_parameters())[name].detach().view(-1)[t.index]
                    assert torch.equal(_bits(now), _bits(t.new))
                    n_written += len(t.index)
                if raise_inside:
                    raise ValueError("body failed")
        except ValueError:
            n_raised += 1
        assert record.restored and record.verified
        _assert_bit_equal(module, snaps[k])
    assert n_raised == math.ceil(n_cycles / 7) and n_written > n_cycles


def test_restore_on_tiny_model_all_dtypes(llama):
    """Perturb/restore on a real (tiny) architecture, in every dtype, with model outputs checked."""
    ids = torch.arange(1, 17).view(1, 16)
    for dtype in DTYPES:
        model = copy.deepcopy(llama).to(dtype)  # the session fixture stays fp32
        snap = _snapshot(model)
        base = model(ids).logits
        targets = {"model.layers.0.mlp.down_proj.weight": torch.arange(0, 8192, 7),
                   "model.layers.1.input_layernorm.weight": torch.tensor([0, 0, 5]),
                   "lm_head.weight": torch.tensor([3, 99, 3_000_000])}
        for op in (make_op("gauss_noise", sigma=0.5), make_op("bit_flip", bit=14), make_op("zero")):
            with perturbed(model, targets, op):
                assert not torch.equal(model(ids).logits, base)
            _assert_bit_equal(model, snap)
            assert torch.equal(model(ids).logits, base)


def test_restore_on_keyboard_interrupt():
    module = Small(torch.float32, 0)
    snap = _snapshot(module)
    op = make_op("set", value=9.0)
    with pytest.raises(KeyboardInterrupt), perturbed(module, {"a": torch.arange(35)}, op):
        assert float(module.a.detach().min()) == 9.0
        raise KeyboardInterrupt
    _assert_bit_equal(module, snap)


def test_duplicates_and_aliases(tied_llama):
    snap = _snapshot(tied_llama)
    targets = {"lm_head.weight": torch.tensor([5, 5, 5, 70]),
               "model.embed_tokens.weight": torch.tensor([5, 6])}
    with perturbed(tied_llama, targets, make_op("gauss_noise", sigma=1.0)) as rec:
        assert list(rec.tensors) == ["model.embed_tokens.weight"]
        assert rec.tensors["model.embed_tokens.weight"].index.tolist() == [5, 6, 70]
        assert rec.n_elements == 3
    _assert_bit_equal(tied_llama, snap)


def test_validation_happens_before_any_write():
    module = Small(torch.float32, 1)
    snap = _snapshot(module)
    with pytest.raises(EsaError, match="no parameter 'bb'"):
        _run(module, {"a": torch.tensor([1]), "bb": torch.tensor([0])}, make_op("zero"))
    with pytest.raises(EsaError, match=r"0 … 12"):
        _run(module, {"b": torch.tensor([13])}, make_op("zero"))
    with pytest.raises(EsaError, match="integers"):
        _run(module, {"b": torch.tensor([1.0])}, make_op("zero"))
    _assert_bit_equal(module, snap)


def test_bad_op_output_restores_earlier_tensors():
    module = Small(torch.float32, 2)
    snap = _snapshot(module)
    calls = []

    class Bad:
        name = "bad"
        needs_tensor_std = False

        def __call__(self, old, generator, tensor_std=None):
            calls.append(1)
            return old.double() if len(calls) == 2 else old + 1

    with pytest.raises(EsaError, match=r"must return torch\.float32"):
        _run(module, {"a": torch.tensor([0]), "b": torch.tensor([0])}, Bad())
    _assert_bit_equal(module, snap)


def test_verify_detects_failed_restore(monkeypatch):
    module = Small(torch.float16, 3)
    monkeypatch.setattr(ctx, "_restore", lambda params, touched: None)
    with pytest.raises(PerturbationError, match="2 of 2 elements"):
        _run(module, {"b": torch.tensor([2, 4])}, make_op("scale", factor=2.0))


def test_record_counts_nonfinite():
    module = Small(torch.bfloat16, 4)
    with torch.no_grad():
        module.b.fill_(1.0)
    with perturbed(module, {"b": torch.tensor([0, 1, 2])}, make_op("bit_flip", bit="exponent_msb")) as rec:
        assert torch.isinf(module.b.detach()[:3]).all()
    assert rec.n_nonfinite == rec.n_nonfinite_introduced == 3
    assert rec.old_values("b").tolist() == [1.0, 1.0, 1.0]
    summary = rec.summary()
    assert summary["n_changed"] == 3 and summary["op"] == {"op": "bit_flip", "bit": "exponent_msb"}
    with perturbed(module, {"b": torch.tensor([0])}, make_op("scale", factor=1.0)) as rec:
        pass
    assert rec.summary()["n_changed"] == 0 and rec.n_nonfinite == 0


def test_seeds():
    module = Small(torch.float32, 5)
    op = make_op("gauss_noise", sigma=0.5)
    news = []
    for seed in (1, 1, 2):
        with perturbed(module, {"a": torch.arange(10)}, op, seed=seed) as rec:
            news.append(rec.new_values("a"))
    assert torch.equal(news[0], news[1]) and not torch.equal(news[0], news[2])
    seeded = make_op("random_bit_flip", prob=0.5, seed=7)
    with perturbed(module, {"a": torch.arange(10)}, seeded) as rec:
        assert rec.seed == 7
    with pytest.raises(EsaError, match="disagrees"):
        _run(module, {"a": torch.arange(10)}, seeded, seed=8)


def test_nested_and_inference_mode():
    module = Small(torch.float32, 6)
    snap = _snapshot(module)
    with torch.inference_mode(), perturbed(module, {"a": torch.arange(5)}, make_op("zero")):
        with perturbed(module, {"a": torch.arange(3, 8)}, make_op("set", value=2.0)) as inner:
            assert module.a.detach().view(-1)[:8].tolist() == [0, 0, 0, 2, 2, 2, 2, 2]
        assert inner.old_values("a")[:2].tolist() == [0.0, 0.0]
    _assert_bit_equal(module, snap)


@pytest.mark.parametrize("dtype, bit", [(torch.float32, 32), (torch.float16, 16), (torch.bfloat16, 16),
                                        (torch.bfloat16, "exponent[8]")])
def test_bit_beyond_the_dtype_is_refused_before_any_write(dtype, bit):
    """A bit position the weight's dtype does not have raises (naming the valid range) and leaves it intact."""
    module = Small(dtype, 3)
    snap = _snapshot(module)
    targets = {"a": torch.tensor([0, 4]), "b": torch.tensor([1])}
    for op in (make_op("bit_flip", bit=bit), make_op("random_bit_flip", prob=1.0, bits=[bit])):
        with pytest.raises(EsaError, match="out of range|cannot read bit"):
            _run(module, targets, op)
        _assert_bit_equal(module, snap)

# append to tests/perturb/test_context.py once the context.py guard is applied
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32])
def test_integer_or_quantised_tensor_is_refused(dtype):
    """Packed quantised storage (int8/uint8 blocks, GPTQ int32 qweight) is refused for every op, untouched."""
    module = Small(torch.float32, 4)
    module.q = nn.Parameter(torch.arange(12, dtype=dtype).reshape(3, 4), requires_grad=False)
    snap = _snapshot(module)
    for op in (make_op("zero"), make_op("scale", factor=2.0), make_op("gauss_noise", sigma=0.1),
               make_op("bit_flip", bit=3)):
        with pytest.raises(EsaError, match=f"{dtype}.*de-quantised"):
            _run(module, {"a": torch.tensor([0]), "q": torch.tensor([1, 2])}, op)
        _assert_bit_equal(module, snap)
