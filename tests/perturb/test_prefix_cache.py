"""Prefix-cached scores must equal a full forward, with and without a weight perturbation after the prefix."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from esa.data.corpora import load_corpus
from esa.data.windows import Window, make_windows
from esa.core.errors import EsaError
from esa.evals.logprobs import score_states
from esa.evals.perplexity import collate, evaluate_windows, score_batch
from esa.perturb.context import perturbed
from esa.perturb.ops import make_op
from esa.perturb.prefix_cache import PrefixCache, start_layer
from esa.perturb.targets import TargetSet
from esa.models.tiny import TINY_CONFIGS, random_model

RTOL = 1e-5
LAYER_KEY = {"llama": "num_hidden_layers", "gpt_neox": "num_hidden_layers", "gpt2": "n_layer"}
MLP_OUT = {"llama": "model.layers.{}.mlp.down_proj.weight",
           "gpt_neox": "gpt_neox.layers.{}.mlp.dense_4h_to_h.weight",
           "gpt2": "transformer.h.{}.mlp.c_proj.weight"}
Q_PROJ = {"llama": "model.layers.{}.self_attn.q_proj.weight",
          "gpt_neox": "gpt_neox.layers.{}.attention.query_key_value.weight",
          "gpt2": "transformer.h.{}.attn.c_attn.weight"}


def nudge(model, name: str, flat_index: int, value: float):
    """Set one stored weight element through ``perturbed`` (ESA's only weight writer; bit-exact restore)."""
    return perturbed(model, TargetSet({name: torch.tensor([flat_index])}), make_op("set", value=value))


@pytest.fixture(scope="module")
def windows(tokenizer):
    """Four 64-token chunks, the last one cut to 40 tokens so a batch needs right-padding and a padding mask."""
    ws = make_windows(tokenizer, load_corpus("python-docs").documents, method="chunks", ctx=64).windows[:4]
    last = ws[3]
    return (*ws[:3], Window(last.input_ids[:40], last.scored[:40], last.doc, last.start))


def deep_model(family: str, n_layers: int = 4):
    return random_model({**TINY_CONFIGS[family], LAYER_KEY[family]: n_layers}, seed=1)


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=0.0)


def reference(model, windows, pad_id: int) -> np.ndarray:
    """Per-window NLL from the plain evaluator (independent code path, one window per batch)."""
    return evaluate_windows(model, windows, pad_id, token_budget=64).nll


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2"])
def test_tiny_families_match_full_forward(family, windows):
    model = deep_model(family)
    cache = PrefixCache(model, windows, pad_id=0, layers=[1, 2, 3, 4])
    assert cache.supported, cache.reason
    base = reference(model, windows, 0)
    assert_close(cache.baseline.nll, base)
    for layer in (1, 2, 3, 4):
        scores = cache.score_from(layer)
        assert not scores.full_forward and scores.start_layer == layer
        assert_close(scores.nll, base)
    name, param = MLP_OUT[family].format(2), dict(model.named_parameters())[MLP_OUT[family].format(2)]
    saved = param.detach().clone()
    with nudge(model, name, 7, 40.0):
        want = reference(model, windows, 0)
        assert np.max(np.abs(want / base - 1)) > 1e-3  # the perturbation matters, so ignoring it would fail
        for layer in (1, 2):  # caches taken at or before the perturbed layer
            assert_close(cache.score_from(layer).nll, want)
        assert_close(cache.score_params([name]).nll, want)
        assert not np.allclose(cache.score_from(3).nll, want, rtol=RTOL)  # after it: stale by construction
    assert torch.equal(param, saved)


def test_attention_perturbation_tiny_llama(windows):
    model = deep_model("llama")
    cache = PrefixCache(model, windows, pad_id=0, layers=[3])
    name = Q_PROJ["llama"].format(3)
    with nudge(model, name, 5, 25.0):
        want = reference(model, windows, 0)
        got = cache.score_params([name])
    assert got.start_layer == 3
    assert np.max(np.abs(want / cache.baseline.nll - 1)) > 1e-4
    assert_close(got.nll, want)


@pytest.mark.model
def test_embedded_smollm2_middle_layer(tokenizer, windows):
    from esa.models import ModelSpec, load_model

    model = load_model(ModelSpec(device="cpu")).model
    pad = tokenizer.pad_token_id or 0
    cache = PrefixCache(model, windows, pad_id=pad, layers=[15, 30], token_budget=256)
    assert cache.supported, cache.reason
    assert len(cache.batches) == 1 and cache.nbytes == 2 * 4 * 63 * 576 * 4  # 2 layers × (W, T-1, D) fp32
    base = reference(model, windows, pad)
    assert_close(cache.baseline.nll, base)
    assert_close(cache.score_from(15).nll, base)
    name = "model.layers.15.mlp.down_proj.weight"
    with nudge(model, name, 123, 60.0):
        want = reference(model, windows, pad)
        got = cache.score_params([name])
    assert got.start_layer == 15 and not got.full_forward
    assert np.max(np.abs(want / base - 1)) > 1e-3
    assert_close(got.nll, want)
    np.testing.assert_array_equal(got.n_scored, cache.baseline.n_scored)


def test_final_norm_starts_after_last_layer(windows):
    model = deep_model("gpt_neox")  # untied head: lm_head is its own weight
    cache = PrefixCache(model, windows, pad_id=0, layers=[2, 4])
    for name in ("gpt_neox.final_layer_norm.weight", "lm_head.weight"):
        with nudge(model, name, 3, 9.0):
            want = reference(model, windows, 0)
            got = cache.score_params([name])
        assert got.start_layer == 4
        assert_close(got.nll, want)


def test_start_layer_mapping():
    llama, neox = deep_model("llama"), deep_model("gpt_neox")
    assert start_layer(llama, ["model.layers.3.mlp.up_proj.weight", "model.layers.1.self_attn.o_proj.weight"]) == 1
    assert start_layer(llama, ["model.norm.weight"]) == 4
    assert start_layer(llama, ["model.embed_tokens.weight"]) == 0
    assert start_layer(neox, ["lm_head.weight"]) == 4  # untied head
    assert start_layer(neox, ["gpt_neox.embed_in.weight", "gpt_neox.layers.2.mlp.dense_4h_to_h.weight"]) == 0
    with pytest.raises(EsaError, match="did you mean|named_parameters"):
        start_layer(llama, ["model.layers.1.mlp.down_prj.weight"])


def test_embedding_and_layer0_fall_back_to_full_forward(windows):
    model = deep_model("gpt2")
    cache = PrefixCache(model, windows, pad_id=0, layers=[0, 2])
    assert cache.layers == (2,)
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.mlp.c_fc.weight"):
        with nudge(model, name, 11, 30.0):
            want = reference(model, windows, 0)
            got = cache.score_params([name])
        assert got.full_forward and got.start_layer == 0
        assert np.max(np.abs(want / cache.baseline.nll - 1)) > 1e-4
        assert_close(got.nll, want)


def test_bad_layers_raise(windows):
    model = deep_model("llama")
    with pytest.raises(EsaError, match="out of range"):
        PrefixCache(model, windows, pad_id=0, layers=[5])
    cache = PrefixCache(model, windows, pad_id=0, layers=[2])
    with pytest.raises(EsaError, match="not cached"):
        cache.score_from(3)


def test_unknown_family_falls_back_with_warning(windows, caplog):
    opt = {"model_type": "opt", "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "word_embed_proj_dim": 64, "max_position_embeddings": 512}
    model = random_model(opt)  # a family esa.models.architectures does not map
    with caplog.at_level(logging.WARNING, logger="esa.perturb.prefix_cache"):
        cache = PrefixCache(model, windows, pad_id=1, layers=[1])
    assert not cache.supported and "opt" in cache.reason
    assert "full forward" in caplog.text
    got = cache.score_from(1)
    assert got.full_forward and got.reason == cache.reason
    assert_close(got.nll, reference(model, windows, 1))


def test_score_states_matches_score_batch(windows):
    model = deep_model("llama", n_layers=2)
    ids, attn, scored = collate(list(windows), pad_id=0)
    with torch.inference_mode():
        states = model.base_model(input_ids=ids[:, :-1], attention_mask=attn[:, :-1]).last_hidden_state
        got = score_states(states, model.get_output_embeddings(), ids[:, 1:], scored[:, 1:], chunk=16)
    want = score_batch(model, ids, attn, scored)
    torch.testing.assert_close(got[0], want[0], rtol=RTOL, atol=0.0)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
