"""Comparing a command's new output with golden values written by its old path (tests/golden/)."""

from __future__ import annotations

import math

import pytest


def assert_same(new, old, where: str) -> None:
    """Equal, floats to rtol 1e-6 (NaN equals NaN), recursively through dicts and lists."""
    if isinstance(old, dict):
        assert set(new) == set(old), where
        for key in old:
            assert_same(new[key], old[key], f"{where}.{key}")
    elif isinstance(old, list):
        assert len(new) == len(old), where
        for i, (a, b) in enumerate(zip(new, old)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(old, float):
        assert (math.isnan(new) and math.isnan(old)) or new == pytest.approx(old, rel=1e-6, abs=1e-12), where
    else:
        assert new == old, where
