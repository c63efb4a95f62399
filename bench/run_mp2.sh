#!/usr/bin/env bash
# 13B split over two GPUs in one device call, most needed first: the copy-rate ceiling, peer
# sums against NCCL's all-reduce bit for bit and timed (`scripts/gpu_peer_check.py`), the
# worker group (MP=2, graphs across ranks) with its all-reduces through peer memory
# (`model.peerAllReduce`) and through NCCL, their greedy tokens compared; the all-reduce
# alone, each way (`allreduce_bench.py`); last the worker with plain steps.
# Records in $OUT/results.json.
#
#   OUT=$OUT bash bench/run_mp2.sh          # carry [".whl", ".bench-assets"]; a 2-GPU kind
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/device_env.sh
. bench/device_env.sh
R=$RESULTS
step 40 ceilings python3 bench/ceilings.py --json "$R"
step 90 "peer sums against NCCL, 2 GPUs" python3 scripts/gpu_peer_check.py --world 2
write_checkpoint 13b
step 100 "worker 13b MP=2, peer sums" python3 bench/bench_worker.py --ckpt-dir "$CKPT/13b" \
  --nproc 2 --batches 1,16 --gen 32 --peer-all-reduce --label _13b_mp2_graphs_peer_sums \
  --dump-tokens "$OUT/mp2_peer.json" --json "$R"
step 100 "worker 13b MP=2, pipelined steps" python3 bench/bench_worker.py --ckpt-dir \
  "$CKPT/13b" --nproc 2 --batches 1,16 --gen 32 --label _13b_mp2_graphs \
  --dump-tokens "$OUT/mp2_pipelined.json" --json "$R"
step 30 "peer sums vs NCCL tokens" python3 bench/compare_tokens.py "$OUT/mp2_pipelined.json" \
  "$OUT/mp2_peer.json" --name tokens_equal_13b_mp2_peer_sums_vs_nccl --json "$R"
step 120 "all-reduce" python3 bench/allreduce_bench.py --json "$R"
step 100 "worker 13b MP=2, plain steps" python3 bench/bench_worker.py --ckpt-dir "$CKPT/13b" \
  --nproc 2 --batches 1,16 --gen 32 --no-pipeline --label _13b_mp2_graphs_plain_steps \
  --dump-tokens "$OUT/mp2_plain.json" --json "$R"
step 30 "pipelined vs plain tokens" python3 bench/compare_tokens.py "$OUT/mp2_plain.json" \
  "$OUT/mp2_pipelined.json" --name tokens_equal_13b_mp2_pipelined_vs_plain --json "$R"
echo "=== done ($(date -u +%T))"
