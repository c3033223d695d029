"""Tiny models wrapped like loaded ones, and a guard that no model is loaded."""

from __future__ import annotations

import torch

from esa.models import Fingerprint, LoadedModel
from esa.models.tiny import tiny_model


def tiny_loaded(tokenizer, seed: int) -> LoadedModel:
    """A tiny random Llama (esa.models.tiny, ``seed``) with the given tokenizer, on CPU, fingerprinted by seed."""
    model = tiny_model("llama", seed=seed)
    n = sum(p.numel() for p in model.parameters())
    fp = Fingerprint("tiny-llama", "esa.models.tiny", f"seed-{seed}", n, "fp32",
                     "llama", 512)
    return LoadedModel(model, tokenizer, fp, torch.device("cpu"))


def forbid_model_loading(monkeypatch, why: str = "a completed study must not load its model or run anything"):
    """Make the local executor's model loading fail the test."""
    def boom(*a, **k):
        raise AssertionError(why)

    monkeypatch.setattr("esa.executors.local.load_model", boom)
