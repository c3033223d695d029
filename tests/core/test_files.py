"""esa.core.files.check_out_dir: where a command may write, and what --overwrite may replace."""

from __future__ import annotations

import pytest

from esa.core.errors import EsaError
from esa.core.files import check_out_dir

OWNED = ("perturb.json", "bitscan.json")


def test_new_or_empty_directories_are_accepted(tmp_path):
    assert check_out_dir(tmp_path / "new", False, OWNED, "perturb") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert check_out_dir(tmp_path / "empty", False, OWNED, "perturb") == tmp_path / "empty"


def test_a_file_or_a_foreign_directory_is_refused_even_with_overwrite(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(EsaError, match="is a file"):
        check_out_dir(tmp_path / "f", True, OWNED, "perturb")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("mine")
    with pytest.raises(EsaError, match="not empty.*--overwrite"):
        check_out_dir(tmp_path / "d", False, OWNED, "perturb")
    with pytest.raises(EsaError, match=r"refusing to replace .*no perturb run \(none of perturb.json, bitscan.json\)"):
        check_out_dir(tmp_path / "d", True, OWNED, "perturb")


def test_an_earlier_run_is_replaced_only_with_overwrite(tmp_path):
    (tmp_path / "bitscan.json").write_text("{}")
    with pytest.raises(EsaError, match="--overwrite"):
        check_out_dir(tmp_path, False, OWNED, "perturb")
    assert check_out_dir(tmp_path, True, OWNED, "perturb") == tmp_path
