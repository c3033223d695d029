"""Model FLOPs utilisation: 2·N FLOPs per token against a known dense bf16 peak, None where the peak is unknown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from esa.evals import resources
from esa.evals.resources import mfu

H200_RESULTS = Path(__file__).parents[2] / "bench" / "results" / "h200" / "esa_baseline_llama1b_bf16_results.json"


@pytest.mark.parametrize("name, peak", [("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12)])
def test_mfu_is_model_flops_over_the_cards_peak(monkeypatch, name, peak):
    monkeypatch.setattr(resources.torch.cuda, "get_device_name", lambda device=None: name)
    n_params, tokens_per_s = 1_073_809_408, 153_285.4
    assert mfu(n_params, tokens_per_s, torch.device("cuda")) == pytest.approx(2 * n_params * tokens_per_s / peak)


def test_no_mfu_on_cpu_or_an_unknown_card(monkeypatch):
    assert mfu(10**9, 1e5, torch.device("cpu")) is None
    monkeypatch.setattr(resources.torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert mfu(10**9, 1e5, torch.device("cuda")) is None


def test_the_recorded_h200_mfu_follows_from_its_own_throughput():
    """The MFU quoted in bench/README.md (33.3 %) is 2·N·tokens/s / 989e12 of the stored run."""
    doc = json.loads(H200_RESULTS.read_text())
    entry = doc["entries"][0]
    expected = 2 * doc["model"]["n_params"] * entry["metrics"]["tokens_per_second"] / 989e12
    assert entry["mfu"] == pytest.approx(expected) and round(entry["mfu"], 3) == 0.333
