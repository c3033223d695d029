import math

import numpy as np
import pytest
import torch

from esa.data.windows import make_windows, select_windows
from esa.core.errors import EsaError
from esa.evals import perplexity as ppl_mod
from esa.evals.perplexity import collate, evaluate_windows, perplexity_metrics
from esa.models.tiny import tiny_model


def _reference_nll(model, windows):
    """Independent reference: HF's own loss × number of predicted tokens, one window at a time."""
    out = []
    for w in windows:
        labels = torch.where(w.scored, w.input_ids, torch.tensor(-100))
        with torch.no_grad():
            loss = model(w.input_ids[None], labels=labels[None]).loss.double()
        out.append(float(loss) * int(w.scored[1:].sum()))
    return np.array(out)


@pytest.fixture(scope="module")
def doc_windows(tokenizer, python_docs):
    ws = make_windows(tokenizer, python_docs.documents, "chunks", 96)
    return select_windows(ws, 96 * 4, seed=3).windows.windows


@pytest.mark.parametrize("family", ["smollm2", "llama", "gpt_neox", "gpt2"])
def test_window_nll_matches_hf_loss(family, smol, doc_windows):
    model = smol.model if family == "smollm2" else tiny_model(family)
    scores = evaluate_windows(model, doc_windows, pad_id=0, token_budget=96 * 2)
    np.testing.assert_allclose(scores.nll, _reference_nll(model, doc_windows), rtol=1e-5)
    assert scores.n_scored.tolist() == [95] * len(doc_windows)


def test_rolling_and_sliding_match_hf_loss_with_padding(smol, tokenizer, python_docs):
    docs = python_docs.documents[:2]
    for ws in (make_windows(tokenizer, docs, "rolling", 64), make_windows(tokenizer, docs, "sliding", 64, stride=24)):
        windows = ws.windows[:2] + ws.windows[-2:]  # includes short/partially scored windows → padding
        scores = evaluate_windows(smol.model, windows, pad_id=tokenizer.pad_token_id, token_budget=64 * 8)
        np.testing.assert_allclose(scores.nll, _reference_nll(smol.model, windows), rtol=1e-5)


def test_micro_batching_equals_batch_size_one(smol, doc_windows):
    one = evaluate_windows(smol.model, doc_windows, 0, token_budget=1)
    many = evaluate_windows(smol.model, doc_windows, 0, token_budget=10_000)
    assert one.batch_sizes == [1] * len(doc_windows) and many.batch_sizes == [len(doc_windows)]
    np.testing.assert_allclose(one.nll, many.nll, rtol=1e-6)
    assert one.n_correct.tolist() == many.n_correct.tolist()


def test_token_accuracy_is_argmax_match(smol, doc_windows):
    scores = evaluate_windows(smol.model, doc_windows[:2], 0, token_budget=10_000)
    for i, w in enumerate(doc_windows[:2]):
        with torch.no_grad():
            pred = smol.model(w.input_ids[None]).logits[0, :-1].argmax(-1)
        assert scores.n_correct[i] == int(((pred == w.input_ids[1:]) & w.scored[1:]).sum())


def test_out_of_memory_halves_the_batch(smol, doc_windows, monkeypatch):
    real = ppl_mod.score_batch

    def flaky(model, ids, attn, scored, **kw):
        if ids.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, ids, attn, scored, **kw)

    monkeypatch.setattr(ppl_mod, "score_batch", flaky)
    scores = evaluate_windows(smol.model, doc_windows, 0, token_budget=96 * 4)
    assert scores.batch_sizes == [1] * len(doc_windows)
    monkeypatch.setattr(ppl_mod, "score_batch", lambda *a, **k: (_ for _ in ()).throw(
        torch.OutOfMemoryError("out of memory")))
    with pytest.raises(EsaError, match="out of memory at batch size 1"):
        evaluate_windows(smol.model, doc_windows, 0, token_budget=96)


def test_non_finite_losses_are_counted_not_dropped(doc_windows):
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")
    scores = evaluate_windows(model, doc_windows, 0, token_budget=1000)
    metrics = perplexity_metrics(scores, n_bytes=100, n_words=10)
    assert scores.n_nonfinite == len(doc_windows)
    assert metrics["n_nonfinite_windows"] == len(doc_windows) and math.isnan(metrics["perplexity"])


def test_metric_definitions():
    scores = ppl_mod.WindowScores(np.array([2.0, 4.0]), np.array([3, 3]), np.array([1, 2]), forward_seconds=2.0)
    m = perplexity_metrics(scores, n_bytes=12, n_words=4)
    assert m["perplexity"] == pytest.approx(math.exp(1.0))
    assert m["token_accuracy"] == pytest.approx(0.5)
    assert m["word_perplexity"] == pytest.approx(math.exp(6 / 4))
    assert m["byte_perplexity"] == pytest.approx(math.exp(6 / 12))
    assert m["bits_per_byte"] == pytest.approx(6 / 12 / math.log(2))
    assert m["tokens_per_second"] == pytest.approx(3.0)


def test_collate_right_pads_and_masks(doc_windows):
    ids, attn, scored = collate([doc_windows[0], doc_windows[1]], pad_id=7)
    assert ids.shape == (2, 96) and attn.all() and scored[:, 0].sum() == 0


def test_batches_group_similar_lengths_and_keep_input_order():
    from esa.data.windows import Window

    lengths = [60, 100, 98, 59, 100]
    windows = tuple(Window(torch.arange(n) % 50, torch.arange(n) > 0, 0, 0) for n in lengths)
    model = tiny_model("llama")
    scores = evaluate_windows(model, windows, pad_id=0, token_budget=10_000)
    assert scores.batch_sizes == [3, 2]  # 100, 100, 98 (≤ 5 % padding) then 60, 59
    assert scores.n_scored.tolist() == [n - 1 for n in lengths]
    np.testing.assert_allclose(scores.nll, _reference_nll(model, windows), rtol=1e-5)


def test_batch_plan_worked_example():
    from esa.data.windows import Window
    from esa.evals.perplexity import batch_plan

    windows = tuple(Window(torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.bool), 0, 0)
                    for n in [60, 100, 98, 59, 100])
    assert batch_plan(windows, 10_000) == [[1, 4, 2], [0, 3]]
    assert batch_plan(windows, 200) == [[1, 4], [2], [0, 3]]  # 200 // 100 = 2 per batch; 200 // 60 = 3
