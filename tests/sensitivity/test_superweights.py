"""Super-weight detection: planted spikes on tiny models (Llama, GPT-NeoX, GPT-2 Conv1D), bit-exact restore
after iterative search, thresholds, the report's dict round trip and the plot. (The command's tests and the
acceptance check on the real SmolLM2-135M are in tests/commands/test_superweights_command.py.)"""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from esa.models.architectures import as_out_in, mlp_out_modules
from esa.core.errors import EsaError
from esa.sensitivity import superweights as sw
from esa.sensitivity.superweight_plots import plot_activation_profile
from esa.sensitivity.superweights import Thresholds, find_super_weights
from esa.models.tiny import TINY_CONFIGS, VOCAB, random_model

LAYERS = 6  # enough layers for "median across layers" to mean something


def _tiny(family: str, seed: int = 0) -> torch.nn.Module:
    key = "n_layer" if family == "gpt2" else "num_hidden_layers"
    return random_model({**TINY_CONFIGS[family], key: LAYERS}, seed)


def _ids(seed: int = 0, B: int = 2, T: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))  # (B, T)


def _input_max(model, ids, layer: int) -> torch.Tensor:
    """Max |x| per input channel (Din,) of one layer's MLP output projection, by a plain hook."""
    seen = {}

    def hook(module, args, output):  # returns None: the output is left alone
        seen["x"] = args[0].abs().amax((0, 1))  # (Din,)

    _, mod = mlp_out_modules(model)[layer]
    handle = mod.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    return seen["x"]


def _plant(model, ids, layer: int, row: int, col: int, output: float) -> float:
    """Set W[row, col] (out, in) so that its product reaches about ``output`` at the input's peak token."""
    value = output / float(_input_max(model, ids, layer)[col])
    _, mod = mlp_out_modules(model)[layer]
    with torch.no_grad():
        as_out_in(mod.weight, model)[row, col] = value
    return as_out_in(mod.weight, model)[row, col].item()


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _unchanged(model, snap) -> bool:
    return all(torch.equal(p, snap[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gpt2"])
def test_planted_spike_found_at_its_out_in_coordinates(family):
    model, ids = _tiny(family), _ids()
    layer, row, col = 2, 5, 77  # col ≥ D = 64: a transposition mistake on GPT-2 could not even index it
    value = _plant(model, ids, layer, row, col, output=1e4)
    report = find_super_weights(model, ids)
    assert [(w.layer, w.row, w.col) for w in report.candidates] == [(layer, row, col)]
    w = report.candidates[0]
    module = mlp_out_modules(model)[layer][0]
    assert w.param_name == module + ".weight"
    assert w.storage_index == ((col, row) if family == "gpt2" else (row, col))
    assert model.get_parameter(w.param_name)[w.storage_index].item() == value == w.weight
    assert w.share > 0.9 and w.output_ratio > Thresholds().spike_ratio
    assert not w.input_spike  # only the weight was planted, not a massive input
    assert w.token_id == int(ids[w.batch, w.position])
    massive = {(m.layer, m.channel) for m in report.massive_activations}
    assert (layer, row) in massive  # the spike lands in the residual stream after that layer
    assert all(m.layer >= layer for m in report.massive_activations)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_unplanted_random_model_has_no_candidates(family):
    report = find_super_weights(_tiny(family, seed=1), _ids(1))
    assert report.candidates == () and report.massive_activations == ()
    assert len(report.rounds) == 1 and len(report.rounds[0].layers) == LAYERS


def test_iterate_uncovers_a_second_weight_and_restores_bit_exactly():
    model, ids = _tiny("llama"), _ids()
    layer, row = 1, 9
    big = _plant(model, ids, layer, row, 40, output=2e4)
    small = _plant(model, ids, layer, row, 100, output=3e3)  # masked by the first until it is zeroed
    snap = _snapshot(model)
    once = find_super_weights(model, ids)
    assert [(w.row, w.col) for w in once.candidates] == [(row, 40)]
    report = find_super_weights(model, ids, iterate=True, max_iterations=4)
    assert [(w.layer, w.row, w.col, w.iteration) for w in report.candidates] == [
        (layer, row, 40, 0), (layer, row, 100, 1)]
    assert report.rounds[1].zeroed == ((layer, row, 40),)
    assert len(report.rounds) == 3 and report.rounds[2].zeroed == ((layer, row, 40), (layer, row, 100))
    assert _unchanged(model, snap)
    w_oi = as_out_in(mlp_out_modules(model)[layer][1].weight, model)
    assert w_oi[row, 40].item() == big and w_oi[row, 100].item() == small


def test_weights_restored_when_a_later_round_fails(monkeypatch):
    model, ids = _tiny("gpt2"), _ids()
    _plant(model, ids, 3, 7, 200, output=1e4)
    snap = _snapshot(model)
    real, calls = sw._search_round, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first round has already zeroed its find
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(sw, "_search_round", failing)
    with pytest.raises(RuntimeError, match="boom"):
        find_super_weights(model, ids, iterate=True)
    assert len(calls) == 2 and _unchanged(model, snap)


def test_thresholds_are_recorded_and_change_the_outcome():
    model, ids = _tiny("llama"), _ids()
    _plant(model, ids, 2, 5, 77, output=1e4)
    strict = Thresholds(spike_ratio=20.0, spike_floor=50.0, require_input_spike=True, massive_ratio=500.0)
    report = find_super_weights(model, ids, thresholds=strict)
    doc = json.loads(json.dumps(report.to_dict()))
    assert doc["thresholds"] == asdict(strict)
    assert report.candidates == ()  # the planted input is not massive, and strict mode demands it
    assert find_super_weights(model, ids, thresholds=Thresholds(spike_floor=2e4)).candidates == ()
    assert doc["n_tokens"] == ids.numel() and doc["n_sequences"] == ids.shape[0]


@pytest.mark.parametrize("bad", [{"spike_ratio": 1.0}, {"min_share": 0.0}, {"massive_floor": -1.0},
                                 {"max_channels_per_layer": 0}])
def test_bad_thresholds_raise(bad):
    with pytest.raises(EsaError):
        Thresholds(**bad)


def test_bad_inputs_raise():
    model = _tiny("llama")
    with pytest.raises(EsaError, match="input_ids"):
        find_super_weights(model, torch.tensor([1, 2, 3]))
    with pytest.raises(EsaError, match="attention_mask"):
        find_super_weights(model, _ids(), attention_mask=torch.ones(2, 3, dtype=torch.long))


def test_padded_positions_are_ignored():
    model, ids = _tiny("llama"), _ids()
    _plant(model, ids, 2, 5, 77, output=1e4)
    t = find_super_weights(model, ids).candidates[0]
    mask = torch.ones_like(ids)
    mask[t.batch, t.position:] = 0  # hide the spike token (and the rest of its row: right padding)
    report = find_super_weights(model, ids, attention_mask=mask)
    assert report.n_tokens == int(mask.sum())
    assert all((w.batch, w.position) != (t.batch, t.position) for w in report.candidates)
    assert all(w.output_activation < t.output_activation for w in report.candidates)


def test_report_round_trips_through_its_stored_dict():
    model, ids = _tiny("llama"), _ids()
    _plant(model, ids, 2, 5, 77, output=1e4)
    report = find_super_weights(model, ids, iterate=True)
    stored = json.loads(json.dumps(report.to_dict()))  # what a superweights run's metrics hold
    assert sw.report_from_dict(stored) == report


def test_plot_is_a_png(tmp_path):
    model, ids = _tiny("gpt_neox"), _ids()
    _plant(model, ids, 2, 5, 77, output=1e4)
    report = find_super_weights(model, ids, iterate=True)
    path = plot_activation_profile(report, tmp_path / "sub" / "p.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_unmapped_architecture_names_the_supported_ones():
    opt = random_model({"model_type": "opt", "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "word_embed_proj_dim": 32, "max_position_embeddings": 64})
    with pytest.raises(EsaError, match=r"model_type 'opt' has no module map.*supported: .*gpt2.*llama"):
        find_super_weights(opt, torch.randint(0, 100, (1, 8)))
