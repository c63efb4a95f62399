#!/usr/bin/env bash
# Every benchmark in order, in one device call; records in $OUT/results.json, output in $OUT/log.
#
#   bash bench/run_all.sh --quick          # 7B only, fewer decode steps (about 5 minutes)
#   bash bench/run_all.sh                  # 7B and 13B, full step counts
#   bash bench/run_all.sh --tiny           # CPU smoke run of every script
# Options: --models "7b 13b"  --compile MODE (also time torch.compile's decode step)
#          --skip-tests  --skip-worker  --skip-lsp  --skip-memory
# Carry [".whl", ".bench-assets"], made here first by `bash bench/device_assets.sh` (the
# wheels the GPU image lacks, and the tokenizer: ../shared does not travel).
set -uo pipefail
cd "$(dirname "$0")/.."
quick="" models="7b 13b" compile="" tiny="" tests=1 worker=1 lsp=1 memory=1 limit=600
while [ $# -gt 0 ]; do
  case $1 in
    --quick) quick="--quick"; models="7b"; limit=420 ;;
    --tiny) tiny="--tiny"; models="tiny" ;;
    --models) models=$2; shift ;;
    --compile) compile="--compile $2"; shift ;;
    --skip-tests) tests=0 ;;
    --skip-worker) worker=0 ;;
    --skip-lsp) lsp=0 ;;
    --skip-memory) memory=0 ;;
    *) echo "unknown option $1"; exit 2 ;;
  esac
  shift
done

# shellcheck source=bench/device_env.sh
. bench/device_env.sh
device=cuda; [ -n "$tiny" ] && device=cpu

[ $tests = 1 ] && step 240 "GPU tests" python3 -m pytest -q -p no:cacheprovider \
  tests/test_cuda_graphs.py tests/test_fast_paths.py tests/test_triton_kernels.py
step 60 ceilings python3 bench/ceilings.py --device $device $tiny --json "$RESULTS"
for m in $models; do
  flag="--model $m"; [ "$m" = tiny ] && flag="--tiny"
  # shellcheck disable=SC2086
  step $limit "model $m" python3 bench/bench_model.py $flag $quick $compile --device $device \
    --ckpt-root "$CKPT" --drop-caches --json "$RESULTS"
done
first=${models%% *}
[ $worker = 1 ] && step $((limit / 2))  "worker $first" python3 bench/bench_worker.py $tiny \
  --device $device --ckpt-dir "$CKPT/$first" --json "$RESULTS"
[ $lsp = 1 ] && step $((limit / 2)) "lsp $first" python3 bench/bench_lsp.py $tiny --device $device \
  --ckpt-dir "$CKPT/$first" --server-log "$OUT/lsp_server.log" --json "$RESULTS"
[ $lsp = 1 ] && step $((limit / 2)) "speculation $first" python3 bench/speculation_bench.py $tiny \
  --device $device --ckpt-dir "$CKPT/$first" --json "$RESULTS"
[ $memory = 1 ] && step $((limit / 2)) "memory $first" python3 bench/bench_memory.py $tiny \
  --device $device --ckpt-dir "$CKPT/$first" --json "$RESULTS"
echo "=== done ($(date -u +%T)); records in $RESULTS"
