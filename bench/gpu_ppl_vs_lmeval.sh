#!/usr/bin/env bash
# GPU run of the issue-2 speed and correctness checks, on a machine without hub access:
#   1. a random-initialised Llama-3.2-1B-shaped model (real shapes, SmolLM2 tokenizer) — bench/make_random_model.py;
#   2. bench/ppl_vs_lmeval.py at bf16 (speed, MFU, each tool's NLL error vs an fp32 scoring of the same weights)
#      and at fp32 (NLL agreement ESA vs lm-eval at the same dtype, target ≤ 1e-4);
#   3. `esa baseline` on CUDA (results.json with tokens/s, MFU and CUDA peak memory);
#   4. if time is left, the same bf16 comparison on a Pythia-1.4B-shaped (GPT-NeoX) model.
# Needs: python3 with torch+CUDA; lm_eval 0.4.x and transformers 5.x importable (optionally from wheels in
# .whl/, installed to /tmp/site); a tokenizer directory (TOKENIZER, default .gpu/tokenizer: tokenizer.json of the
# embedded SmolLM2); ESA_SRC: the esa sources to use (default ./src). Outputs JSON into OUT (default ./gpu-out).
set -u
OUT=${OUT:-gpu-out}; TOKENIZER=${TOKENIZER:-.gpu/tokenizer}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$SECONDS
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:${ESA_SRC:-$PWD/src}
else
  export PYTHONPATH=${ESA_SRC:-$PWD/src}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 - <<'PY'
import importlib
for name in ("torch", "transformers", "pyarrow", "datasets", "fsspec", "lm_eval", "esa"):
    try:
        m = importlib.import_module(name); print(f"{name:14s}", getattr(m, "__version__", "?"))
    except Exception as exc:  # report, keep going: the ESA-only steps still run
        print(f"{name:14s} IMPORT FAILED: {type(exc).__name__}: {exc}")
PY
python3 -c "import lm_eval" 2>/dev/null && LMEVAL=1 || LMEVAL=0
MODEL=/tmp/rand-llama-1b
python3 bench/make_random_model.py --arch llama-3.2-1b --tokenizer "$TOKENIZER" --out $MODEL --device cuda || exit 1
quiet() { grep -v -E "it/s\]|s/it\]|Warning|WARNING|warn\(" ; }
if [ $LMEVAL = 1 ]; then
  echo "=== bf16, ctx 2048, all python-docs"
  python3 bench/ppl_vs_lmeval.py --model $MODEL --device cuda --dtype bf16 --ctx 2048 --max-docs 0 \
    --token-budgets 16384,65536,262144 --lmeval-batch-sizes 1,8,32,auto --repeats 2 --reference-fp32 \
    --json "$OUT/llama1b_bf16.json" 2>&1 | quiet
  echo "=== fp32, ctx 2048, all python-docs (same-dtype NLL agreement)"
  python3 bench/ppl_vs_lmeval.py --model $MODEL --device cuda --dtype fp32 --ctx 2048 --max-docs 0 \
    --token-budgets 65536 --lmeval-batch-sizes 8,32 --json "$OUT/llama1b_fp32.json" 2>&1 | quiet
fi
echo "=== esa baseline on CUDA (bf16, smoke profile, python-docs, ctx 2048)"
python3 -c "import sys; from esa.cli import main; sys.exit(main())" baseline --model $MODEL --baseline smoke \
  --datasets python-docs --context-lens 2048 --seeds 0 --dtype bf16 --out-dir /tmp/esa-baseline 2>&1 | quiet
find /tmp/esa-baseline -name results.json -exec cp {} "$OUT/esa_baseline_results.json" \;
echo "elapsed ${SECONDS}s"
if [ $LMEVAL = 1 ] && [ $((SECONDS - start)) -lt 300 ]; then
  echo "=== pythia-1.4b shape (GPT-NeoX), bf16, ctx 2048"
  python3 bench/make_random_model.py --arch pythia-1.4b --tokenizer "$TOKENIZER" --out /tmp/rand-pythia --device cuda
  python3 bench/ppl_vs_lmeval.py --model /tmp/rand-pythia --device cuda --dtype bf16 --ctx 2048 --max-docs 0 \
    --token-budgets 65536,262144 --lmeval-batch-sizes 8,32 --json "$OUT/pythia14b_bf16.json" 2>&1 | quiet
fi
echo "total ${SECONDS}s"
