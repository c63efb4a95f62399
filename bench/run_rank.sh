#!/usr/bin/env bash
# One GPU, one device call: where 13B's batch-1 decode step goes, whole (MP=1) and as one rank
# of MP=2 (the rank's own kernels, its collectives doing nothing: bench/rank_bench.py), each
# with a kernel table of one step; 7B's LSP keystroke replay (pipelined steps); then the one-row
# products at 13B's shapes, whole and halved.
# Records in $OUT/results.json.
#
#   OUT=$OUT bash bench/run_rank.sh [--no-sweep]     # carry [".whl", ".bench-assets"]
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/device_env.sh
. bench/device_env.sh
R=$RESULTS
step 150 "13b whole" python3 bench/rank_bench.py --model 13b --world 1 --profile --json "$R"
step 150 "13b one rank of MP=2" python3 bench/rank_bench.py --model 13b --world 2 --profile \
  --json "$R"
write_checkpoint 7b
step 150 "lsp 7b" python3 bench/bench_lsp.py --ckpt-dir "$CKPT/7b" --sessions psm_line,spm_line \
  --server-log "$OUT/lsp_server.log" --json "$R"
[ "${1:-}" = --no-sweep ] || step 240 "gemv 13b" python3 bench/gemv_bench.py --only 13b --json "$R"
echo "=== done ($(date -u +%T))"
