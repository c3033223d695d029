"""The whole-model bit-vulnerability map (esa.predict.vmap) against a brute force written here: every flip of
every weight through the exact float64 prediction, materialised (possible only for a tiny model)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from esa.models.tiny import TINY_CONFIGS, random_model
from esa.perturb.bits import flip_bit, layout
from esa.predict.taylor import REGIMES, curvature, predict
from esa.predict.vmap import vulnerability_map
from esa.sensitivity.calibration import batches_from_ids
from esa.sensitivity.scorers import select_params


def _brute_force(model, curv, tau: float) -> pd.DataFrame:
    rows = []
    for name in curv.grad:
        stored = model.get_parameter(name).detach()
        flat = torch.arange(stored.numel())
        for bit in range(layout(stored.dtype).width):
            values = stored.reshape(-1)
            delta = flip_bit(values, bit).double() - values.double()
            pred = predict(curv, name, flat, delta, tau)
            rows.append(pd.DataFrame({"param": name, "flat": flat.numpy(), "bit": bit,
                                      "second": pred.second.numpy(), "ratio": pred.ratio.numpy(),
                                      "regime": np.array(REGIMES)[pred.regime.long().numpy()]}))
    return pd.concat(rows, ignore_index=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_map_summaries_and_top_k_equal_the_brute_force(dtype):
    model = random_model(TINY_CONFIGS["llama"], seed=7, dtype=dtype)
    ids = torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    curv = curvature(model, select_params(model), list(batches_from_ids(ids, 2)), "fisher")
    tau = 1.0
    vm = vulnerability_map(model, curv, k=40, tau=tau, chunk=1000)  # small blocks: many merges of the top-k
    every = _brute_force(model, curv, tau)
    counts = every.groupby(["param", "bit", "regime"]).size().unstack(fill_value=0)
    merged = vm.summary.set_index(["param", "bit"]).join(counts)
    for regime in REGIMES:
        want = merged[regime] if regime in merged else 0
        np.testing.assert_array_equal(merged[f"n_{regime}"], want, err_msg=regime)
    taylor = every[every.regime == "taylor"]
    best = taylor.groupby(["param", "bit"])["second"].agg(["max", "mean"])
    joined = vm.summary.set_index(["param", "bit"]).join(best).dropna(subset=["max"])
    np.testing.assert_allclose(joined["max_predicted"], joined["max"], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(joined["mean_predicted"], joined["mean"], rtol=1e-4, atol=1e-9)
    for regime, key in (("taylor", "second"), ("large", "ratio")):
        want = every[every.regime == regime].sort_values(key, ascending=False, kind="stable").head(10)
        got = vm.top[regime].head(10)
        assert list(zip(got.param, got.flat, got.bit)) == list(zip(want.param, want.flat, want.bit)), regime
        np.testing.assert_allclose(got[key], want[key], rtol=1e-12)
    nonfinite = vm.top["nonfinite"]
    n_nonfinite = int((every.regime == "nonfinite").sum())
    assert (nonfinite.regime == "nonfinite").all() and len(nonfinite) == min(40, n_nonfinite)
    assert vm.info["n_flips"] == len(every)


def test_heatmap_and_scatter_render():
    from esa.predict.plots import heatmap_png, scatter_png

    model = random_model(TINY_CONFIGS["llama"], seed=7)
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    curv = curvature(model, select_params(model), list(batches_from_ids(ids, 2)), "grad_squared")
    vm = vulnerability_map(model, curv, k=5)
    assert heatmap_png(vm.summary, "tiny").startswith(b"\x89PNG")
    rows = pd.concat(vm.top.values(), ignore_index=True).assign(measured=lambda d: d["second"].clip(-1, 1))
    rows.loc[rows.regime == "nonfinite", "measured"] = np.inf
    assert scatter_png(rows, "tiny").startswith(b"\x89PNG")
