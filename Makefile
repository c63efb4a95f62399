# The one test command (README, .ci/run): installs what the suite needs, then lints, type-checks
# and runs every test (Python, server end-to-end, Neovim headless, VS Code).
PYTHON ?= python3

.PHONY: test install lint typecheck pytest demo ptx-device

test: install lint typecheck pytest

install:
	$(PYTHON) -m pip install -q -e '.[test]'

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

typecheck:
	$(PYTHON) -m mypy

pytest:
	$(PYTHON) -m pytest -ra

demo:
	$(PYTHON) -m pip install -q -e . && codellama-lsp demo

# Every kernel compiled for sm_90 with the Triton of the GPU machines' torch (2.11: Triton 3.6),
# not the one installed here, and checked as `make test` checks them (BENCHMARKS.md run 43).
DEVICE_TRITON ?= 3.6.0
ptx-device:
	$(PYTHON) -m pip install -q --no-deps --target .cache/triton-$(DEVICE_TRITON) triton==$(DEVICE_TRITON)
	CODELLAMA_LSP_PTX_TRITON=$(CURDIR)/.cache/triton-$(DEVICE_TRITON) \
		$(PYTHON) -m pytest -q -p no:cacheprovider tests/test_kernel_compile.py
