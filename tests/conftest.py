"""Shared fixtures: the SentencePiece fixtures of ../shared and tiny random Code Llama models."""

from __future__ import annotations

import contextlib
import os

import torch


def _import_triton_for_its_interpreter() -> None:
    """On CPU-only machines, import Triton with its interpreter chosen: its library functions
    (`tl.zeros`, ...) are made interpreted or compiled at import. The variable is then unset, so
    kernels run interpreted only where a test sets it (tests/test_triton_kernels.py) and rank
    processes started by other tests never inherit it."""
    if torch.cuda.is_available() or "TRITON_INTERPRET" in os.environ:
        return
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        with contextlib.suppress(ImportError):
            import triton.language  # noqa: F401
    finally:
        del os.environ["TRITON_INTERPRET"]


_import_triton_for_its_interpreter()


# Imports below the call above: some of them import Triton (through torch._dynamo).
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from test_lsp_support import PROFILES, running_server, server_command, test_config

from codellama_lsp.model import parallel
from codellama_lsp.model.random_checkpoint import (
    TINY_ARGS,
    StateDict,
    random_state_dict,
    write_random_checkpoint,
)
from codellama_lsp.model.tokenizer import Tokenizer
from codellama_lsp.model.transformer import Transformer, build_transformer
from codellama_lsp.worker.group import WorkerGroup

# ../shared beside the repository (CI has it too).
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    return FIXTURES / "codellama-tokenizer.model"


@pytest.fixture(scope="session")
def tokenizer_70b_path() -> Path:
    return FIXTURES / "codellama-70b-instruct-tokenizer.model"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer_path: Path) -> Path:
    """A tiny random checkpoint in Meta's layout (MP=1, bf16, seed 0)."""
    directory = tmp_path_factory.mktemp("tiny-codellama")
    return write_random_checkpoint(directory, TINY_ARGS, tokenizer_path=tokenizer_path)


@pytest.fixture
def triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Triton kernels made for its CPU interpreter (where there is no GPU), and made again
    afterwards (a kernel is made once, for the interpreter or for the GPU)."""
    from codellama_lsp.model import decode_attention, gemv, kv_write, layer_kernels, rope_kernel

    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    kernels = (
        gemv._kernel,
        decode_attention._kernels,
        rope_kernel._kernel,
        layer_kernels._kernels,
        kv_write._kernel,
    )
    for made in kernels:
        made.cache_clear()
    yield
    for made in kernels:
        made.cache_clear()


@pytest.fixture(scope="session")
def single_process() -> None:
    """A world of one in this process, so fairscale layers can be built."""
    parallel.init_single_process()


@pytest.fixture(scope="session")
def tiny_state_dict() -> StateDict:
    """The full float32 weights of the tiny model (seed 0), Meta's names."""
    return random_state_dict(TINY_ARGS, seed=0, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_model(single_process: None, tiny_state_dict: StateDict) -> Transformer:
    """The tiny float32 model on CPU, MP=1. Shared: do not modify its weights."""
    model = build_transformer(TINY_ARGS, device="meta", dtype=torch.float32, max_seq_len=512)
    model.load_state_dict(tiny_state_dict, strict=True, assign=True)
    return model.eval()


# -- the end-to-end LSP modules (test_lsp_actions, test_lsp_completion): one per module --------
@pytest_asyncio.fixture(scope="module", loop_scope="module", params=PROFILES)
async def session(request: pytest.FixtureRequest, tiny_checkpoint: Path) -> AsyncIterator[Any]:
    """The real server on the tiny model, once under each client profile."""
    async with running_server(server_command(tiny_checkpoint), request.param) as started:
        started.profile = request.param
        yield started


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def oracle(tiny_checkpoint: Path) -> AsyncIterator[Any]:
    """The same model in a worker group of the test process: what the server must reproduce."""
    config = test_config(tiny_checkpoint)
    group = WorkerGroup(config.model)
    await group.start()
    yield group, Tokenizer(tiny_checkpoint / "tokenizer.model"), config
    await group.close()
