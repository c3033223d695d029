"""Scorers against quantities computed by hand with torch.autograd / hooks on tiny models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from esa.core.errors import EsaError
from esa.evals.perplexity import score_batch
from esa.sensitivity.scorers import (
    ScoreOptions,
    hutchinson_diagonal,
    nll_sum,
    score_parameters,
    select_params,
)
from esa.models.tiny import tiny_model

from .conftest import random_batches


def _scores(name, model, params, batches, **opts):
    return {n: s for n, s in score_parameters(name, model, params, batches, ScoreOptions(**opts))}


def _manual_token_nlls(model, batch):
    """Per-window summed NLL of scored tokens, written out directly (logits at t predict t+1)."""
    logits = model(input_ids=batch.ids, attention_mask=batch.attn).logits.float()  # (B, T, V)
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
    return -(logp * batch.scored[:, 1:]).sum(1)  # (B,)


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama", seed=1)
    return model, select_params(model), random_batches()


def test_nll_matches_evaluator(llama):
    model, _, batches = llama
    for b in batches:
        nll, _, _ = score_batch(model, b.ids, b.attn, b.scored)
        with torch.no_grad():
            assert float(nll_sum(model, b)) == pytest.approx(float(nll.sum()), rel=1e-5)


def test_grad_x_weight_and_grad_match_autograd(llama):
    model, params, batches = llama
    total = sum(b.n_scored for b in batches)
    loss = sum(_manual_token_nlls(model, b).sum() for b in batches) / total  # mean NLL over the set
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    gxw, g = _scores("grad_x_weight", model, params, batches), _scores("grad", model, params, batches)
    assert list(gxw) == list(params)
    for n, p in params.items():
        torch.testing.assert_close(gxw[n], (grads[n] * p).abs().detach(), rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(g[n], grads[n].abs(), rtol=1e-4, atol=1e-9)


def test_grad_squared_is_per_window_fisher(llama):
    model, params, batches = llama
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for b in batches:
        for w, nll in enumerate(_manual_token_nlls(model, b)):
            gw = torch.autograd.grad(nll / b.scored[w, 1:].sum(), list(params.values()), retain_graph=True)
            for n, g in zip(params, gw):
                expected[n] += g * g
    got = _scores("grad_squared", model, params, batches)
    for n in params:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-12)
        assert got[n].abs().sum() > 0


def _tiny_mlp_problem():
    torch.manual_seed(0)
    w1, w2 = torch.randn(5, 3, requires_grad=True), torch.randn(2, 5, requires_grad=True)
    x, y = torch.randn(16, 3), torch.randn(16, 2)

    def loss_of(a, b):
        return F.mse_loss(torch.tanh(x @ a.t()) @ b.t(), y)

    flat = torch.cat([w1.detach().reshape(-1), w2.detach().reshape(-1)])
    hess = torch.autograd.functional.hessian(lambda v: loss_of(v[:15].view(5, 3), v[15:].view(2, 5)), flat)
    return [w1, w2], (lambda: loss_of(w1, w2)), torch.diagonal(hess)


def test_hutchinson_converges_to_exact_hessian_diagonal():
    params, loss_fn, exact = _tiny_mlp_problem()
    errors = {}
    for probes in (10, 1000):
        est = torch.cat([d.reshape(-1) for d in hutchinson_diagonal([loss_fn], params, probes, seed=0)])
        errors[probes] = float((est - exact).norm() / exact.norm())
    assert errors[1000] < errors[10] / 3
    assert errors[1000] < 0.1


def test_hutchinson_quadratic_and_seeding():
    torch.manual_seed(1)
    m = torch.randn(20, 20)
    a = m @ m.t() / 20  # symmetric: Hessian of 0.5 θᵀAθ is A
    theta = torch.randn(20, requires_grad=True)

    def loss():
        return 0.5 * theta @ a @ theta
    est = hutchinson_diagonal([loss], [theta], 4000, seed=3)[0]
    torch.testing.assert_close(est, torch.diagonal(a), rtol=0, atol=0.1 * float(torch.diagonal(a).abs().mean()))
    again = hutchinson_diagonal([loss], [theta], 5, seed=3)[0]
    assert torch.equal(again, hutchinson_diagonal([loss], [theta], 5, seed=3)[0])
    assert not torch.equal(again, hutchinson_diagonal([loss], [theta], 5, seed=4)[0])


def test_hutchinson_scorer_on_tiny_model(llama):
    model, params, batches = llama
    small = {n: p for n, p in params.items() if "mlp.down_proj" in n}
    a = _scores("hutchinson_diag", model, small, batches, probes=2, seed=0)
    b = _scores("hutchinson_diag", model, small, batches, probes=2, seed=1)
    for n, p in small.items():
        assert a[n].shape == p.shape and a[n].dtype == torch.float32
        assert torch.isfinite(a[n]).all() and (a[n] >= 0).all() and a[n].sum() > 0
        assert not torch.equal(a[n], b[n])  # the seed changes the probes
    assert all(p.requires_grad for p in model.parameters())  # flags restored


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_wanda_and_act_mag_match_manual_hooks(family):
    model = tiny_model(family, seed=0)
    params = select_params(model)
    batches = random_batches(holes=False)
    # pad the last window so the attention mask matters: its last 4 tokens are padding
    last = batches[-1]
    attn = last.attn.clone()
    attn[-1, -4:] = 0
    batches = batches[:-1] + (type(last)(last.ids, attn, last.scored & attn.bool()),)
    seen: dict[str, list] = {n: [] for n in params}
    modules = {n: model.get_submodule(n.rsplit(".", 1)[0]) for n in params}
    handles = [m.register_forward_hook(lambda mod, args, out, n=n: seen[n].append(args[0].detach()))
               for n, m in modules.items()]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b.ids, attention_mask=b.attn)
    for h in handles:
        h.remove()
    masks = [b.attn.bool() for b in batches]
    wanda, act = _scores("wanda", model, params, batches), _scores("act_mag", model, params, batches)
    for n, p in params.items():
        x = torch.cat([xs[m] for xs, m in zip(seen[n], masks)])  # (tokens, in)
        norm = x.norm(dim=0)  # (in,)
        w_out_in = p.detach().t() if family == "gpt2" else p.detach()  # Conv1D stores (in, out)
        expected = (w_out_in.abs() * norm[None, :])
        expected = expected.t() if family == "gpt2" else expected
        torch.testing.assert_close(wanda[n], expected, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(wanda[n], p.detach().abs() * act[n], rtol=1e-6, atol=0)


def test_magnitude_is_abs_weight_and_a_fresh_tensor(llama):
    model, params, _ = llama
    for n, s in score_parameters("magnitude", model, params, (), ScoreOptions()):
        assert torch.equal(s, params[n].detach().abs()) and s.data_ptr() != params[n].data_ptr()


def test_param_selection_defaults_and_flags():
    model = tiny_model("gpt2")
    default = select_params(model)
    assert default and all(n.endswith("weight") and ("c_" in n) for n in default)
    full = select_params(model, include_embeddings=True, include_norms=True, include_biases=True)
    assert set(full) == {n for n, _ in model.named_parameters()}
    mlp = select_params(model, ["*.mlp.*"])
    assert set(mlp) == {n for n in default if ".mlp." in n}


def test_param_selection_errors():
    model = tiny_model("llama")
    with pytest.raises(EsaError, match="matches no parameter.*Similar names: .*down_proj"):
        select_params(model, ["*.mlp.dwn_proj*"])
    with pytest.raises(EsaError, match="--include-norms"):
        select_params(model, ["*norm*"])
    with pytest.raises(EsaError, match="Did you mean 'grad_x_weight'"):
        score_parameters("grad_x_weigth", model, {}, ())


def test_activation_scorer_refuses_non_linear_params():
    model = tiny_model("llama")
    params = select_params(model, ["*layers.0.*"], include_norms=True)
    with pytest.raises(EsaError, match="Linear/Conv1D"):
        dict(score_parameters("wanda", model, params, random_batches()))
