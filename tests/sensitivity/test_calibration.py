"""Calibration windows: seeds resample them, and a small corpus is used whole (seed-invariant).

(The end-to-end tests of `esa sensitivity` and `esa compare-rankings` that lived beside these in test_cli.py are
in tests/commands/test_sensitivity_command.py.)"""

from __future__ import annotations

import numpy as np

from esa.sensitivity.calibration import CalibrationSpec, calibration_batches


def test_calibration_seeds_resample(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    a = calibration_batches(tok, CalibrationSpec("python-docs", max_samples=6, context_len=64, seed=0,
                                                 batch_size=4))
    b = calibration_batches(tok, CalibrationSpec("python-docs", max_samples=6, context_len=64, seed=1,
                                                 batch_size=4))
    again = calibration_batches(tok, CalibrationSpec("python-docs", max_samples=6, context_len=64, seed=0,
                                                     batch_size=4))
    assert len(a.window_indices) == 6 and a.window_indices != b.window_indices
    assert a.window_indices == again.window_indices and not a.seed_invariant
    assert [tuple(x.ids.shape) for x in a.batches] == [(4, 64), (2, 64)]
    assert a.n_scored == 6 * 63 and np.all([x.labels()[:, 0].eq(-100).all() for x in a.batches])
    assert not torch_equal(a.batches[0].ids, b.batches[0].ids)


def torch_equal(x, y) -> bool:
    return x.shape == y.shape and bool((x == y).all())


def test_calibration_uses_all_windows_when_corpus_is_small(tiny_dir, corpus):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    cal = calibration_batches(tok, CalibrationSpec(corpus, max_samples=10_000, context_len=32, seed=3))
    assert cal.seed_invariant and len(cal.window_indices) == cal.available_windows
