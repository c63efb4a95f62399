#!/usr/bin/env bash
# Dependent launches and merged attention spans, on one GPU, in one device call: batch-1 decode
# with the kernel variants alternately in one process (`rank_bench.py --variants`): 7B whole with
# each variant's greedy tokens against the eager path's (`--exact-prompts`), one rank of 13B MP=2
# (its collectives faked) with kernel tables; the kernels' and fast paths' GPU tests; the GEMV
# chain with and without dependent launches; unless --no-model, 13B whole and 7B's fast path
# against the eager one at batch 1 and 16 (`bench_model.py --exact-batches`).
# Records in $OUT/results.json.
#
#   OUT=$OUT bash bench/run_fusion.sh [--no-model | --quick]  # carry [".whl", ".bench-assets"]
# --quick: the first two steps only, 7B's greedy check on 2 prompts (little device time left).
set -uo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/device_env.sh
. bench/device_env.sh
R=$RESULTS
python3 -c 'import triton; print("triton", triton.__version__)'
# In order of need: a cut-off run keeps what it finished (records are written at once).
QUICK=$([ "${1:-}" = --quick ] && echo 1 || true)
step 90 "7b fifth vs fused" python3 bench/rank_bench.py --model 7b --world 1 \
  --variants fifth,fused --rounds 2 --exact-prompts "$([ -n "$QUICK" ] && echo 2 || echo 4)" \
  --json "$R"
step 90 "13b MP=2 rank variants" python3 bench/rank_bench.py --model 13b --world 2 \
  --variants fifth,fused --rounds 2 $([ -z "$QUICK" ] && echo --profile) --json "$R"
[ -n "$QUICK" ] && { echo "=== done, quick ($(date -u +%T))"; exit 0; }
step 60 "GPU tests, kernels" python3 -m pytest -q -p no:cacheprovider -x \
  tests/test_triton_kernels.py
step 90 "GPU tests, fast paths" python3 -m pytest -q -p no:cacheprovider -x -m gpu \
  tests/test_fast_paths.py tests/test_cuda_graphs.py tests/test_engine_pipeline.py
step 100 "7b variants" python3 bench/rank_bench.py --model 7b --world 1 \
  --variants no_pdl,no_merge,fused --rounds 2 --json "$R"
step 60 "gemv fusion" python3 bench/gemv_bench.py --fusion --json "$R"
if [ "${1:-}" != --no-model ]; then
  step 90 "13b variants" python3 bench/rank_bench.py --model 13b --world 1 \
    --variants fifth,fused --rounds 2 --json "$R"
  write_checkpoint 7b
  step 200 "7b fast vs eager" python3 bench/bench_model.py --model 7b --quick --batches 1,16 \
    --exact-batches 1,16 --skip prefill,plain_engine --json "$R"
fi
echo "=== done ($(date -u +%T))"
