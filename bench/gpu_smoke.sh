#!/usr/bin/env bash
# The sensitivity and perturbation engines on CUDA, offline: a random-initialised Llama-3.2-1B-shaped model in
# bf16 (bench/make_random_model.py), then
#   1. esa sensitivity (grad_x_weight, global top-k) on CUDA;
#   2. esa perturb with the top-k of that ranking vs random_k and bottom_k (every trial restores bit-exactly or
#      raises) and esa bitscan on the same ranking;
#   3. a restore check: 200 random perturb/restore cycles of every op on CUDA bf16 tensors, then torch.equal on
#      every parameter against a copy taken before.
# Same environment variables as bench/gpu_ppl_vs_lmeval.sh (ESA_SRC, TOKENIZER, OUT, WHEELS=.whl), plus ARCH and
# DEVICE (a CPU dry run: ARCH=llama-smoke DEVICE=cpu WHEELS=none).
set -eu -o pipefail
OUT=${OUT:-gpu-out}; TOKENIZER=${TOKENIZER:-.gpu/tokenizer}; ARCH=${ARCH:-llama-3.2-1b}; DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WHEELS=${WHEELS:-.whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site:${ESA_SRC:-$PWD/src}
else
  export PYTHONPATH=${ESA_SRC:-$PWD/src}
fi
esa() { python3 -c "import sys; from esa.cli import main; sys.exit(main())" --no-progress "$@"; }
M=/tmp/rand-smoke-model; W=/tmp/esa-gpu-smoke
rm -rf $W; python3 bench/make_random_model.py --arch "$ARCH" --tokenizer "$TOKENIZER" --out $M --device "$DEVICE" \
  2>&1 | grep -v "it/s\]"
echo "=== sensitivity"
esa sensitivity --model $M --dtype bf16 --device "$DEVICE" --scorer grad_x_weight --max-samples 8 --context-len 256 \
  --batch-size 4 --seeds 0 --k 64 --out-dir $W/sens
RANK=$(find $W/sens -name 'ranking*.parquet' | head -1); echo "ranking: $RANK"
echo "=== perturb"
esa perturb --model $M --dtype bf16 --device "$DEVICE" --targets "topk:$RANK:16" --op zero --ranking "$RANK" \
  --controls random_k,bottom_k --control-seeds 0 1 --context-len 256 --max-eval-tokens 4096 --n-boot 2000 \
  --collapse-ppl 1e9 --out-dir $W/perturb
echo "=== bitscan"
esa bitscan --model $M --dtype bf16 --device "$DEVICE" --targets "topk:$RANK:4" --top-n 2 --bits sign exponent_msb \
  --context-len 256 --max-eval-tokens 2048 --collapse-ppl 1e9 --out-dir $W/bitscan
echo "=== restore check"
python3 - "$M" "$DEVICE" <<'PY'
import sys, torch
from esa.models import ModelSpec, load_model
from esa.perturb.context import perturbed
from esa.perturb.ops import make_op
lm = load_model(ModelSpec(sys.argv[1], dtype="bf16", device=sys.argv[2]))
params = dict(lm.model.named_parameters())
before = {n: p.detach().clone() for n, p in params.items()}
g = torch.Generator().manual_seed(0)
ops = [make_op("zero"), make_op("sign_flip"), make_op("scale", factor=3.0), make_op("bit_flip", bit=14),
       make_op("gauss_noise", sigma=0.1), make_op("random_bit_flip", prob=0.5)]
names = [n for n, p in params.items() if p.dim() == 2]
for i in range(200):
    name = names[int(torch.randint(len(names), (1,), generator=g))]
    idx = torch.randint(params[name].numel(), (int(torch.randint(1, 64, (1,), generator=g)),), generator=g)
    with perturbed(lm.model, {name: idx}, ops[i % len(ops)], seed=i):
        assert not torch.equal(params[name].detach().view(-1)[idx], before[name].view(-1)[idx]) or i % 6 == 5  # a random bit flip may flip nothing
same = all(torch.equal(p.detach(), before[n]) for n, p in params.items())
print(f"restore check on {lm.device} bf16: 200 cycles, all {len(params)} parameters torch.equal: {same}")
sys.exit(0 if same else 1)
PY
for f in $W/perturb/perturb.json $W/bitscan/bitscan.json; do cp "$f" "$OUT/" 2>/dev/null || true; done
echo "gpu smoke: OK"
