"""The attention kernel is a load option (``ModelSpec.attention``): each kernel gives the fp32 reference NLL, a
kernel that is not installed or not known fails with one line, and ``auto`` keeps the run ids of before."""

import dataclasses

import numpy as np
import pytest
import torch

from esa import api
from esa.core.errors import EsaError
from esa.core.provenance import provenance
from esa.evals.perplexity import batch_plan, evaluate_windows
from esa.executors.core import run_key
from esa.kinds.baseline import BaselineRun
from esa.models import ATTENTION_NAMES, ModelSpec, attention_of, load_model, pad_id


@pytest.fixture(scope="module")
def uneven_windows(smol):
    """python-docs windows cut by 0, 1 or 2 tokens (within MAX_PADDING), so micro-batches hold right-padded rows."""
    ws = api.windows(smol, "python-docs", context_len=64, max_eval_tokens=400)
    cut = [len(w.input_ids) - (i % 3) for i, w in enumerate(ws)]
    return tuple(dataclasses.replace(w, input_ids=w.input_ids[:k], scored=w.scored[:k]) for w, k in zip(ws, cut))


def _reference_nll(model, window) -> float:
    """Summed NLL of one window's scored tokens from transformers' own loss (ignore_index -100 elsewhere)."""
    ids = window.input_ids[None]
    labels = torch.where(window.scored, window.input_ids, torch.tensor(-100))[None]
    with torch.no_grad():
        loss = model(ids, labels=labels).loss
    return float(loss) * int(window.scored[1:].sum())  # the mean is over the labels after the shift


@pytest.mark.model
@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_each_kernel_gives_the_reference_nll(smol, uneven_windows, kernel):
    lm = load_model(ModelSpec(device="cpu", attention=kernel))
    assert attention_of(lm.model) == kernel
    assert any(len({len(uneven_windows[i].input_ids) for i in b}) > 1 for b in batch_plan(uneven_windows, 512))
    got = evaluate_windows(lm.model, uneven_windows, pad_id(lm.tokenizer, lm.model), token_budget=512)
    default = evaluate_windows(smol.model, uneven_windows, pad_id(smol.tokenizer, smol.model), token_budget=512)
    np.testing.assert_allclose(got.nll, default.nll, rtol=1e-5)
    assert np.array_equal(got.n_scored, default.n_scored)
    assert len({len(w.input_ids) for w in uneven_windows}) == 3
    for i in (0, 1, 2):  # a full window and two cut ones (padded rows of their batches)
        assert got.nll[i] == pytest.approx(_reference_nll(lm.model, uneven_windows[i]), rel=1e-5)


def test_auto_is_transformers_choice(smol):
    assert smol.fingerprint.model_id == "smollm2-135m"
    assert attention_of(smol.model) == "sdpa"  # Llama supports SDPA, so transformers picks it
    assert provenance(smol.device, smol.model)["attention"] == "sdpa"
    assert "attention" not in provenance(smol.device)


def test_a_missing_kernel_is_one_line(tiny_llama_dir):
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    with pytest.raises(EsaError) as exc:
        load_model(ModelSpec(str(tiny_llama_dir), device="cpu", attention="flash_attention_2"))
    message = str(exc.value)
    assert "'flash_attention_2'" in message and "--attention sdpa" in message and "\n" not in message


def test_an_unknown_kernel_is_refused_before_loading():
    with pytest.raises(EsaError, match="unknown attention kernel 'flash'; choose one of auto, sdpa"):
        load_model(ModelSpec("llama-3.1-8b", attention="flash"))  # would be a hub error if it got that far
    assert ATTENTION_NAMES[0] == "auto"


def test_auto_keeps_the_run_id_it_had_before_the_field():
    run = BaselineRun(ModelSpec(), "python-docs", 128, 0, "chunks", None, "auto", 256, 512)
    before = {"name": "smollm2-135m", "dtype": "fp32", "device": "auto", "revision": None,
              "trust_remote_code": False, "allow_pickle": False}  # ModelSpec's fields before `attention`
    assert run.config()["model"] == before
    eager = dataclasses.replace(run, model=ModelSpec(attention="eager"))
    assert eager.config()["model"] == {**before, "attention": "eager"}
    fingerprint = {"model_id": "smollm2-135m", "revision": "sha256:x"}
    assert run_key(run, fingerprint) != run_key(eager, fingerprint)
