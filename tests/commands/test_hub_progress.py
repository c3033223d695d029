"""Hub download bars stay visible when the CLI is not verbose (issue #14, item 4): the CLI quiets transformers'
warnings and its own bars, but transformers' ``disable_progress_bar`` also turns huggingface_hub's off — the
CLI turns those back on unless ``--no-progress`` or the user's ``HF_HUB_DISABLE_PROGRESS_BARS`` says otherwise."""

from __future__ import annotations

import importlib

import pytest
from huggingface_hub.utils import are_progress_bars_disabled
from transformers.utils import logging as hf_logging

from esa.cli import main, quiet_libraries

HUB_TQDM = importlib.import_module("huggingface_hub.utils.tqdm")  # the module (``utils.tqdm`` is its class)


@pytest.fixture(autouse=True)
def restore_library_state():
    """Progress-bar and verbosity switches are process-global: put them back after each test."""
    states = dict(HUB_TQDM.progress_bar_states)
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    yield
    HUB_TQDM.progress_bar_states.clear()
    HUB_TQDM.progress_bar_states.update(states)
    hf_logging.enable_progress_bar() if bars else hf_logging.disable_progress_bar()
    hf_logging.set_verbosity(verbosity)


@pytest.fixture
def env_unset(monkeypatch):
    """As if the user had not set HF_HUB_DISABLE_PROGRESS_BARS (huggingface_hub reads it once, at import)."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DISABLE_PROGRESS_BARS", None)
    monkeypatch.setattr(HUB_TQDM, "HF_HUB_DISABLE_PROGRESS_BARS", None)


def test_after_the_cli_setup_hub_bars_are_on_and_transformers_is_quiet(env_unset, tmp_path, capsys):
    (tmp_path / "smollm2-135m").mkdir()
    (tmp_path / "smollm2-135m" / "results.json").write_text("{}")
    assert main(["baseline", "--out-dir", str(tmp_path)]) == 2  # refused after the logging setup, cheaply
    assert "without a results database" in capsys.readouterr().err
    assert not are_progress_bars_disabled()
    assert not hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == hf_logging.ERROR


def test_no_progress_hides_hub_bars_and_verbose_leaves_transformers_alone(env_unset):
    quiet_libraries(verbose=False, no_progress=True)
    assert are_progress_bars_disabled()
    hf_logging.enable_progress_bar()
    quiet_libraries(verbose=True, no_progress=False)
    assert not are_progress_bars_disabled() and hf_logging.is_progress_bar_enabled()


def test_the_users_environment_variable_wins(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_DISABLE_PROGRESS_BARS", True)
    monkeypatch.setattr(HUB_TQDM, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    quiet_libraries(verbose=False, no_progress=False)
    assert are_progress_bars_disabled()
