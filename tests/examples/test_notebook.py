"""The example notebook runs end to end in a fresh kernel, and ESA's plotting leaves a notebook's backend alone.

``examples/superweight_hunt.ipynb`` is executed with nbclient (slow tier, ``make test-slow``: the embedded
SmolLM2's real weights); any cell error fails the test with the cell and its traceback. Its inline plot must
come back as a PNG output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "examples" / "superweight_hunt.ipynb"
SRC = ROOT / "src" / "esa"


@pytest.mark.slow  # ≈ 80 s of CPU on the embedded model: make test-slow runs it
def test_superweight_hunt_notebook_runs(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 1  # the one inline plot, drawn inline


def plotting_modules() -> list[str]:
    """Every ESA module that uses matplotlib (found by its source, so a new plotting module is covered)."""
    return sorted("esa." + ".".join(p.relative_to(SRC).with_suffix("").parts) for p in SRC.rglob("*.py")
                  if "matplotlib" in p.read_text(encoding="utf-8") and p.name != "__init__.py")


DRAW = """
import importlib, json, sys
import matplotlib
import numpy as np
import pandas as pd

before = matplotlib.rcParams["backend"]
for name in sys.argv[1:]:
    importlib.import_module(name)
import esa.kinds
for kind in esa.kinds.names():  # every kind module imports its report section, and with it the report's figures
    esa.kinds.get(kind)

from esa.report.study_causal_plots import greedy_plot
from esa.report.study_plots import comparison_plot
from esa.sensitivity.plots import layer_role_heatmap

pngs = [comparison_plot([{"label": "a", "mean_delta_nll": 0.5, "ci_low": 0.1, "ci_high": 0.9, "collapsed": False}]),
        greedy_plot([{"title": "t", "baseline_ppl": 20.0, "collapse_ppl": 1000.0, "steps": [{"ppl": 40.0}]}])]
layer_role_heatmap(pd.DataFrame({"layer": [0, 1], "role": ["mlp.down_proj"] * 2}), sys.argv[0] + ".png", "t")
pngs.append(open(sys.argv[0] + ".png", "rb").read())
magic = b"\\x89PNG\\r\\n\\x1a\\n"
print(json.dumps({"before": before, "after": matplotlib.rcParams["backend"],
                  "pyplot": "matplotlib.pyplot" in sys.modules, "png": [p[:8] == magic for p in pngs]}))
"""


def test_esa_plotting_never_switches_the_sessions_backend(tmp_path):
    """A notebook's inline backend (or, without matplotlib-inline, any non-Agg one) survives importing every ESA
    plotting module and drawing report figures; pyplot is never imported; the figures are still PNGs."""
    import importlib.util

    backend = ("module://matplotlib_inline.backend_inline" if importlib.util.find_spec("matplotlib_inline")
               else "svg")
    script = tmp_path / "draw"
    script.write_text(DRAW)
    out = subprocess.run([sys.executable, str(script), *plotting_modules()], capture_output=True, text=True,
                         env={**os.environ, "MPLBACKEND": backend}, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen == {"before": backend, "after": backend, "pyplot": False, "png": [True, True, True]}
    assert {"esa.report.study_plots", "esa.report.scaling_plots", "esa.perturb.plots", "esa.sensitivity.plots",
            "esa.sensitivity.superweight_plots"} <= set(plotting_modules())  # the search finds them
