#!/usr/bin/env bash
# Pipelined decode steps on one GPU, in one device call: the GPU tests of the engine's fast
# paths, then 7B's engine step with pipelined and plain steps alternately on one engine
# (batch 1 and 16) and the worker group with and without them.
# Records in $OUT/results.json.
#
#   OUT=$OUT [FULL=1] bash bench/run_pipeline.sh   # carry [".whl", ".bench-assets"]
# FULL=1 adds the other fast paths' GPU tests and the engine at batch 16.
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/device_env.sh
. bench/device_env.sh
R=$RESULTS
step 150 "GPU tests" python3 -m pytest -q -p no:cacheprovider -m gpu \
  tests/test_engine_pipeline.py ${FULL:+tests/test_fast_paths.py tests/test_cuda_graphs.py}
write_checkpoint 7b
step 90 "engine 7b b1" python3 bench/profile_engine.py --ckpt-dir "$CKPT/7b" --rows 1 \
  --steps 48 --json "$R"
step 90 "worker 7b" python3 bench/bench_worker.py --ckpt-dir "$CKPT/7b" --batches 1,16 \
  --gen 64 --dump-tokens "$OUT/pipelined.json" --json "$R"
step 90 "worker 7b, plain steps" python3 bench/bench_worker.py --ckpt-dir "$CKPT/7b" \
  --batches 1,16 --gen 64 --no-pipeline --label _plain_steps --dump-tokens "$OUT/plain.json" \
  --json "$R"
step 30 "pipelined vs plain tokens" python3 bench/compare_tokens.py "$OUT/plain.json" \
  "$OUT/pipelined.json" --name tokens_equal_7b_pipelined_vs_plain --json "$R"
[ -n "${FULL:-}" ] && step 90 "engine 7b b16" python3 bench/profile_engine.py --ckpt-dir \
  "$CKPT/7b" --rows 16 --json "$R"
echo "=== done ($(date -u +%T))"
