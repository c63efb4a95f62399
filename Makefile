# The one test command (README, .ci/run): installs what the suite needs, then lints, type-checks
# and runs every test (Python, server end-to-end, Neovim headless, VS Code).
PYTHON ?= python3

.PHONY: test install lint typecheck pytest demo

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
