"""Progress a person can follow (esa.commands.study.progress_printer): off a terminal every line is timestamped,
each run is announced and finished as "[i/n] …" with its time and an ETA, and the same lines go to the log file
beside the results database, after the command line; a failed first attempt leaves no log behind."""

from __future__ import annotations

import re

from esa.cli import main

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


def _baseline(model, corpus, out, *extra) -> list[str]:
    return ["baseline", "--model", str(model), "--datasets", corpus, "--context-lens", "32", "--seeds", "0,1",
            "--max-eval-tokens", "62", "--device", "cpu", "--out-dir", str(out), *extra]


def test_off_a_terminal_lines_are_timestamped_with_counts_times_and_eta(tiny_llama_dir, corpus, tmp_path, capsys):
    assert main(_baseline(tiny_llama_dir, corpus, tmp_path / "b")) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "[1/2]" in ln or "[2/2]" in ln]
    assert len(lines) == 4 and all(STAMP.match(ln) for ln in lines), lines  # start + finish of each run
    assert lines[0].endswith("…") and " in " in lines[1] and "ETA" in lines[1]  # one left after the first
    assert "ETA" not in lines[3]  # none left
    log = (tmp_path / "b" / "esa.log").read_text().splitlines()
    assert STAMP.match(log[0]) and "$ esa baseline --model" in log[0]
    assert all(STAMP.match(ln) for ln in log) and [ln[20:] for ln in lines] == \
        [ln[20:] for ln in log if "[1/2]" in ln or "[2/2]" in ln]


def test_a_failed_first_attempt_leaves_no_log(tmp_path, corpus, capsys):
    assert main(_baseline(tmp_path / "no-model", corpus, tmp_path / "b")) == 2
    assert not (tmp_path / "b" / "esa.log").exists() and not (tmp_path / "b" / "esa.db").exists()
