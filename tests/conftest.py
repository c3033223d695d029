"""Shared fixtures. Tests run offline (the hub is unreachable) on the embedded SmolLM2 and tiny models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M (real weights), loaded once per session."""
    from esa.models import ModelSpec, load_model

    return load_model(ModelSpec("smollm2-135m"))


@pytest.fixture(scope="session")
def tokenizer(smol):
    return smol.tokenizer


@pytest.fixture(scope="session")
def python_docs():
    from esa.data.corpora import load_corpus

    return load_corpus("python-docs")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Path of a small local corpus (fast to tokenize) with enough text for dozens of 32-token windows."""
    return str(_words_corpus(tmp_path_factory.mktemp("corpus") / "docs.txt"))


def _words_corpus(path):
    """A small synthetic text (fast to tokenize) with enough tokens for dozens of 32-token windows."""
    words = [f"word{i % 97} token{i % 13} value={i}" for i in range(600)]
    path.write_text("\n\n".join(" ".join(words[i:i + 30]) for i in range(0, 600, 30)))
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama (esa.tiny, seed 0) saved with the embedded SmolLM2 tokenizer: loadable by --model.

    Shared by the whole session: tests must not write into it."""
    from transformers import AutoTokenizer

    from esa.models import resolve_source
    from esa.tiny import tiny_model

    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_model("llama", seed=0).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_source("smollm2-135m")[1]).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def make_study_dir(tmp_path_factory, tiny_llama_dir):
    """A factory of fresh directories holding ``model/`` (the tiny Llama, linked) and ``corpus.txt`` (``text``,
    or synthetic words when None), for study files that name both by path."""
    def make(name: str = "tiny_study", text: str | None = None):
        path = tmp_path_factory.mktemp(name)
        (path / "model").symlink_to(tiny_llama_dir, target_is_directory=True)
        if text is None:
            _words_corpus(path / "corpus.txt")
        else:
            (path / "corpus.txt").write_text(text)
        return path
    return make


@pytest.fixture(scope="session")
def tiny_study_dir(make_study_dir):
    """``model/`` (the tiny Llama) and ``corpus.txt`` (synthetic words) side by side, for study files."""
    return make_study_dir()
