"""One CLI vocabulary (esa.cli.unify and esa.commands.baseline.add_model_args): comma- or space-separated lists
on every list flag, the global flags after the subcommand, the dtype spellings users type, and the same model
flags on every command that loads a model."""

from __future__ import annotations

import pytest

from esa.cli import build_parser, main
from esa.study import expand, model_specs, parse_study

STUDY = {"name": "v", "models": ["smollm2-135m"], "datasets": ["python-docs"], "context_lens": [64], "seeds": [0]}


def _sub(name: str):
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices[name]


def test_comma_and_space_lists_are_the_same():
    p = build_parser()
    a = p.parse_args(["zeroshot", "--tasks", "piqa,arc_easy", "hellaswag"])
    b = p.parse_args(["zeroshot", "--tasks", "piqa", "arc_easy", "hellaswag"])
    assert a.tasks == b.tasks == ["piqa", "arc_easy", "hellaswag"]
    c = p.parse_args(["baseline", "--seeds", "0,1", "2", "--context-lens", "128,512"])
    assert c.seeds == [0, 1, 2] and c.context_lens == [128, 512]
    d = p.parse_args(["perturb", "--task-data", "piqa=/d/a,b.jsonl"])  # a path may hold a comma: not split
    assert d.task_data == ["piqa=/d/a,b.jsonl"]


def test_a_bad_list_item_is_one_line(capsys):
    assert main(["baseline", "--seeds", "0,x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "esa: error: --seeds takes int items, got '0,x'"


def test_global_flags_work_after_the_subcommand():
    p = build_parser()
    assert p.parse_args(["zeroshot", "-v", "--no-progress"]).verbose is True
    assert p.parse_args(["-v", "zeroshot"]).verbose is True
    assert p.parse_args(["zeroshot"]).verbose is False


@pytest.mark.parametrize("spelling,canonical", [("bfloat16", "bf16"), ("BF16", "bf16"), ("float16", "fp16"),
                                                ("half", "fp16"), ("float32", "fp32"), ("fp32", "fp32")])
def test_dtype_spellings_are_one_dtype_and_one_run_id(spelling, canonical):
    a = parse_study({**STUDY, "dtype": spelling})
    b = parse_study({**STUDY, "models": [{"name": "smollm2-135m", "dtype": canonical}]})
    assert a.dtype == canonical and [m.dtype for m in model_specs(a)] == [canonical]
    assert [r.config() for r in expand(a)] == [r.config() for r in expand(b)]


def test_auto_dtype_resolves_on_this_machine():
    import torch

    want = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    assert [m.dtype for m in model_specs(parse_study({**STUDY, "dtype": "auto"}))] == [want]


@pytest.mark.parametrize("command", ["baseline", "zeroshot", "sensitivity", "superweights", "perturb",
                                     "dose-response", "bitscan", "vulnerability", "scaling"])
def test_every_model_loading_command_has_the_model_flags(command):
    flags = set(_sub(command)._option_string_actions)
    assert {"--dtype", "--device", "--trust-remote-code", "--allow-pickle"} <= flags, command
    assert command == "scaling" or "--revision" in flags  # scaling: a ladder of repositories, no one revision
