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


WIKITEXT_PAGES = [
    " = Robert Boulter = \n \n Robert Boulter is an English film , television and theatre actor . He had a guest "
    "@-@ starring role on the television series The Bill in 2000 . This was followed by a starring role in the play "
    "Herons written by Simon Stephens , which was performed in 2001 at the Royal Court Theatre . \n",
    " = = Career = = \n \n In 2006 , Boulter starred alongside Whishaw in the play Citizenship ( written by Mark "
    "Ravenhill ) . He weighed 1 @,@ 000 N pounds , \" a lot \" said the critic 's review . \n",
]


def test_rolling_wikitext_equals_lm_eval_wikitext_task(loaded, hflm, tmp_path):
    """lm-eval's own ``wikitext`` task (document-level pages, its detokenizer, word/byte counts on the raw page),
    pointed at a local parquet in EleutherAI/wikitext_document_level's layout, against ESA's rolling wikitext-2."""
    import shutil
    from pathlib import Path

    import datasets
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    from esa.data.windows import corpus_windows, scored_text_counts
    from esa.evals.perplexity import perplexity_metrics

    parquet = tmp_path / "test.parquet"
    datasets.Dataset.from_dict({"page": WIKITEXT_PAGES}).to_parquet(str(parquet))
    shutil.copy(Path(lm_eval.__file__).parent / "tasks/wikitext/preprocess_wikitext.py", tmp_path)
    (tmp_path / "wikitext_local.yaml").write_text(
        "task: wikitext_local\ndataset_path: parquet\n"
        f"dataset_kwargs:\n  data_files:\n    test: {parquet}\n"
        "output_type: loglikelihood_rolling\ntest_split: test\ndoc_to_text: ''\n"
        "doc_to_target: !function preprocess_wikitext.wikitext_detokenizer\n"
        "process_results: !function preprocess_wikitext.process_results\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    out = evaluator.simple_evaluate(model=hflm, tasks=["wikitext_local"],
                                    task_manager=TaskManager(include_path=str(tmp_path)))
    theirs = out["results"]["wikitext_local"]

    corpus = load_corpus(f"wikitext-2={parquet}", "rolling")
    ws = corpus_windows(loaded.tokenizer, corpus, "rolling", CTX)
    scores = evaluate_windows(loaded.model, ws.windows, loaded.tokenizer.pad_token_id, token_budget=4 * CTX)
    ours = perplexity_metrics(scores, *scored_text_counts(ws.windows))
    for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours[key] == pytest.approx(theirs[f"{key},none"], rel=1e-5), key


def test_wikitext_detokenizer_is_lm_eval_s():
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer as theirs

    from esa.data.corpora import wikitext_detokenizer

    for page in WIKITEXT_PAGES + [" a ( b ) [ c ] { d } \" e \" ' f ' 10 ° C s ' x = = = = y"]:
        assert wikitext_detokenizer(page) == theirs({"page": page})
