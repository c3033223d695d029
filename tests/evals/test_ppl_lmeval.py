"""ESA ``rolling`` perplexity against lm-evaluation-harness 0.4.x ``loglikelihood_rolling`` (small scale).

Optional tier: needs ``pip install 'lm_eval==0.4.*'`` and runs with ``pytest -m lmeval``. The full-size
comparison with timings is ``bench/ppl_vs_lmeval.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esa.data.corpora import load_corpus
from esa.data.windows import make_windows, rolling_windows
from esa.evals.perplexity import evaluate_windows
from esa.models import ModelSpec, load_model

pytestmark = pytest.mark.lmeval
lm_eval = pytest.importorskip("lm_eval")

CTX = 64


@pytest.mark.parametrize("n,max_len", [(1, 4), (3, 4), (4, 4), (8, 4), (11, 4), (2, 2), (7, 2), (100, 16)])
def test_windows_are_lm_eval_windows(n, max_len):
    """ESA window = lm-eval's model input (context+continuation, left-truncated to max_len) + scored tail."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(100, 100 + n))
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 1, max_len, context_len=1)]
    ours = rolling_windows([torch.tensor(tokens)], max_len, 1)
    assert len(ours) == len(theirs)
    for w, (context, continuation) in zip(ours, theirs):
        model_input = (context + continuation)[-(max_len + 1):][:-1]  # HFLM._loglikelihood_tokens
        assert w.input_ids[:-1].tolist() == model_input
        assert w.input_ids[w.scored].tolist() == continuation


@pytest.fixture(scope="module")
def loaded():
    return load_model(ModelSpec(device="cpu", dtype="fp32"))


@pytest.fixture(scope="module")
def hflm(loaded):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=loaded.fingerprint.source, dtype="float32", max_length=CTX, device="cpu",
                batch_size=4)


def docs() -> tuple[str, ...]:
    """Three python-docs documents of different lengths: shorter than, about, and several times CTX."""
    corpus = load_corpus("python-docs").documents
    return corpus[0][:150], corpus[1][:300], corpus[2][:900]


def test_same_tokens_and_prefix_as_hflm(loaded, hflm):
    for text in docs():
        assert hflm.tok_encode(text) == loaded.tokenizer(text, add_special_tokens=False).input_ids
    ws = make_windows(loaded.tokenizer, docs(), "rolling", CTX)
    assert int(ws.windows[0].input_ids[0]) == hflm.prefix_token_id


def test_rolling_nll_matches_lm_eval(loaded, hflm):
    from lm_eval.api.instance import Instance

    texts = docs()
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    theirs = -np.array(hflm.loglikelihood_rolling(requests, disable_tqdm=True))  # (N_docs,) summed NLL
    ws = make_windows(loaded.tokenizer, texts, "rolling", CTX)
    scores = evaluate_windows(loaded.model, ws.windows, loaded.tokenizer.pad_token_id, token_budget=4 * CTX)
    ours = np.zeros(len(texts))
    np.add.at(ours, [w.doc for w in ws.windows], scores.nll)
    assert sum(w.doc == 2 for w in ws.windows) > 2  # the long document exercises the shifted last window
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
