"""Shared fixtures and the test tiers. Tests run offline (the hub is unreachable) on tiny random models and the
embedded SmolLM2.

Tiers (README, "Test tiers"): every test is in exactly one of ``unit`` (no marker: tiny random models, no real
weights), ``model`` (the embedded model's real weights: marked here for any test whose fixtures include
``smol``, or by hand), ``slow``, ``lmeval`` and ``gpu`` (skipped here without CUDA). Enforced at collection (one
tier per test, ``--strict-markers``) and at run time: a test outside model/slow/lmeval/gpu that loads an
embedded model's weights fails and says which marker to add.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

TIERS = ("model", "slow", "lmeval", "gpu", "ray", "tracking")  # declared markers (pyproject); no marker = unit
MODEL_FIXTURES = {"smol"}  # fixtures that load the embedded model's real weights


def tier_of(item) -> str:
    marked = [t for t in TIERS if item.get_closest_marker(t)]
    return marked[0] if marked else "unit"


@pytest.hookimpl(tryfirst=True)  # before -m deselects, so `-m model` sees the markers added here
def pytest_collection_modifyitems(config, items):
    import torch

    no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="gpu tier: needs CUDA")
    for item in items:
        if not any(item.get_closest_marker(t) for t in ("slow", "lmeval", "gpu", "ray", "tracking")) and \
                MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)
        marked = [t for t in TIERS if item.get_closest_marker(t)]
        if len(marked) > 1:
            raise pytest.UsageError(f"{item.nodeid} is marked {' and '.join(marked)}; a test belongs to one tier "
                                    f"({', '.join(TIERS)} or none for unit): keep one marker")
        if marked == ["gpu"]:
            item.add_marker(no_cuda)


_counts = {"selected": {}, "deselected": {}}


def pytest_deselected(items):
    for item in items:
        _counts["deselected"][tier_of(item)] = _counts["deselected"].get(tier_of(item), 0) + 1


def pytest_report_collectionfinish(config, start_path, items):
    """One line naming how many tests of each tier run (tests/architecture/test_tiers.py reads it)."""
    def fmt(counts):
        return ", ".join(f"{t} {counts[t]}" for t in ("unit", *TIERS) if counts.get(t)) or "none"

    selected = {}
    for item in items:
        selected[tier_of(item)] = selected.get(tier_of(item), 0) + 1
    return f"tiers: selected {fmt(selected)}; deselected {fmt(_counts['deselected'])}"


# Run-time check of the model tier: a test outside model/slow/lmeval/gpu that loads the safetensors an embedded
# model is de-quantised to (under the ESA cache) fails. The de-quantisation itself (resolve_source, also run for
# the tokenizer alone) is not a load for the test.
_running: list = [None]  # the test whose setup, call or teardown is running
_saved: dict = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _running[0] = item
    yield
    _running[0] = None


def _check_real_weights(location) -> None:
    from esa.models import cache_dir

    item = _running[0]
    if item is None or location is None or tier_of(item) != "unit":
        return
    path = Path(str(location)).expanduser().resolve()
    if path.is_relative_to((cache_dir() / "models").resolve()):
        pytest.fail(f"{item.nodeid} loads an embedded model's real weights ({path}) but is in the unit tier: "
                    "request the `smol` fixture or mark it @pytest.mark.model (or slow)", pytrace=False)


def pytest_configure(config):
    from transformers import AutoModelForCausalLM

    _saved["from_pretrained"] = AutoModelForCausalLM.__dict__.get("from_pretrained")  # None: inherited
    original = AutoModelForCausalLM.from_pretrained  # bound to the class

    def guarded(cls, *args, **kwargs):
        _check_real_weights(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return original(*args, **kwargs)

    AutoModelForCausalLM.from_pretrained = classmethod(guarded)


def pytest_unconfigure(config):
    from transformers import AutoModelForCausalLM

    if "from_pretrained" not in _saved:
        return
    if _saved["from_pretrained"] is None:
        del AutoModelForCausalLM.from_pretrained
    else:
        AutoModelForCausalLM.from_pretrained = _saved["from_pretrained"]


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M (real weights), loaded once per session."""
    from esa.models import ModelSpec, load_model

    return load_model(ModelSpec("smollm2-135m"))


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded SmolLM2's tokenizer alone (no weights loaded): what tiny models use in the unit tier."""
    from transformers import AutoTokenizer

    from esa.models import resolve_source

    return AutoTokenizer.from_pretrained(resolve_source("smollm2-135m")[1])


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
    """A tiny random Llama (esa.models.tiny, seed 0) saved with the embedded SmolLM2 tokenizer: loadable by --model.

    Shared by the whole session: tests must not write into it."""
    from transformers import AutoTokenizer

    from esa.models import resolve_source
    from esa.models.tiny import tiny_model

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
