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
    path = tmp_path_factory.mktemp("corpus") / "docs.txt"
    words = [f"word{i % 97} token{i % 13} value={i}" for i in range(600)]
    path.write_text("\n\n".join(" ".join(words[i:i + 30]) for i in range(0, 600, 30)))
    return str(path)
