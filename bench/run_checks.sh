#!/usr/bin/env bash
# The landed fast path checked on one GPU in one device call, most needed first: peer sums at
# world size 1 (`scripts/gpu_peer_check.py`), the GPU test files, the landed kernels' greedy
# batch-1 tokens against the eager path's and the SwiGLU GEMV timed and checked the same way
# (7B), one rank of 13B MP=2 alone with its all-reduces faked, with peer sums whose absent
# peers have always arrived and with the SwiGLU GEMV, the GEMV chain
# with and without dependent launches. With --serving instead: the worker group, the language
# server's replay and the out-of-memory check on 7B (run_serving.sh's steps, shorter).
# Records in $OUT/results.json.
#
#   OUT=$OUT bash bench/run_checks.sh [--serving]   # carry [".whl", ".bench-assets"]
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/device_env.sh
. bench/device_env.sh
R=$RESULTS
if [ "${1:-}" = --serving ]; then
  write_checkpoint 7b
  step 150 "lsp 7b" python3 bench/bench_lsp.py --ckpt-dir "$CKPT/7b" --sessions \
    psm_line,spm_line --server-log "$OUT/lsp_server.log" --json "$R"
  step 150 "gpu oom check" python3 scripts/gpu_oom_check.py --out "$OUT/oom"
  step 150 "worker 7b" python3 bench/bench_worker.py --ckpt-dir "$CKPT/7b" --batches 1,16 \
    --gen 64 --json "$R"
  echo "=== done ($(date -u +%T))"
  exit 0
fi
step 90 "peer sums, world 1" python3 scripts/gpu_peer_check.py
step 60 "GPU tests, kernels" python3 -m pytest -q -p no:cacheprovider -x \
  tests/test_triton_kernels.py
step 120 "13b MP=2 rank, peer sums" python3 bench/rank_bench.py --model 13b --world 2 \
  --variants fused,peer,swiglu --rounds 2 --profile --json "$R"
step 120 "7b landed kernels and the SwiGLU GEMV" python3 bench/rank_bench.py --model 7b \
  --world 1 --variants fused,swiglu --rounds 2 --exact-prompts 3 --json "$R"
step 90 "GPU tests, fast paths" python3 -m pytest -q -p no:cacheprovider -x -m gpu \
  tests/test_fast_paths.py tests/test_cuda_graphs.py tests/test_engine_pipeline.py
step 60 "gemv fusion" python3 bench/gemv_bench.py --fusion --json "$R"
echo "=== done ($(date -u +%T))"
