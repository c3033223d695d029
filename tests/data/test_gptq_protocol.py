"""The ``gptq`` method reproduces the GPTQ / SparseGPT / Wanda evaluation streams token for token.

The reference below is an independent rewrite of those loaders' test-set path (IST-DASLab/gptq datautils.py:
get_wikitext2, get_ptb, get_ptb_new, get_c4_new; locuslab/wanda lib/data.py) and of their eval loop
(``nsamples = numel // seqlen``, window i = ``ids[:, i*seqlen:(i+1)*seqlen]``, loss on shifted logits), run on
local parquet files in the Hugging Face layout of each dataset — empty rows included — read with ``datasets``.
"""

from __future__ import annotations

import datasets
import pytest

from esa.data.corpora import load_corpus
from esa.data.windows import corpus_windows
from esa.core.errors import EsaError


def reference_windows(tokenizer, parquet: str, dataset: str, seqlen: int) -> list[list[int]]:
    data = datasets.load_dataset("parquet", data_files=parquet, split="train")
    if dataset == "wikitext-2":
        enc = tokenizer("\n\n".join(data["text"]), return_tensors="pt").input_ids
    elif dataset == "ptb":  # get_ptb: validation split, blank-line joined
        enc = tokenizer("\n\n".join(data["sentence"]), return_tensors="pt").input_ids
    elif dataset == "ptb-new":  # get_ptb_new: test split, space joined
        enc = tokenizer(" ".join(data["sentence"]), return_tensors="pt").input_ids
    else:  # get_c4_new: first 1100 validation documents, space joined, first 256 * seqlen tokens
        enc = tokenizer(" ".join(data[:1100]["text"]), return_tensors="pt").input_ids[:, :(256 * seqlen)]
    nsamples = enc.numel() // seqlen
    return [enc[0, i * seqlen:(i + 1) * seqlen].tolist() for i in range(nsamples)]


def _parquet(path, column: str, rows: list[str]) -> str:
    datasets.Dataset.from_dict({column: rows}).to_parquet(str(path))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_layout")
    wiki = ["", " = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 @-@ 1 , the game 's story .\n",
            "", " = = Gameplay = = \n", "", " As with previous games , it 's played in real time .\n"] * 6
    ptb = [f" the company said it expects {i} N of sales <unk> in the quarter" for i in range(40)] + [""]
    c4 = [f"Document {i}: naïve café text about item {i}, with some words." for i in range(1200)]
    return {"wikitext-2": _parquet(d / "wikitext.parquet", "text", wiki),
            "ptb": _parquet(d / "ptb.parquet", "sentence", ptb),
            "ptb-new": _parquet(d / "ptb_test.parquet", "sentence", ptb),
            "c4": _parquet(d / "c4.parquet", "text", c4)}


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """SmolLM2's tokenizer made to add BOS by default (as Llama's does), to check the one BOS at the start."""
    from tokenizers import processors

    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    assert tok("a").input_ids[0] == tok.bos_token_id
    return tok


@pytest.mark.parametrize("dataset", ["wikitext-2", "ptb", "ptb-new", "c4"])
@pytest.mark.parametrize("adds_bos", [False, True])
def test_gptq_windows_are_the_reference_loader_windows(dataset, adds_bos, files, tokenizer, bos_tokenizer):
    tok = bos_tokenizer if adds_bos else tokenizer
    seqlen = 16 if dataset != "c4" else 4  # c4: the 256·seqlen cut falls inside the 1100-document stream
    corpus = load_corpus(f"{dataset}={files[dataset]}", "gptq")
    ws = corpus_windows(tok, corpus, "gptq", seqlen)
    expected = reference_windows(tok, files[dataset], dataset, seqlen)
    assert [w.input_ids.tolist() for w in ws.windows] == expected
    assert all(w.scored.tolist() == [False] + [True] * (seqlen - 1) for w in ws.windows)
    assert ws.bos == ("start" if adds_bos else "never")
    assert sum(int(w.input_ids[0] == tok.bos_token_id) for w in ws.windows) == int(adds_bos)
    if dataset == "c4":
        assert len(ws.windows) == 256


def test_gptq_keeps_empty_rows_and_chunks_drops_them(files):
    gptq = load_corpus(f"wikitext-2={files['wikitext-2']}", "gptq")
    esa = load_corpus(f"wikitext-2={files['wikitext-2']}", "chunks")
    assert "" in gptq.documents and "" not in esa.documents and len(gptq.documents) == 48
    assert gptq.protocol == "gptq" and esa.protocol == "esa"


def test_gptq_refuses_a_bos_choice(files, tokenizer):
    corpus = load_corpus(f"wikitext-2={files['wikitext-2']}", "gptq")
    with pytest.raises(EsaError, match="drop --bos"):
        corpus_windows(tokenizer, corpus, "gptq", 16, bos="always")


def test_local_layout_with_the_wrong_column_names_the_column(files):
    with pytest.raises(EsaError, match="column 'sentence'"):
        load_corpus(f"ptb={files['wikitext-2']}", "gptq")


def test_ptb_script_dataset_is_refused_with_the_fix():
    with pytest.raises(EsaError, match=r"loading-script dataset ptb_text_only.*--datasets ptb=/path/to/test.parquet"):
        load_corpus("ptb")
