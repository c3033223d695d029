"""report.html in a real browser: headless Chromium loads it offline without console errors and shows the numbers.

Slow tier (`pytest -m slow`); skipped where /usr/bin/chromium is absent (Debian: `apt-get install chromium`).
The database is written by hand through esa.store (no model needed): three seeds of baselines at two contexts
and one perturbation run, so every section with a table and a figure is rendered.
"""

from __future__ import annotations

import os
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from esa.report.study_report import write_study_report
from esa.store import RunRecord, Store

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT_COPY = os.environ.get("ESA_REPORT_SCREENSHOT")  # set it to keep the screenshot, e.g. /tmp/esa_report.png

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium (apt-get install chromium)")]


def _baseline(rid: str, ctx: int, seed: int, ppl: float, rng) -> RunRecord:
    cfg = {"kind": "baseline", "model": {"name": "smollm2-135m", "dtype": "fp32"}, "dataset": "python-docs",
           "context_len": ctx, "seed": seed, "method": "chunks"}
    metrics = {"perplexity": ppl, "token_accuracy": float(rng.uniform(0.3, 0.4)),
               "bits_per_byte": float(rng.uniform(0.8, 0.9)), "scored_tokens": 1024, "n_nonfinite_windows": 0,
               "seed_invariant": False, "sanity": {"warnings": []}}
    return RunRecord(rid, "baseline", cfg, {"model_id": "smollm2-135m"}, {}, metrics, "completed", f"t{rid}", "t")


def _perturbation() -> RunRecord:
    comps = [{"name": "target vs baseline", "mean_delta_nll": 1.2345, "ci_low": 1.1, "ci_high": 1.4,
              "ppl_ratio": 3.437, "p_wilcoxon_holm": 3.05e-05, "collapsed": False},
             {"name": "random_k vs baseline", "mean_delta_nll": 0.0002, "ci_low": -0.001, "ci_high": 0.0014,
              "ppl_ratio": 1.0, "p_wilcoxon_holm": 0.71, "collapsed": False}]
    cfg = {"kind": "perturbation", "model": {"name": "smollm2-135m"}, "target": "superweights", "op": "zero"}
    return RunRecord("p", "perturbation", cfg, {}, {}, {"comparisons": comps}, "completed", "tp", "t")


class _Cells(HTMLParser):
    """Text of every <td> (the numbers the report shows)."""

    def __init__(self) -> None:
        super().__init__()
        self.cells, self._in = [], False

    def handle_starttag(self, tag, attrs):
        if tag == "td":
            self._in, self.cells = True, self.cells + [""]

    def handle_endtag(self, tag):
        self._in = self._in and tag != "td"

    def handle_data(self, data):
        if self._in:
            self.cells[-1] += data


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr",
                           "--v=0", *args], capture_output=True, text=True, timeout=120)


def _console_errors(stderr: str) -> list[str]:
    """Console messages, uncaught exceptions and failed resource loads that Chromium logged."""
    pattern = re.compile(r"CONSOLE|Uncaught|Failed to load resource|net::ERR_", re.I)
    return [line for line in stderr.splitlines() if pattern.search(line)]


def test_report_html_renders_in_headless_chromium(tmp_path):
    rng = np.random.default_rng(0)
    db = tmp_path / "study.db"
    with Store(db) as store:
        for i, (ctx, seed) in enumerate((c, s) for c in (128, 512) for s in (0, 1, 2)):
            store.commit_run(_baseline(f"b{i}", ctx, seed, float(20 - ctx / 100 + rng.normal(0, 0.2)), rng))
        store.commit_run(_perturbation())
    _, page = write_study_report(db, tmp_path / "report")
    url = page.resolve().as_uri()

    dom = _chromium(["--dump-dom", url], tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert not _console_errors(dom.stderr), _console_errors(dom.stderr)
    source, rendered = _Cells(), _Cells()
    source.feed(page.read_text())
    rendered.feed(dom.stdout)
    assert len(source.cells) > 30 and rendered.cells == source.cells  # every table number reached the DOM
    with Store(db) as store:
        ppl = store.con.execute("SELECT perplexity FROM results WHERE context_len = 512 AND kind = 'baseline'")
        mean = float(np.mean([r[0] for r in ppl]))
    assert any(c.startswith(f"{mean:.3f} ± ") for c in rendered.cells)
    assert {"+1.2345", "3.05e-05", "[+1.1000, +1.4000]"} <= set(rendered.cells)

    shot = tmp_path / "report.png"
    run = _chromium([f"--screenshot={shot}", "--window-size=1280,2200", "--hide-scrollbars", url],
                    tmp_path / "profile-shot")
    assert run.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", run.stderr[-2000:]
    assert not _console_errors(run.stderr), _console_errors(run.stderr)
    if SCREENSHOT_COPY:
        Path(SCREENSHOT_COPY).write_bytes(shot.read_bytes())
