"""Model FLOPs utilisation: 2·N FLOPs per token against a known dense bf16 peak, None where the peak is unknown."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from esa.core.errors import EsaError
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


@pytest.mark.parametrize("exc", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 79.1 GiB total capacity)"),
    RuntimeError("MPS backend out of memory (MPS allocated: 9.0 GB)"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 85899345920 bytes. Error code 12 (Cannot allocate memory)"),
])
def test_is_oom_recognises_every_backends_allocator_failure(exc):
    assert resources.is_oom(exc)


@pytest.mark.parametrize("exc", [
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x64 and 32x64)"),
    ValueError("out of memory"),  # only the allocator's RuntimeError family counts
    EsaError("out of memory at batch size 1 with 4096 tokens; use a shorter --context-lens"),
])
def test_is_oom_rejects_other_errors(exc):
    assert not resources.is_oom(exc)


def test_every_oom_retry_uses_the_one_detector():
    """Each shared piece once (issue 11): no module but esa.evals.resources spells out what an OOM looks like."""
    src = Path(resources.__file__).parents[1]
    spelled = [p for p in src.rglob("*.py") if p != Path(resources.__file__)
               and ("OutOfMemoryError" in p.read_text() or '"out of memory" in' in p.read_text())]
    assert spelled == []
