#!/usr/bin/env bash
# The serving path of 7B on one GPU in one device call: the worker group (first pass and steady
# state), the language server replay (48-token and line-length answers, single-line split), and
# the real out-of-memory check. Writes the random 7B checkpoint when it is missing.
#
#   OUT=$OUT bash bench/run_serving.sh      # carry [".whl", ".bench-assets"]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log") 2>&1
if [ -d .whl ] && ! python3 -c 'import fairscale' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
R=$OUT/results.json CKPT=${CKPT_ROOT:-/tmp/bench}
step() { local limit=$1 name=$2; shift 2; echo "=== $name ($(date -u +%T))"
  timeout "$limit" "$@" || echo "=== $name FAILED or timed out (exit $?)"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
[ -f "$CKPT/7b/params.json" ] || step 120 "write 7b" python3 -c "
import sys; sys.path.insert(0, 'bench')
import torch
from common import find_tokenizer
from random_weights import write_checkpoint
write_checkpoint(__import__('pathlib').Path('$CKPT/7b'), '7b', find_tokenizer(None), torch.device('cuda'))"
step 200 "worker 7b" python3 bench/bench_worker.py --ckpt-dir "$CKPT/7b" --json "$R"
step 200 "lsp 7b" python3 bench/bench_lsp.py --ckpt-dir "$CKPT/7b" --server-log \
  "$OUT/lsp_server.log" --json "$R"
step 150 "gpu oom check" python3 scripts/gpu_oom_check.py --out "$OUT/oom"
echo "=== done ($(date -u +%T))"
