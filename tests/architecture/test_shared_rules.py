"""Each shared piece once (issue 11): the pad id and the context-length check have one definition in
:mod:`esa.models`, and every place that once spelled its own copy now gives the same answer through it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import esa
import esa.evals.baseline as baseline
import esa.perturb.protocols.common as common
import esa.scaling.fits as scaling
import esa.sensitivity.calibration as calibration
from esa.data.corpora import load_corpus
from esa.core.errors import EsaError
from esa.models import Fingerprint, LoadedModel, ModelSpec
from esa.perturb.protocols import EvalConfig, make_bench
from esa.sensitivity.superweight_run import SuperWeightRun, window_batch
from esa.models.tiny import VOCAB, tiny_model

SRC = Path(esa.__file__).parent


class _Tok:
    """The real tokenizer with its pad and EOS ids replaced (everything else is delegated)."""

    def __init__(self, inner, pad, eos):
        self._inner, self.pad_token_id, self.eos_token_id = inner, pad, eos

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, *args, **kwargs):
        return self._inner(*args, **kwargs)

    def __len__(self):
        return len(self._inner)


class _Seen(Exception):
    """Raised by a stand-in once it has recorded the pad id a site handed it."""


@pytest.fixture(scope="module")
def tiny_lm(tokenizer):
    model = tiny_model("llama", seed=0)
    fp = Fingerprint("tiny", "tiny", "rev", sum(p.numel() for p in model.parameters()), "fp32", "llama", 512)
    return LoadedModel(model, tokenizer, fp, model.device)


def _record(seen: list):
    def stand_in(*args, **kwargs):
        seen.append(args[2] if len(args) > 2 else args[1])  # (model, windows, pad, …) or collate(windows, pad)
        raise _Seen
    return stand_in


def _pad_at_every_site(lm, corpus, tmp_path, monkeypatch) -> list:
    """The pad id each former call site passes on, in order: baseline, scaling, prefix cache, calibration."""
    seen: list = []
    for module, name in ((baseline, "evaluate_windows"), (scaling, "evaluate_windows"), (common, "PrefixCache"),
                         (calibration, "collate")):
        monkeypatch.setattr(module, name, _record(seen))
    data = EvalConfig(dataset=corpus, context_len=32, max_eval_tokens=124, calib_samples=2)
    bench = make_bench(lm, data)
    cfg = baseline.BaselineConfig(ModelSpec(), max_eval_tokens=124, batch_tokens=1024)
    calls = (lambda: baseline.evaluate_cell(lm, load_corpus(corpus), cfg, 32, 0, tmp_path),
             lambda: scaling._baseline(bench), lambda: common.build_cache(bench, []),
             lambda: calibration.calibration_batches(lm.tokenizer, calibration.CalibrationSpec(corpus, 2, 32)))
    for call in calls:
        with pytest.raises(_Seen):
            call()
    return seen


@pytest.mark.parametrize("pad, eos, expected", [
    (3, 2, 3),  # pad set
    (None, 2, 2),  # pad None, EOS set (the old calibration rule gave 0 here)
    (None, None, 0),  # neither (the old baseline rule passed None to the embedding)
    (VOCAB + 5, 2, 2),  # a pad beyond the embedding's rows
])
def test_every_former_site_pads_with_the_one_rule(tiny_lm, corpus, tmp_path, monkeypatch, pad, eos, expected):
    lm = dataclasses.replace(tiny_lm, tokenizer=_Tok(tiny_lm.tokenizer, pad, eos))
    assert _pad_at_every_site(lm, corpus, tmp_path, monkeypatch) == [expected] * 4


def test_only_esa_models_reads_the_tokenizers_pad_id():
    readers = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if "pad_token_id" in p.read_text())
    assert readers == ["models/__init__.py"]


@pytest.mark.parametrize("site, flag", [
    (lambda lm, corpus: make_bench(lm, EvalConfig(dataset=corpus, context_len=1024)), "--context-len"),
    (lambda lm, corpus: window_batch(lm, SuperWeightRun(dataset=corpus, context_len=1024)), "--context-len"),
])
def test_every_former_site_refuses_a_long_context_with_the_one_message(tiny_lm, corpus, site, flag):
    with pytest.raises(EsaError) as exc:
        site(tiny_lm, corpus)
    assert str(exc.value) == f"context length 1024 exceeds tiny's maximum of 512 positions; use {flag} ≤ 512"


def test_baseline_run_refuses_a_long_context_before_reading_data(tiny_lm, monkeypatch):
    from esa.kinds.base import RunContext
    from esa.kinds.baseline import KIND, BaselineRun

    monkeypatch.setattr("esa.kinds.baseline.load_corpus", lambda *a: pytest.fail("read data before the check"))
    run = BaselineRun(ModelSpec(), "x", 1024, 0, "chunks", None, "auto", 256, 512)
    with pytest.raises(EsaError, match="^context length 1024 exceeds tiny's maximum of 512 positions; "
                                       "use --context-lens ≤ 512$"):
        KIND.execute(tiny_lm, run, RunContext())


def test_only_esa_models_compares_a_length_with_max_positions():
    copies = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if "fingerprint.max_positions" in p.read_text()}
    assert copies - {"models/__init__.py"} == set(), "use esa.models.check_context instead of a copy of the rule"
