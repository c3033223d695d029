"""Dataset specs (issue #14, item 7): any hub dataset as ``org/name[@REV][:config][:split][:field]``, local
parquet / arrow / ``save_to_disk`` paths with an optional field, the corpus's hub revision and content sha256
in the stored results, and a one-line error when a hub dataset cannot be read offline."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from esa.core.errors import EsaError
from esa.data.corpora import load_corpus
from esa.data.specs import DataSpec, hub_revision, is_spec, parse_spec

TEXTS = ["the first document of the corpus", "a second one, with more words in it", "third"]
BODIES = ["body one", "body two", "body three"]


@pytest.fixture
def local(tmp_path):
    """One small dataset in every local form: .parquet, .arrow, a save_to_disk Dataset and DatasetDict."""
    import datasets

    ds = datasets.Dataset.from_dict({"text": TEXTS, "body": BODIES, "n": [1, 2, 3]})
    ds.to_parquet(str(tmp_path / "docs.parquet"))
    ds.save_to_disk(str(tmp_path / "ds"))
    shutil.copy(next((tmp_path / "ds").glob("*.arrow")), tmp_path / "docs.arrow")
    datasets.DatasetDict({"train": ds, "test": ds.select([2, 0])}).save_to_disk(str(tmp_path / "dd"))
    return tmp_path


@pytest.mark.parametrize("text, want", [
    ("org/name", DataSpec("org/name", True)),
    ("allenai/c4:en:validation", DataSpec("allenai/c4", True, "en", "validation")),
    ("org/name::train:content", DataSpec("org/name", True, None, "train", "content")),
    ("org/name@v1.0:cfg", DataSpec("org/name", True, "cfg", revision="v1.0")),
    ("org/name@" + "a" * 40 + ":::page", DataSpec("org/name", True, field="page", revision="a" * 40)),
    ("{d}/docs.parquet", DataSpec("{d}/docs.parquet", False)),
    ("{d}/docs.parquet:body", DataSpec("{d}/docs.parquet", False, field="body")),
    ("{d}/docs.arrow:body", DataSpec("{d}/docs.arrow", False, field="body")),
    ("{d}/ds:body", DataSpec("{d}/ds", False, field="body")),  # a Dataset directory: the suffix is the field
    ("{d}/dd:train", DataSpec("{d}/dd", False, split="train")),  # a DatasetDict: the first suffix is the split
    ("{d}/dd::body", DataSpec("{d}/dd", False, field="body")),
    ("{d}/dd:train:body", DataSpec("{d}/dd", False, split="train", field="body")),
])
def test_parse_table(local, text, want):
    d = str(local)
    expected = DataSpec(want.path.format(d=d), want.hub, want.config, want.split, want.field, want.revision)
    assert parse_spec(text.format(d=d)) == expected


@pytest.mark.parametrize("text, fragment", [
    ("org/name:a:b:c:d", "org/name[@REV][:config][:split][:field]"),
    ("{d}/docs.parquet:a:b", "it takes PATH[:field]"),
    ("{d}/missing.parquet", "does not exist"),
    ("no/such/dir", "does not exist"),  # three parts: not a hub id
])
def test_malformed_specs_are_one_line(local, text, fragment):
    with pytest.raises(EsaError) as exc:
        parse_spec(text.format(d=local))
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("spec, want", [
    ("docs.parquet", TEXTS), ("docs.arrow", TEXTS), ("ds", TEXTS), ("docs.parquet:body", BODIES),
    ("docs.arrow:body", BODIES), ("ds:body", BODIES), ("dd", [TEXTS[2], TEXTS[0]]), ("dd:train", TEXTS),
    ("dd:train:body", BODIES),
])
def test_local_round_trips_through_load_corpus(local, spec, want):
    corpus = load_corpus(str(local / spec))
    assert corpus.documents == tuple(want)
    assert corpus.revision is None and corpus.source.startswith(f"file:{local.resolve()}")


def test_the_content_hash_is_the_sha256_of_the_text_read(local):
    corpus = load_corpus(str(local / "docs.parquet"))
    assert corpus.sha256() == hashlib.sha256("\n\n".join(TEXTS).encode("utf-8")).hexdigest()
    assert load_corpus(str(local / "ds:body")).sha256() == hashlib.sha256("\n\n".join(BODIES).encode()).hexdigest()


def test_unknown_field_lists_the_columns(local):
    with pytest.raises(EsaError) as exc:
        load_corpus(f"{local}/docs.parquet:txt")
    msg = str(exc.value)
    assert "no field 'txt'" in msg and "text, body, n" in msg and "\n" not in msg


def test_a_non_text_field_and_an_unknown_split_are_refused(local):
    with pytest.raises(EsaError, match=r"field 'n' holds .*not text"):
        load_corpus(f"{local}/ds:n")
    with pytest.raises(EsaError, match=r"has splits train, test, not 'validation'"):
        load_corpus(f"{local}/dd:validation")


def test_offline_hub_spec_is_one_line_with_the_fix():
    with pytest.raises(EsaError) as exc:
        load_corpus("someorg/not-a-dataset:cfg:train:content")
    msg = str(exc.value)
    assert "someorg/not-a-dataset" in msg and "offline" in msg and "save_to_disk" in msg and "\n" not in msg


def test_unreachable_hub_fails_before_datasets_is_asked(monkeypatch):
    """Not marked offline and the hub does not answer: one line at once (no datasets retries), naming the fix."""
    def boom(*a, **k):
        raise AssertionError("load_dataset must not run when the hub is unreachable")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr("esa.models.hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr("datasets.load_dataset", boom)
    with pytest.raises(EsaError) as exc:
        load_corpus("org/name")
    assert "unreachable" in str(exc.value) and "HF_HUB_OFFLINE=1" in str(exc.value)


def _fake_hub_cache(tmp_path: Path, commit: str) -> Path:
    """``org/name`` (config default, split test) in the datasets cache as a hub download leaves it:
    ``<cache>/org___name/default/0.0.0/<commit>/`` with ``name-test.arrow`` and ``dataset_info.json``."""
    import datasets

    datasets.Dataset.from_dict({"text": TEXTS}).to_parquet(str(tmp_path / "src.parquet"))
    built = datasets.load_dataset("parquet", data_files={"test": str(tmp_path / "src.parquet")},
                                  cache_dir=str(tmp_path / "build"), split="test")
    dst = tmp_path / "cache" / "org___name" / "default" / "0.0.0" / commit
    shutil.copytree(Path(built.cache_files[0]["filename"]).parent, dst)
    (dst / "parquet-test.arrow").rename(dst / "name-test.arrow")
    info = json.loads((dst / "dataset_info.json").read_text())
    (dst / "dataset_info.json").write_text(json.dumps({**info, "config_name": "default", "dataset_name": "name"}))
    return tmp_path / "cache"


def test_a_cached_hub_dataset_records_its_commit(tmp_path, monkeypatch):
    """The real offline path of ``datasets.load_dataset``: the revision is the commit its cache is filed under."""
    import datasets

    commit = "0123456789abcdef" * 2 + "01234567"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", _fake_hub_cache(tmp_path, commit))
    corpus = load_corpus("org/name")
    assert corpus.documents == tuple(TEXTS) and corpus.revision == commit
    assert corpus.source == "hf:org/name/default:test:text"


def test_hub_revision_reads_only_a_commit_directory():
    class Data:
        cache_files = [{"filename": "/c/parquet/default-1/0.0.0/" + "f" * 64 + "/parquet-train.arrow"}]

    assert hub_revision(Data()) is None and hub_revision(object()) is None
    Data.cache_files = [{"filename": "/c/org___name/default/0.0.0/" + "b" * 40 + "/name-test.arrow"}]
    assert hub_revision(Data()) == "b" * 40


@pytest.mark.parametrize("text, want", [
    ("foo.parquet", True), ("foo.parquet:text", True), ("foo.arrow:body", True), ("org/name:cfg", True),
    ("no/such/dir", True),  # a path by form: parse_spec says it does not exist when it is read
    ("{d}/ds", True), ("python-doc", False), ("wikitxt:text", False),
])
def test_is_spec_judges_by_form(local, text, want):
    assert is_spec(text.format(d=local)) is want


def test_existing_specs_read_as_before(tmp_path):
    """Names, NAME=PATH and .txt files keep their readers (and so their run ids: the spec string is the config)."""
    txt = tmp_path / "a.txt"
    txt.write_text("one doc\n\n\nanother doc")
    corpus = load_corpus(str(txt))
    assert corpus.documents == ("one doc", "another doc") and corpus.source == f"file:{txt.resolve()}"
    assert corpus.sha256() == hashlib.sha256(b"one doc\n\nanother doc").hexdigest() and corpus.revision is None
    assert load_corpus("python-docs").source == "python:pydoc_data.topics"


# ------------------------------------------------------------------------------------ through the CLI
def test_the_stored_results_carry_the_corpus_hash_and_revision(local, tiny_llama_dir):
    from esa.cli import main

    out = local / "out"
    argv = ["--no-progress", "baseline", "--model", str(tiny_llama_dir), "--datasets", f"{local}/ds:body",
            "--context-lens", "8", "--seeds", "0", "--max-eval-tokens", "16", "--batch-tokens", "64", "--device",
            "cpu", "--out-dir", str(out)]
    assert main(argv) == 0
    (results,) = out.glob("*/results.json")
    (entry,) = json.loads(results.read_text())["entries"]
    assert entry["corpus_sha256"] == hashlib.sha256("\n\n".join(BODIES).encode("utf-8")).hexdigest()
    assert entry["corpus_revision"] is None and entry["dataset"] == f"{local}/ds:body"


def test_an_offline_hub_spec_through_the_cli_is_one_line(tmp_path, tiny_llama_dir, capsys):
    from esa.cli import main

    rc = main(["--no-progress", "baseline", "--model", str(tiny_llama_dir), "--datasets", "someorg/not-a-dataset",
               "--context-lens", "8", "--device", "cpu", "--out-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("esa: error:") and "someorg/not-a-dataset" in err and "save_to_disk" in err
