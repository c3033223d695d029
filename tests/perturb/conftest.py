"""Tiny random models shared by the perturbation tests (built once per session; tests leave them intact)."""

import pytest

from esa.models.tiny import TINY_CONFIGS, random_model, tiny_model


@pytest.fixture(scope="session")
def llama():
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="session")
def tied_llama():
    """A tiny Llama whose ``lm_head.weight`` is the same Parameter as ``model.embed_tokens.weight``."""
    return random_model(dict(TINY_CONFIGS["llama"], tie_word_embeddings=True), seed=1)


@pytest.fixture(scope="session")
def gpt2():
    return tiny_model("gpt2", seed=0)
