import json
import time

import pytest

from esa.data.corpora import load_corpus
from esa.errors import EsaError


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
