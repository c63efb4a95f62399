#!/usr/bin/env bash
# Batch 16 against batch 1 on one GPU, each fast-path variant alternately in one process with a
# kernel profile (why the worker's batch-16 decode fell from 1,917 to 920 tok/s between runs 33
# and 37), then the out-of-memory check. Records in $OUT/results.json.
#
#   OUT=$OUT bash bench/run_b16.sh   # carry [".whl", ".bench-assets"]
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/device_env.sh
. bench/device_env.sh
step 200 "7b b1/b16 variants" python3 bench/rank_bench.py --model 7b --world 1 --batches 1,16 \
  --variants fused,no_pdl,no_merge,fifth --rounds 1 --profile --json "$RESULTS"
step 150 "gpu oom check" python3 scripts/gpu_oom_check.py --out "$OUT/oom"
echo "=== done ($(date -u +%T))"
