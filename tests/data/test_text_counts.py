"""Word and byte counts are taken on the source text the scored tokens cover, once, whatever the window edges.

The reference in every test is computed here from the tokenizer's offset mapping and the text alone: a character
belongs to the last token whose offset starts at or before it (so whitespace a tokenizer folds into no token
belongs to the token before it), the scored text is the characters of scored tokens, a word is counted where its
first character is. Tokenizers: SmolLM2's byte-level BPE (splits 日/語 into several tokens) and a SentencePiece-
style Unigram with a Metaspace pre-tokenizer trained here offline.
"""

from __future__ import annotations

import re

import pytest

from esa.evals.baseline import BaselineConfig, evaluate_cell
from esa.data.corpora import load_corpus
from esa.data.windows import make_windows, scored_text_counts
from esa.models import ModelSpec
from helpers.models import tiny_loaded

TEXT = ("naïve café 日本語 über straße — ✓ 𝔘nicode  end.\n\n"
        "The quick brown fox, naïvely, jumps over 日本語 text; déjà vu.\n\n  indented line\tand tabs  ")


@pytest.fixture(scope="module")
def metaspace():
    """A SentencePiece-style fast tokenizer: Unigram + Metaspace (▁ for spaces), BOS <s> added by default."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    sp = Tokenizer(models.Unigram())
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>")
    sp.train_from_iterator([TEXT] * 10, trainer)
    sp.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def reference_counts(tokenizer, text: str, scored: set[int], special: bool = False) -> tuple[int, int]:
    """(bytes, words) of the characters owned by the scored token indices (indices into one tokenizer call)."""
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    real = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if e > s]  # special tokens own no text
    owner = []
    for k in range(len(text)):
        starts_before = [i for i in real if enc["offset_mapping"][i][0] <= k]
        owner.append(starts_before[-1] if starts_before else real[0])
    chars = [k for k in range(len(text)) if owner[k] in scored]
    n_bytes = sum(len(text[k].encode("utf-8")) for k in chars)
    n_words = sum(1 for k in chars if not text[k].isspace() and (k == 0 or text[k - 1].isspace()))
    return n_bytes, n_words


def scored_indices(method: str, n: int, ctx: int, bos: bool) -> set[int]:
    """Stream indices each method scores (ESA's documented protocols, written from the definitions)."""
    if method == "chunks":
        body = ctx - 1 if bos else ctx
        return {i for i in range(n // body * body) if bos or i % ctx}
    if method == "gptq":  # the stream as one call returns it; first token of each window unscored
        return {i for i in range(n // ctx * ctx) if i % ctx}
    return set(range(n)) if bos else set(range(1, n))  # sliding


CASES = [("chunks", 5, None, "never"), ("chunks", 7, None, "always"), ("sliding", 6, 2, "never"),
         ("sliding", 6, 3, "always"), ("gptq", 5, None, "auto")]


@pytest.mark.parametrize("which", ["smollm2", "metaspace"])
@pytest.mark.parametrize("method,ctx,stride,bos", CASES)
def test_window_counts_sum_to_the_scored_source_text(which, method, ctx, stride, bos, tokenizer, metaspace):
    tok = tokenizer if which == "smollm2" else metaspace
    docs = tuple(TEXT.split("\n\n"))
    ws = make_windows(tok, docs, method, ctx, stride=stride, bos=bos)
    special = method == "gptq"
    n = len(tok("\n\n".join(docs), add_special_tokens=special).input_ids)
    expected = reference_counts(tok, "\n\n".join(docs), scored_indices(method, n, ctx, bos == "always"), special)
    assert scored_text_counts(ws.windows) == expected
    assert len(ws.windows) > 5  # many window edges, some inside words and multi-byte characters


@pytest.mark.parametrize("which", ["smollm2", "metaspace"])
def test_every_token_scored_counts_the_whole_text_once(which, tokenizer, metaspace):
    tok = tokenizer if which == "smollm2" else metaspace
    text = "\n\n".join(TEXT.split("\n\n"))
    ws = make_windows(tok, tuple(TEXT.split("\n\n")), "sliding", 6, stride=2, bos="always")
    assert scored_text_counts(ws.windows) == (len(text.encode("utf-8")), len(text.split()))


@pytest.mark.parametrize("which", ["smollm2", "metaspace"])
def test_rolling_counts_are_lm_eval_counts_on_each_document(which, tokenizer, metaspace):
    tok = tokenizer if which == "smollm2" else metaspace
    docs = tuple(TEXT.split("\n\n"))
    ws = make_windows(tok, docs, "rolling", 4)
    assert scored_text_counts(ws.windows) == (sum(len(d.encode("utf-8")) for d in docs),
                                              sum(len(re.split(r"\s+", d)) for d in docs))
    for d, doc in enumerate(docs):  # each whole document sums to its own lm-eval counts
        own = [w for w in ws.windows if w.doc == d]
        assert sum(w.n_words for w in own) == len(re.split(r"\s+", doc)) and len(own) > 1


def test_baseline_counts_words_cut_by_window_edges_once(tokenizer, tmp_path):
    """End to end: a baseline cell's scored_words / scored_bytes equal the whole text's when every token is
    scored (sliding, BOS in every window) — the decoded-window counts double-counted cut words."""
    path = tmp_path / "multibyte.txt"
    path.write_text(TEXT * 3, encoding="utf-8")
    corpus = load_corpus(str(path))
    cfg = BaselineConfig(ModelSpec("tiny", device="cpu"), "smoke", (str(path),), (8,), (0,), "sliding", 3,
                         "always", None, 4096)
    entry = evaluate_cell(tiny_loaded(tokenizer, 0), corpus, cfg, 8, 0, tmp_path / "run")
    text = corpus.joined()
    assert entry.metrics["scored_words"] == len(text.split())
    assert entry.metrics["scored_bytes"] == len(text.encode("utf-8"))
