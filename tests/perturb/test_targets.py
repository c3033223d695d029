"""Target sets: coordinate parsing, files, rankings, size-matched random controls and globs."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from esa.core.errors import EsaError
from esa.perturb import targets as T

DOWN = "model.layers.1.mlp.down_proj.weight"  # (64, 128) in the tiny Llama


def test_parse_coordinate():
    assert T.parse_coordinate(f"{DOWN}[12, 34]") == (DOWN, (12, 34))
    assert T.parse_coordinate("model.norm.weight[7]") == ("model.norm.weight", (7,))
    for bad in (DOWN, f"{DOWN}[]", f"{DOWN}[1,a]", f"{DOWN}[-1,2]", f"{DOWN}[1,2", "[1,2]", f"{DOWN}[1.5,2]"):
        with pytest.raises(EsaError, match="cannot read coordinate"):
            T.parse_coordinate(bad)


def test_from_coordinates_flat_index(llama):
    ts = T.from_coordinates(llama, [f"{DOWN}[3,5]", (DOWN, 0, 127), f"{DOWN}[3,5]", "model.norm.weight[9]",
                                    {"param": DOWN, "row": 63, "col": 0}])
    assert list(ts) == [DOWN, "model.norm.weight"]
    assert ts[DOWN].tolist() == [127, 3 * 128 + 5, 63 * 128]  # unique, sorted
    assert ts["model.norm.weight"].tolist() == [9]
    assert ts.n_elements == 4
    frame = ts.to_frame(llama)
    assert frame[frame.param == DOWN][["row", "col"]].values.tolist() == [[0, 127], [3, 5], [63, 0]]


def test_coordinate_errors(llama):
    with pytest.raises(EsaError, match=r"Similar: model\.layers\.1\.mlp\.down_proj\.weight"):
        T.from_coordinates(llama, ["model.layers.1.mlp.down_prj.weight[1,2]"])
    with pytest.raises(EsaError, match="out of range"):
        T.from_coordinates(llama, [f"{DOWN}[64,0]"])
    with pytest.raises(EsaError, match="out of range"):
        T.from_coordinates(llama, [f"{DOWN}[0,128]"])
    with pytest.raises(EsaError, match="give 2 indices"):
        T.from_coordinates(llama, [f"{DOWN}[5]"])
    with pytest.raises(EsaError, match="mix"):
        T.from_coordinates(llama, [f"{DOWN}[5]", f"{DOWN}[5,1]"])


def test_tied_alias_resolves_to_canonical(tied_llama):
    ts = T.from_coordinates(tied_llama, ["lm_head.weight[2,3]", "model.embed_tokens.weight[2,3]"])
    assert list(ts) == ["model.embed_tokens.weight"] and ts.n_elements == 1


def test_from_file_json_and_csv(llama, tmp_path):
    js = tmp_path / "c.json"
    js.write_text(json.dumps([f"{DOWN}[1,2]", {"param": "model.norm.weight", "row": 4}]))
    csv = tmp_path / "c.csv"
    pd.DataFrame({"param": [DOWN, DOWN], "row": [1, 2], "col": [2, 3]}).to_csv(csv, index=False)
    a, b = T.from_file(llama, js), T.parse_targets(llama, str(csv))
    assert a[DOWN].tolist() == [130] and a["model.norm.weight"].tolist() == [4]
    assert b[DOWN].tolist() == [130, 259]
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"name": [DOWN], "row": [1]}).to_csv(bad, index=False)
    with pytest.raises(EsaError, match="param"):
        T.from_file(llama, bad)
    with pytest.raises(EsaError, match="does not exist"):
        T.from_file(llama, tmp_path / "missing.json")


def _ranking():
    return pd.DataFrame({"param": [DOWN, DOWN, "model.norm.weight", DOWN, DOWN],
                         "row": [0, 1, 5, 2, 3], "col": [0, 1, 0, 2, 3],
                         "score": [0.5, 3.0, 2.0, np.nan, -1.0]})


def test_from_ranking_top_and_bottom(llama):
    top = T.from_ranking(llama, _ranking(), k=2)
    assert top[DOWN].tolist() == [1 * 128 + 1] and top["model.norm.weight"].tolist() == [5]
    bottom = T.from_ranking(llama, _ranking(), k=2, bottom=True)
    assert list(bottom) == [DOWN] and bottom[DOWN].tolist() == [0, 3 * 128 + 3]
    everything = T.from_ranking(llama, _ranking(), k=5)  # NaN score taken only when k needs it
    assert everything.n_elements == 5
    with pytest.raises(EsaError, match="k=6"):
        T.from_ranking(llama, _ranking(), k=6)
    with pytest.raises(EsaError, match="score"):
        T.from_ranking(llama, _ranking().drop(columns="score"), k=1)


def test_random_k_size_matched_disjoint_seeded(llama):
    like = T.from_coordinates(llama, [f"{DOWN}[{r},{c}]" for r in range(5) for c in range(0, 128, 9)]
                              + ["model.norm.weight[1]", "model.norm.weight[2]"])
    a = T.random_k(llama, like, seed=0)
    assert {n: len(v) for n, v in a.items()} == {n: len(v) for n, v in like.items()}
    for name in like:
        assert not set(a[name].tolist()) & set(like[name].tolist())
        assert len(set(a[name].tolist())) == len(a[name])
        assert int(a[name].max()) < dict(llama.named_parameters())[name].numel()
    b, c = T.random_k(llama, like, seed=0), T.random_k(llama, like, seed=1)
    assert all(torch.equal(a[n], b[n]) for n in like)
    assert not torch.equal(a[DOWN], c[DOWN])
    # a tensor's draw does not depend on the other tensors in `like`
    alone = T.random_k(llama, {DOWN: like[DOWN]}, seed=0)
    assert torch.equal(alone[DOWN], a[DOWN])


def test_random_k_dense_and_impossible(llama):
    norm = "model.norm.weight"  # 64 elements
    drawn = T.random_k(llama, {norm: torch.arange(24)}, seed=3)  # 24 of the 40 others: dense path
    assert len(set(drawn[norm].tolist())) == 24 and int(drawn[norm].min()) >= 24
    with pytest.raises(EsaError, match="cannot draw"):
        T.random_k(llama, {norm: torch.arange(40)}, seed=3)
    half = T.random_k(llama, {norm: torch.arange(0, 64, 2)}, seed=3)
    assert sorted(half[norm].tolist()) == list(range(1, 64, 2))


def test_random_k_is_uniform(llama):
    # sparse path: over many seeds every non-excluded element of a small tensor is drawn about equally often
    norm = "model.norm.weight"
    counts = np.zeros(64)
    for seed in range(400):
        counts[T.random_k(llama, {norm: torch.tensor([0, 1])}, seed=seed)[norm].numpy()] += 1
    assert counts[:2].sum() == 0
    assert counts[2:].min() > 2 and counts[2:].max() < 35  # mean 12.9 per element


def test_globs(llama):
    rows = T.from_glob(llama, "rows:*.mlp.down_proj.weight:5")
    assert list(rows) == ["model.layers.0.mlp.down_proj.weight", DOWN]
    assert rows[DOWN].tolist() == list(range(5 * 128, 6 * 128))
    cols = T.parse_targets(llama, "cols:model.layers.0.self_attn.o_proj.weight:0-1,3")
    assert cols["model.layers.0.self_attn.o_proj.weight"].tolist() == sorted(
        [r * 64 + c for r in range(64) for c in (0, 1, 3)])
    whole = T.parse_targets(llama, "tensor:model.norm.weight")
    assert whole["model.norm.weight"].tolist() == list(range(64))
    with pytest.raises(EsaError, match="matches no parameter"):
        T.from_glob(llama, "rows:*.down_projj.weight:1")
    with pytest.raises(EsaError, match="2-D"):
        T.from_glob(llama, "rows:*norm.weight:1")
    with pytest.raises(EsaError, match="out of range"):
        T.from_glob(llama, f"rows:{DOWN}:64")
    with pytest.raises(EsaError, match="rows:<glob>"):
        T.from_glob(llama, "slab:*:1")


def test_parse_targets_coordinates(llama):
    ts = T.parse_targets(llama, f"{DOWN}[0,1]; model.norm.weight[3]")
    assert ts[DOWN].tolist() == [1] and ts["model.norm.weight"].tolist() == [3]


C_PROJ = "transformer.h.0.mlp.c_proj.weight"  # GPT-2 Conv1D, stored (in=256, out=64)


def test_conv1d_coordinates_use_out_in_convention(gpt2):
    assert tuple(dict(gpt2.named_parameters())[C_PROJ].shape) == (256, 64)
    assert C_PROJ in T.transposed_params(gpt2) and "transformer.wte.weight" not in T.transposed_params(gpt2)
    ts = T.from_coordinates(gpt2, [f"{C_PROJ}[3,10]"])  # out 3, in 10 → storage [10, 3]
    assert ts[C_PROJ].tolist() == [10 * 64 + 3]
    assert ts.to_frame(gpt2)[["row", "col"]].values.tolist() == [[3, 10]]
    assert T.from_coordinates(gpt2, [f"{C_PROJ}[63,255]"])[C_PROJ].tolist() == [255 * 64 + 63]
    with pytest.raises(EsaError, match="out of range"):
        T.from_coordinates(gpt2, [f"{C_PROJ}[64,0]"])
    table = pd.DataFrame({"param": [C_PROJ], "row": [3], "col": pd.array([10], dtype="Int64"),
                          "score": [1.0]})
    assert T.from_ranking(gpt2, table, k=1)[C_PROJ].tolist() == [10 * 64 + 3]
    rows = T.from_glob(gpt2, f"rows:{C_PROJ}:3")  # output 3 = storage column 3
    assert rows[C_PROJ].tolist() == [i * 64 + 3 for i in range(256)]
    cols = T.from_glob(gpt2, f"cols:{C_PROJ}:10")  # input 10 = storage row 10
    assert cols[C_PROJ].tolist() == list(range(10 * 64, 11 * 64))


def test_ranking_with_nullable_col_for_1d(llama):
    table = pd.DataFrame({"param": ["model.norm.weight", DOWN], "row": [7, 2],
                          "col": pd.array([None, 5], dtype="Int64"), "score": [2.0, 1.0]})
    ts = T.from_ranking(llama, table, k=2)
    assert ts["model.norm.weight"].tolist() == [7] and ts[DOWN].tolist() == [2 * 128 + 5]
    records = T.from_coordinates(llama, table.to_dict("records"))
    assert records["model.norm.weight"].tolist() == [7]
