"""The bottom_k control: the lowest-scoring weights *of the target tensors*, matched per tensor in count.

Regression (issue 10, defect 1): bottom_k used to take the tail rows of the top table (rows 81–100 of a top-100
are among the largest weights of the model; at k = K it *was* the target set). And (defect 8) the default
controls used to include bottom_k even where no ranking is known, so the first `esa perturb` a newcomer types
failed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esa.cli import main
from esa.perturb.protocols import EvalConfig, PerturbConfig, make_bench
from esa.perturb.protocols.choose import bottom_k, resolve_controls, resolve_targets
from esa.core.files import read_json
from esa.sensitivity.ranking import score_and_rank, write_ranking
from esa.sensitivity.scorers import select_params


@pytest.fixture(scope="module")
def smol_ranking(smol, tmp_path_factory):
    """A magnitude (|W|) top-100 of the embedded SmolLM2, written with its floor table as `esa sensitivity` does."""
    params = select_params(smol.model)
    res = score_and_rank(smol.model, params, (), "magnitude", 100, tail_stats=False)
    return write_ranking(res.table, tmp_path_factory.mktemp("rank") / "ranking", smol.fingerprint.to_dict(),
                         res.floor)[0]


def test_bottom_k_is_the_lowest_percent_of_each_target_tensor(smol, smol_ranking):
    bench = make_bench(smol, EvalConfig("python-docs", context_len=64, max_eval_tokens=63 * 2))
    res = resolve_targets(bench, f"topk:{smol_ranking}:20")
    ts, how = bottom_k(bench, res, None)
    assert "floor" in how
    assert {n: int(i.numel()) for n, i in ts.items()} == {n: int(i.numel()) for n, i in res.targets.items()}
    for name, idx in ts.items():
        mag = smol.model.get_parameter(name).detach().reshape(-1).abs().double().numpy()  # (numel,)
        picked = mag[idx.numpy()]
        assert np.isin(idx.numpy(), res.targets[name].numpy()).sum() == 0
        assert (picked > 0).all()  # a zero weight would make the control a no-op
        assert (picked <= np.quantile(mag, 0.01)).all(), name  # every element in its tensor's lowest 1 %
        top = mag[res.targets[name].numpy()]
        assert picked.max() < top.min()  # nothing like the targets (the old tail of a top-100 was)


def test_bottom_k_equals_brute_force_per_tensor(smol, smol_ranking):
    """Independent reference: sort each target tensor's non-zero |W| in the test and take as many as targets."""
    bench = make_bench(smol, EvalConfig("python-docs", context_len=64, max_eval_tokens=63 * 2))
    res = resolve_targets(bench, f"topk:{smol_ranking}:40")
    ts, _ = bottom_k(bench, res, None)
    for name, idx in res.targets.items():
        mag = smol.model.get_parameter(name).detach().reshape(-1).abs().double().numpy()
        order = np.argsort(np.where(mag == 0, np.inf, mag), kind="stable")
        expected = [i for i in order if i not in set(idx.tolist())][: idx.numel()]
        assert sorted(ts[name].tolist()) == sorted(expected), name


def test_a_ranking_without_floor_is_refused_not_tail_sampled(smol, tmp_path):
    res = score_and_rank(smol.model, select_params(smol.model, ["*.layers.3.mlp.*"]), (), "magnitude", 10,
                         tail_stats=False)
    path = write_ranking(res.table, tmp_path / "old", smol.fingerprint.to_dict())[0]  # as older ESA wrote it
    bench = make_bench(smol, EvalConfig("python-docs", context_len=64, max_eval_tokens=63))
    from esa.core.errors import EsaError

    with pytest.raises(EsaError, match="no floor table"):
        bottom_k(bench, resolve_targets(bench, f"topk:{path}:5"), None)


@pytest.mark.parametrize("targets, ranking, expected", [
    ("model.layers.0.mlp.down_proj.weight[1,2]", None, ("random_k",)),
    ("model.layers.0.mlp.down_proj.weight[1,2]", "r.parquet", ("random_k", "bottom_k")),
    ("topk:r.parquet:5", None, ("random_k", "bottom_k")),
    ("superweights", None, ("random_k", "bottom_k")),
])
def test_default_controls_follow_what_is_known(targets, ranking, expected):
    assert resolve_controls(PerturbConfig(targets, ranking=ranking)) == expected


def test_first_perturbation_a_newcomer_types_runs(tiny_llama_dir, corpus, tmp_path):
    """`esa perturb --targets 'param[r,c]' --op zero` with every other flag at its default."""
    out = tmp_path / "p"
    code = main(["perturb", "--model", str(tiny_llama_dir), "--targets", "model.layers.0.mlp.down_proj.weight[1,2]",
                 "--op", "zero", "--dataset", corpus, "--context-len", "32", "--max-eval-tokens", "124",
                 "--out-dir", str(out)])
    assert code == 0
    doc = read_json(out / "perturb.json")
    assert [a["name"] for a in doc["arms"]] == ["target", "random_k"]
    assert doc["arms"][1]["tensors"] == {"model.layers.0.mlp.down_proj.weight": 1}


def test_floor_survives_the_ranking_roundtrip(smol, smol_ranking):
    from esa.sensitivity.ranking import read_floor, read_ranking

    floor, top = read_floor(smol_ranking), read_ranking(smol_ranking)
    assert floor.attrs["model"] == top.attrs["model"]
    assert floor["param"].value_counts().to_dict() == top["param"].value_counts().to_dict()
    for name, part in floor.groupby("param"):
        w = smol.model.get_parameter(name).detach()
        assert torch.equal(torch.tensor(part["weight"].to_numpy(), dtype=w.dtype),
                           w[torch.tensor(part["row"].to_numpy()), torch.tensor(part["col"].astype(int).to_numpy())])
