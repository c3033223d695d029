"""Shared fixtures: tiny random models and a tiny model directory loadable by ``esa sensitivity --model``."""

from __future__ import annotations

import pytest
import torch

from esa.sensitivity.calibration import Batch, batches_from_ids
from esa.models.tiny import VOCAB


def random_batches(n: int = 4, T: int = 12, batch_size: int = 2, seed: int = 0, holes: bool = True):
    """Calibration batches of random ids; with ``holes`` some positions are unscored (label -100)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, T), generator=gen)
    batches = batches_from_ids(ids, batch_size)
    if not holes:
        return batches
    out = []
    for b in batches:
        scored = b.scored & (torch.rand(b.scored.shape, generator=gen) > 0.3)
        out.append(Batch(b.ids, b.attn, scored))
    return tuple(out)


@pytest.fixture(scope="session")
def tiny_dir(tiny_llama_dir):
    return tiny_llama_dir
