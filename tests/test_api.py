"""The Python API (README, "Python API"): ``import esa`` is lazy, every public name is the library's own object,
the convenience functions give the numbers the engine stores, and the README's example runs as written."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import esa
import esa.api

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example(marker: str = "python-api-example") -> str:
    """The fenced Python block between the README's ``<!-- marker:begin -->`` … ``end`` markers."""
    BEGIN, END = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    text = README.read_text(encoding="utf-8")
    assert BEGIN in text and END in text, f"README.md lost its {BEGIN} … {END} markers"
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    match = re.search(r"```python\n(.*?)```", block, re.S)
    assert match, "no ```python block between the README's example markers"
    return match.group(1)


def test_import_esa_loads_no_heavy_library():
    code = ("import sys, esa; print(sorted(m for m in ('torch', 'pandas', 'numpy', 'matplotlib', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_public_name_is_the_defining_modules_object_with_a_docstring():
    import importlib

    for name, module in esa.PUBLIC.items():
        obj = getattr(esa, name)
        assert obj is getattr(importlib.import_module(module), name), name
        assert (obj.__doc__ or "").strip(), f"esa.{name} has no docstring"
    assert set(esa.PUBLIC) <= set(dir(esa)) and set(esa.PUBLIC) <= set(esa.__all__)
    assert set(esa.api.__all__) == {n for n, m in esa.PUBLIC.items() if m == "esa.api"}


def test_api_functions_are_fully_annotated():
    for name in esa.api.__all__:
        sig = inspect.signature(getattr(esa.api, name))
        missing = [p for p, v in sig.parameters.items() if v.annotation is inspect.Parameter.empty
                   and v.kind is not inspect.Parameter.VAR_KEYWORD]
        assert not missing and sig.return_annotation is not inspect.Signature.empty, (name, missing)


def test_an_unknown_name_suggests_the_close_ones():
    with pytest.raises(AttributeError, match="no attribute 'perturb_ed'; did you mean perturbed"):
        esa.perturb_ed  # noqa: B018


def test_api_numbers_are_the_engines(tiny_llama_dir, corpus, tmp_path):
    """esa.baseline stores what the CLI's one-off study stores; esa.windows + esa.perplexity recompute it;
    esa.run of the same cell as a study dict resumes from those rows (same run id: nothing recomputed)."""
    db = tmp_path / "esa.db"
    frame = esa.baseline(str(tiny_llama_dir), db, datasets=[corpus], context_lens=[32], seeds=[0, 1],
                         max_eval_tokens=124, batch_tokens=1024, device="cpu")
    assert list(frame["config.seed"]) == [0, 1] and (frame["kind"] == "baseline").all()
    lm = esa.load(str(tiny_llama_dir), device="cpu")
    ws = esa.windows(lm, corpus, context_len=32, max_eval_tokens=124, seed=1)
    assert esa.perplexity(lm, ws)["perplexity"] == pytest.approx(frame["perplexity"].iloc[1], rel=1e-6)
    study = {"name": "esa-baseline", "models": [{"name": str(tiny_llama_dir), "device": "cpu"}], "datasets": [corpus],
             "context_lens": [32], "seeds": [0, 1], "max_eval_tokens": 124, "batch_tokens": 1024, "kinds": ["baseline"]}
    summary = esa.run(study, db)
    assert (summary.completed, summary.skipped) == (0, 2)
    assert esa.results(tmp_path, kind="baseline", completed=True)["run_id"].tolist() == frame["run_id"].tolist()
    assert set(esa.arrays(db, frame["run_id"][0])) >= {"nll", "n_scored", "n_correct"}
    md, page = esa.write_report(db, tmp_path / "report")
    assert md.is_file() and page.is_file() and list((tmp_path / "report").glob("*.png"))


def test_rank_and_super_weights_are_the_kinds_calls(tiny_llama_dir, corpus):
    lm = esa.load(str(tiny_llama_dir), device="cpu")
    top = esa.rank(lm, "magnitude", k=5).table
    direct = esa.score_and_rank(lm.model, esa.select_params(lm.model), (), "magnitude", 5).table
    assert top.equals(direct) and len(top) == 5
    grads = esa.rank(lm, "grad_x_weight", k=5, dataset=corpus, max_samples=2, context_len=32, batch_size=2)
    assert len(grads.table) == 5 and grads.floor is not None
    found = esa.super_weights(lm, dataset=corpus, context_len=32, max_samples=2)
    assert found.n_sequences == 2 and len(found.rounds) == 1


def test_run_raises_on_a_failed_run_and_keeps_the_database(tmp_path):
    study = {"name": "broken", "models": [str(tmp_path / "no-such-model")], "datasets": ["python-docs"],
             "context_lens": [32], "seeds": [0], "kinds": ["baseline"]}
    with pytest.raises(esa.EsaError, match="study broken: .*no-such-model"):
        esa.run(study, tmp_path / "s.db")
    assert not esa.run(study, tmp_path / "s.db", strict=False).ok


@pytest.mark.model
def test_the_readme_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md (Python API)", "exec"), {"__name__": "__readme__"})
    out = capsys.readouterr().out
    superweights, control = (float(re.search(rf"{name}: mean ΔNLL (\S+)", out).group(1))
                             for name in ("super weights", "random_k"))
    assert superweights > 1.0 and abs(control) < 1e-3, out  # zeroing 3 super weights breaks the model; 3 random don't
    assert "bits_per_byte" in out


@pytest.mark.slow
def test_the_readme_damage_prediction_example_runs(capsys):
    exec(compile(readme_example("predict-example"), "README.md (damage prediction)", "exec"), {"__name__": "__x__"})
    out = capsys.readouterr().out
    assert "model.layers." in out and "n_nonfinite" in out
