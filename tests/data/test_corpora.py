import json
import time

import pytest

from esa.data.corpora import load_corpus
from esa.core.errors import EsaError


def test_python_docs_is_the_pydoc_topics_text(python_docs):
    from pydoc_data import topics

    assert python_docs.documents == tuple(topics.topics[k] for k in sorted(topics.topics) if topics.topics[k].strip())
    assert python_docs.joined().count("\n\n") >= len(python_docs.documents) - 1


def test_local_txt_and_jsonl(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("first doc line\nmore\n\nsecond doc\n")
    assert load_corpus(str(txt)).documents == ("first doc line\nmore", "second doc\n")
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "a b"}) + "\n\n" + json.dumps({"text": "c"}) + "\n")
    assert load_corpus(str(jl)).documents == ("a b", "c")


def test_malformed_jsonl_names_the_line(tmp_path):
    jl = tmp_path / "bad.jsonl"
    jl.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(EsaError, match=r"bad.jsonl:2"):
        load_corpus(str(jl))


@pytest.mark.parametrize("content", ["", "   \n\n \t\n"])
def test_empty_corpus_refused(tmp_path, content):
    f = tmp_path / "empty.txt"
    f.write_text(content)
    with pytest.raises(EsaError, match="empty or whitespace-only"):
        load_corpus(str(f))


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(EsaError) as exc:
        load_corpus("wikitext2")
    msg = str(exc.value)
    assert "did you mean 'wikitext-2'" in msg.lower() and "python-docs" in msg and "c4" in msg


def test_missing_local_path():
    with pytest.raises(EsaError, match="does not exist"):
        load_corpus("/no/such/file.txt")


def test_hub_corpus_offline_fails_fast_with_fix():
    start = time.perf_counter()
    with pytest.raises(EsaError, match="pass a local .txt/.jsonl file"):
        load_corpus("wikitext-2")
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_non_utf8_file_is_one_error_with_offset_and_fix(tmp_path, suffix):
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(('{"text": "caf\xe9"}' if suffix == ".jsonl" else "caf\xe9 au lait").encode("latin-1"))
    offset = bad.read_bytes().index(b"\xe9")
    with pytest.raises(EsaError) as exc:
        load_corpus(str(bad))
    msg = str(exc.value)
    assert f"offset {offset}" in msg and "not UTF-8" in msg and "iconv -f latin1 -t utf-8" in msg
    assert "\n" not in msg


def test_non_utf8_file_through_the_cli_is_one_line(tmp_path, tiny_llama_dir, capsys):
    from esa.cli import main

    bad = tmp_path / "bad.txt"
    bad.write_bytes("na\xefve caf\xe9\n".encode("latin-1"))
    rc = main(["--no-progress", "baseline", "--model", str(tiny_llama_dir), "--datasets", str(bad),
               "--context-lens", "64", "--device", "cpu", "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith("esa: error: esa baseline:") and f"corpus file {bad} is not UTF-8" in err
    assert "offset 2" in err and not (tmp_path / "out").exists()  # a failed first attempt leaves nothing


def _wikitext_pages(tmp_path):
    """Two pages in EleutherAI/wikitext_document_level's layout (column ``page``), WikiText-tokenized."""
    import datasets

    pages = [" = Robert Boulter = \n \n Robert Boulter is an English film , television and theatre actor . He had a "
             "guest @-@ starring role on the television series The Bill in 2000 . \n",
             " = = Career = = \n \n In 2006 , Boulter starred alongside Whishaw in the play Citizenship ( written "
             "by Mark Ravenhill ) . He weighed 1 @,@ 000 N pounds . \n"]
    path = tmp_path / "wikitext_document_level.parquet"
    datasets.Dataset.from_dict({"page": pages}).to_parquet(str(path))
    return str(path), pages


def test_rolling_wikitext_reads_lm_eval_pages_detokenized(tmp_path, tokenizer):
    import re

    from esa.data.windows import corpus_windows, scored_text_counts

    path, pages = _wikitext_pages(tmp_path)
    corpus = load_corpus(f"wikitext-2={path}", "rolling")
    assert corpus.protocol == "lm-eval" and corpus.raw == tuple(pages)
    assert "guest-starring" in corpus.documents[0] and "1,000 1 pounds" in corpus.documents[1]
    assert "(written by Mark Ravenhill)" in corpus.documents[1] and "== Career ==" in corpus.documents[1]
    ws = corpus_windows(tokenizer, corpus, "rolling", 16)
    # lm-eval's process_results: words and bytes of the raw page, before the detokenizer
    assert scored_text_counts(ws.windows) == (sum(len(p.encode("utf-8")) for p in pages),
                                              sum(len(re.split(r"\s+", p)) for p in pages))
