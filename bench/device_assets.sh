#!/usr/bin/env bash
# What a device call carries besides the working tree (run on this machine, from the repo root):
# .whl/, the wheels of the packages the GPU image lacks (at the versions installed here, which
# `make install` chose), and .bench-assets/, the tokenizer (../shared does not travel). Both are
# git-ignored. Then carry [".whl", ".bench-assets"] (bench/device_env.sh installs the wheels).
set -euo pipefail
PYTHON=${PYTHON:-python3}
# The runtime dependencies, and pytest-asyncio, which tests/conftest.py imports.
PACKAGES="fairscale sentencepiece pygls lsprotocol attrs cattrs pytest-asyncio"
PLATFORMS="manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64"

version() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))"; }

rm -rf .whl && mkdir -p .whl .bench-assets
for package in $PACKAGES; do
  pinned="$package==$(version "$package")"
  if [ "$package" = fairscale ]; then  # published as a source archive only: build its wheel
    "$PYTHON" -m pip wheel -q --no-deps -w .whl "$pinned"
  else
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp $(printf -- '--platform %s ' $PLATFORMS) -d .whl "$pinned"
  fi
done
cp ../shared/fixtures/codellama-tokenizer.model .bench-assets/
ls .whl .bench-assets
