# Sourced by the device-call scripts (run_all.sh, run_13b.sh, run_serving.sh), from the repo root
# with $OUT set: the wheels carried in .whl (`bench/device_assets.sh` makes that folder and
# .bench-assets) installed when fairscale is missing, PYTHONPATH, a log
# of everything in $OUT/log, the card, and `step SECONDS NAME COMMAND...` (a time limit; a failed
# step is reported and the script goes on). `write_checkpoint SHAPE` writes the random checkpoint
# of that shape under $CKPT when it is missing.
OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log") 2>&1
if [ -d .whl ] && ! python3 -c 'import fairscale' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
RESULTS=$OUT/results.json
CKPT=${CKPT_ROOT:-/tmp/bench}
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true

step() {  # step SECONDS NAME COMMAND...
  local limit=$1 name=$2; shift 2
  echo "=== $name ($(date -u +%T))"
  timeout "$limit" "$@" || echo "=== $name FAILED or timed out (exit $?)"
}

write_checkpoint() {  # write_checkpoint SHAPE: the random checkpoint in $CKPT/SHAPE
  [ -f "$CKPT/$1/params.json" ] || step 180 "write $1" python3 -c "
import pathlib, sys
sys.path.insert(0, 'bench')
import torch
from common import find_tokenizer
from random_weights import write_checkpoint
write_checkpoint(pathlib.Path('$CKPT/$1'), '$1', find_tokenizer(None), torch.device('cuda'))"
}
