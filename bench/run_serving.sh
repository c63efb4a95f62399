#!/usr/bin/env bash
# The serving path of 7B on one GPU in one device call: the worker group (first pass and steady
# state), the language server replay (48-token and line-length answers, single-line split), and
# the real out-of-memory check. Writes the random 7B checkpoint when it is missing.
#
#   OUT=$OUT bash bench/run_serving.sh      # carry [".whl", ".bench-assets"]
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/device_env.sh
. bench/device_env.sh
R=$RESULTS
write_checkpoint 7b
step 200 "worker 7b" python3 bench/bench_worker.py --ckpt-dir "$CKPT/7b" --json "$R"
step 200 "lsp 7b" python3 bench/bench_lsp.py --ckpt-dir "$CKPT/7b" --server-log \
  "$OUT/lsp_server.log" --json "$R"
step 150 "gpu oom check" python3 scripts/gpu_oom_check.py --out "$OUT/oom"
echo "=== done ($(date -u +%T))"
