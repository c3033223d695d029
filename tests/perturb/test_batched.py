"""Batched single-element trials (esa.perturb.batched) equal sequential prefix-cached trials through
``perturbed``, on Llama, GPT-2 (Conv1D storage) and shared-context units, without touching a weight."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esa.core.errors import EsaError
from esa.evals.shared_context import SharedContext
from esa.models.architectures import as_out_in
from esa.perturb import TargetSet, make_op, perturbed
from esa.perturb.batched import score_edits
from esa.perturb.prefix_cache import PrefixCache
from esa.perturb.targets import transposed_params
from esa.data.windows import Window

PARAMS = {"llama": "model.layers.1.mlp.down_proj.weight", "gpt2": "transformer.h.1.mlp.c_proj.weight"}


def _windows(n: int = 3, T: int = 20) -> list[Window]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 200, (n, T), generator=gen)
    scored = torch.ones(T, dtype=torch.bool)
    scored[0] = False
    return [Window(ids[i], scored, 0, 0) for i in range(n)]


def _sequential(model, cache, name, rows, cols, deltas) -> np.ndarray:
    """One perturbed trial per edit: W[r, c] (out, in) set to W[r, c] + Δ in its storage layout."""
    out_in = as_out_in(model.get_parameter(name).detach(), model)
    flip = name in transposed_params(model)
    shape = out_in.shape
    out = []
    for r, c, d in zip(rows, cols, deltas):
        flat = c * shape[0] + r if flip else r * shape[1] + c
        value = float(out_in[r, c]) + d
        with perturbed(model, TargetSet({name: torch.tensor([flat])}), make_op("set", value=value)):
            out.append(cache.score_params([name]).nll)
    return np.stack(out)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_edits_equal_sequential_trials_and_leave_weights_alone(family, llama, gpt2):
    model = {"llama": llama, "gpt2": gpt2}[family]
    name = PARAMS[family]
    units = [*_windows(), SharedContext((5, 9, 13, 2), ((7, 8), (11,), (3, 4, 6)))]
    cache = PrefixCache(model, units, pad_id=0, layers=[1], token_budget=40)
    out_in = as_out_in(model.get_parameter(name), model)
    rng = np.random.default_rng(1)
    rows, cols = rng.integers(0, out_in.shape[0], 7), rng.integers(0, out_in.shape[1], 7)
    deltas = rng.normal(scale=3.0, size=7)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = score_edits(cache, name, rows, cols, deltas, chunk=3)  # chunks of 3: 3 + 3 + 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    want = _sequential(model, cache, name, rows, cols, deltas)
    assert got.shape == want.shape == (7, len(cache.baseline.nll))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert not np.allclose(got, cache.baseline.nll[None], rtol=1e-4)  # the edits did change the scores


def test_bad_edits_are_refused(llama):
    cache = PrefixCache(llama, _windows(), pad_id=0, layers=[1])
    name = PARAMS["llama"]
    with pytest.raises(EsaError, match="finite"):
        score_edits(cache, name, [0], [0], [float("inf")])
    with pytest.raises(EsaError, match="out of range"):
        score_edits(cache, name, [10_000], [0], [1.0])
    with pytest.raises(EsaError, match="not the weight of a Linear"):
        score_edits(cache, "model.norm.weight", [0], [0], [1.0])
    with pytest.raises(EsaError, match="no cached layer"):
        score_edits(cache, "model.layers.0.mlp.down_proj.weight", [0], [0], [1.0])
