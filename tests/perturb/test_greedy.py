"""The greedy collapse search never steps backwards (issue 10, defect 6).

Seen before the fix: PPL 306.7 → 223.6 at step 2, because the only candidate left was another bit of the same
weight. Here the trials are scripted (a stub bench whose NLLs per flip combination are given), so the test
states the exact situation: after the best single flip, every remaining flip *lowers* the damage.
"""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest

from esa.perturb.protocols import BitscanConfig
from esa.perturb.protocols import bitscan as bs
from esa.perturb.protocols.common import Trial

N_TOKENS = np.array([10, 10])


def _bench():
    baseline = SimpleNamespace(nll=np.array([20.0, 20.0]), n_scored=N_TOKENS)
    return SimpleNamespace(cache=SimpleNamespace(baseline=baseline), data=SimpleNamespace(collapse_ppl=1e6),
                           notes=[], n_tokens=N_TOKENS, model=None)


def _flip(label: str, nll: float) -> bs.Flip:
    return bs.Flip(0, "w", 0, 0, label, nll=np.array([nll, nll]))


@pytest.fixture
def scripted(monkeypatch):
    """``trial`` returns, for the flip it is given (with the chosen ones applied), the NLL in the returned dict;
    a flip's ``targets`` is its label, and ``perturbed`` changes nothing."""
    after: dict[str, float] = {}
    monkeypatch.setattr(bs, "perturbed", lambda *a, **k: nullcontext())
    monkeypatch.setattr(bs.Flip, "targets", property(lambda self: self.label))
    monkeypatch.setattr(bs, "trial", lambda bench, label, op, seed, also=(), tasks=False:
                        Trial(np.array([after[label]] * 2), {}))
    return after


def test_search_stops_when_the_best_next_flip_lowers_the_damage(scripted):
    a, b = _flip("w bit exponent_msb", 40.0), _flip("w bit exponent_lsb", 30.0)
    scripted["w bit exponent_lsb"] = 25.0  # on top of a: another bit of the same weight undoes part of it
    out = bs.greedy_collapse(_bench(), [a, b], max_flips=4, pool_size=8)
    ppls = [s["ppl"] for s in out["steps"]]
    assert ppls == [pytest.approx(np.exp(80 / 20))]  # one step: the second would lower PPL e^4 → e^2.5
    assert out["stalled"] and "stalled after 1 flip(s)" in out["stalled"] and not out["collapsed"]
    assert bs.greedy_verdict(out) == ("no collapse within 1 flip(s) (search stalled: no remaining flip raised "
                                      "the damage)")


def test_each_step_raises_the_damage_when_it_can(scripted):
    """Control: a second flip that adds damage is taken, so the stop above is not a search that never steps."""
    a, b = _flip("a", 40.0), _flip("b", 30.0)
    scripted["b"] = 60.0
    out = bs.greedy_collapse(_bench(), [a, b], max_flips=4, pool_size=8)
    assert [s["flip"] for s in out["steps"]] == ["a", "b"] and out["stalled"] is None
    assert out["steps"][1]["ppl"] > out["steps"][0]["ppl"]


def test_default_pool_searches_every_scanned_flip():
    cfg = BitscanConfig()
    assert cfg.greedy_pool >= cfg.top_n * len(cfg.bits)
