#!/usr/bin/env bash
# 13B in one device call on a 2-GPU host: the model on one GPU (decode plain and fast), then the
# worker group split over both GPUs (MP=2, the checkpoint's own 2 shards) with eager decode and
# with the graphs that hold the NCCL all-reduces (the default), their greedy tokens compared.
# Records in $OUT/results.json.
#
#   OUT=$OUT bash bench/run_13b.sh          # carry [".whl", ".bench-assets"]
#   OUT=$OUT bash bench/run_13b.sh --mp2-only   # the worker group runs only (writes the
#                                               # checkpoint when it is missing)
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/device_env.sh
. bench/device_env.sh
R=$RESULTS
if [ "${1:-}" != --mp2-only ]; then
  step 150 "GPU tests" python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_cuda_graphs.py tests/test_fast_paths.py
  step 240 "model 13b" python3 bench/bench_model.py --model 13b --quick --batches 1,16 \
    --exact-batches 1,3 --skip prefill,engine --ckpt-root "$CKPT" --json "$R"
fi
write_checkpoint 13b
step 100 "worker 13b MP=2, eager steps" python3 bench/bench_worker.py --ckpt-dir "$CKPT/13b" \
  --nproc 2 --batches 1,16 --gen 32 --eager-across-ranks --label _13b_mp2 \
  --dump-tokens "$OUT/mp2_eager.json" --json "$R"
step 100 "worker 13b MP=2, graphs across ranks" python3 bench/bench_worker.py --ckpt-dir \
  "$CKPT/13b" --nproc 2 --batches 1,16 --gen 32 \
  --label _13b_mp2_graphs --dump-tokens "$OUT/mp2_graphs.json" --json "$R"
step 30 "MP=2 graphs vs eager tokens" python3 bench/compare_tokens.py "$OUT/mp2_eager.json" \
  "$OUT/mp2_graphs.json" --name tokens_equal_13b_mp2_graphs_vs_eager --json "$R"
echo "=== done ($(date -u +%T))"
