"""The declared test tiers (README, "Test tiers"; tests/conftest.py): pyproject declares exactly these markers,
the Makefile has a target per tier, `make test` (what CI runs) stays unit + model, and every tier has tests."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TIERS = {"model", "slow", "lmeval", "gpu", "ray", "tracking"}  # markers; an unmarked test is in the unit tier
DEFAULT = "-m 'not slow and not lmeval and not gpu and not ray and not tracking'"  # pyproject addopts: unit + model
OPTIONAL = {"lmeval", "tracking"}  # tiers whose modules skip at import when their extra is not installed (as on CI)
TARGETS = {  # make target → the -m expression it passes (none: the addopts default)
    "test": None,
    "test-unit": "not slow and not lmeval and not gpu and not ray and not tracking and not model",
    "test-model": "model",
    "test-slow": "slow",
    "test-lmeval": "lmeval",
    "test-gpu": "gpu",
    "test-ray": "ray",
    "test-tracking": "tracking",
}


def _pytest_options() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]


def _recipe(makefile: str, target: str) -> list[str]:
    """The recipe lines of ``target`` (tab-indented lines after ``target: ...``)."""
    match = re.search(rf"^{re.escape(target)}:[^\n]*\n((?:\t[^\n]*\n)*)", makefile, re.M)
    assert match, f"the Makefile has no {target} target"
    return [line.strip() for line in match.group(1).splitlines()]


def test_pyproject_declares_exactly_the_tier_markers_and_enforces_them():
    options = _pytest_options()
    assert {m.split(":")[0].strip() for m in options["markers"]} == TIERS
    assert DEFAULT in options["addopts"] and "--strict-markers" in options["addopts"]


def test_each_tier_has_a_make_target_and_make_test_stays_unit_plus_model():
    makefile = (ROOT / "Makefile").read_text()
    phony = set(re.search(r"^\.PHONY:((?:[^\n]*\\\n)*[^\n]*)", makefile, re.M).group(1).replace("\\", " ").split())
    assert set(TARGETS) <= phony
    for target, expr in TARGETS.items():
        runs = [line for line in _recipe(makefile, target) if "-m pytest" in line]
        assert len(runs) == 1, f"{target} should run pytest once: {runs}"
        quoted = expr if expr is None or " " not in expr else f"'{expr}'"
        wanted = "$(PY) -m pytest -q" + (f" -m {quoted}" if expr else "")
        assert runs[0] == wanted, f"make {target} runs {runs[0]!r}, not {wanted!r}"
    assert any("needs CUDA" in line for line in _recipe(makefile, "test-gpu"))


def test_every_tier_has_tests_and_the_default_run_selects_unit_and_model():
    """One collection with the default options; tests/conftest.py reports the tier counts in one line."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("tiers: "))
    selected, deselected = (dict((t, int(n)) for t, n in re.findall(r"(\w+) (\d+)", part))
                            for part in line.removeprefix("tiers: ").split(";"))
    assert set(selected) == {"unit", "model"}, line
    # lmeval/tracking modules skip at import without their extra (as on CI): then none are collected
    assert TIERS - {"model"} - OPTIONAL <= set(deselected) <= TIERS - {"model"}, line
    for tier in OPTIONAL:
        marked = [p for p in (ROOT / "tests").rglob("test_*.py") if f"pytest.mark.{tier}" in p.read_text()]
        assert marked, f"the {tier} tier has no tests"
