"""Helpers of the end-to-end tests: start the real server (a real tiny CPU model) under a named
client profile, follow its `codellama/status`, and compute what the model says directly.

Imported by the `test_lsp_*` modules; it holds no tests itself.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from lsp_harness import plain
from lsprotocol import types as t
from pytest_lsp import ClientServerConfig, LanguageClient, client_capabilities, make_test_lsp_client

from codellama_lsp.config import CompletionConfig, Config, apply_settings
from codellama_lsp.infill.prompt import decode_infill, infilling_prompt_tokens
from codellama_lsp.model.tokenizer import Tokenizer
from codellama_lsp.model.types import EngineRequest
from codellama_lsp.service.completion import (
    Cursor,
    Trace,
    answer_text,
    plan_completion,
    postprocess_step,
    sampling_for,
)

# Small answers keep the CPU model fast; two candidates exercise sampling on invoked requests.
TEST_SETTINGS: dict[str, Any] = {
    "completion": {"maxTokensSingleLine": 6, "maxTokensMultiline": 12, "numCandidates": 2},
    "actions": {"useCompletionModel": True, "maxGenLen": 16},
}
MODEL_FLAGS = ["--device", "cpu", "--dtype", "float32", "--max-seq-len", "512"]
PROFILES = ["visual-studio-code", "neovim"]


def server_command(ckpt: Path, *extra: str, settings: dict[str, Any] | None = None) -> list[str]:
    chosen = TEST_SETTINGS if settings is None else settings
    return [
        sys.executable,
        "-m",
        "codellama_lsp",
        "serve",
        "--ckpt-dir",
        str(ckpt),
        *MODEL_FLAGS,
        "--max-batch-size",
        "4",
        "--settings",
        json.dumps(chosen),
        *extra,
    ]


def test_config(ckpt: Path, settings: dict[str, Any] | None = None) -> Config:
    """The config the server builds from `server_command` (for computing expectations)."""
    model = {"ckptDir": str(ckpt), "device": "cpu", "dtype": "float32", "maxSeqLen": 512}
    config, problems = apply_settings(Config(), {"model": model, **(settings or TEST_SETTINGS)})
    if problems:
        raise ValueError(problems)
    return config


test_config.__test__ = False  # type: ignore[attr-defined]  # not a test, despite its name


class StatusLog:
    """Every `codellama/status` the server sent, with a way to wait for a state."""

    def __init__(self) -> None:
        self.states: list[Any] = []
        self._changed = asyncio.Event()

    def add(self, params: Any) -> None:
        self.states.append(params)
        self._changed.set()

    def names(self) -> list[Any]:
        return [getattr(entry, "state", None) for entry in self.states]

    async def wait_for(self, state: str, timeout: float = 60.0) -> Any:
        async def wait() -> Any:
            while True:
                for entry in self.states:
                    if getattr(entry, "state", None) == state:
                        return entry
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(wait(), timeout)

    async def wait_after(self, index: int, state: str, timeout: float = 60.0) -> Any:
        """The first status `state` sent after the first `index` statuses."""

        async def wait() -> Any:
            while True:
                for entry in self.states[index:]:
                    if getattr(entry, "state", None) == state:
                        return entry
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(wait(), timeout)


class EditLog:
    """The client side of workspace/applyEdit: records the edits and applies nothing."""

    def __init__(self, applied: bool = True) -> None:
        self.edits: list[t.ApplyWorkspaceEditParams] = []
        self.applied = applied

    def __call__(self, params: t.ApplyWorkspaceEditParams) -> t.ApplyWorkspaceEditResult:
        self.edits.append(params)
        return t.ApplyWorkspaceEditResult(applied=self.applied)


def make_client(statuses: StatusLog, edits: EditLog) -> LanguageClient:
    client = make_test_lsp_client()

    def on_status(params: Any) -> None:
        statuses.add(params)

    def on_apply_edit(params: t.ApplyWorkspaceEditParams) -> t.ApplyWorkspaceEditResult:
        return edits(params)

    client.feature("codellama/status")(on_status)
    client.feature(t.WORKSPACE_APPLY_EDIT)(on_apply_edit)
    return client


_raw_ids = itertools.count(1)


class Session:
    """A started server: the client, its statuses and edits, the initialize result."""

    def __init__(self, client: LanguageClient, statuses: StatusLog, edits: EditLog) -> None:
        self.client, self.statuses, self.edits = client, statuses, edits
        self.result: t.InitializeResult | None = None
        self.profile = ""
        self.shut_down = False  # a test sent shutdown and exit itself

    async def request(self, method: str, params: Any) -> Any:
        return await self.client.protocol.send_request_async(method, params)

    async def raw(self, method: str, params: Any) -> Any:
        """A request whose result is left as plain objects (lsprotocol reads any code action
        that has a `command` as a Command, losing its kind and data)."""
        msg_id = f"raw-{next(_raw_ids)}"
        future = self.client.protocol.send_request(method, params, msg_id=msg_id)
        self.client.protocol._result_types[msg_id] = None
        return await asyncio.wrap_future(future)

    async def stats(self) -> dict[str, Any]:
        return plain(await self.raw("codellama/stats", {}))


def count(stats: dict[str, Any], name: str) -> int:
    """A counter of a `codellama/stats` answer by its "group.name"; 0 until first counted."""
    group, _, counter = name.partition(".")
    return int(stats["counts"].get(group, {}).get(counter, 0))


@asynccontextmanager
async def running_server(
    command: list[str],
    profile: str = "visual-studio-code",
    init_options: dict[str, Any] | None = None,
    wait_ready: bool = True,
    capabilities: t.ClientCapabilities | None = None,
    env: dict[str, str] | None = None,
    root_uri: str | None = None,
) -> AsyncIterator[Session]:
    statuses, edits = StatusLog(), EditLog()
    factory = lambda: make_client(statuses, edits)  # noqa: E731
    config = ClientServerConfig(server_command=command, client_factory=factory, server_env=env)
    started = await config.start()
    client = cast(LanguageClient, started)
    session = Session(client, statuses, edits)
    try:
        caps = capabilities or client_capabilities(profile)
        params = t.InitializeParams(
            capabilities=caps, initialization_options=init_options, root_uri=root_uri
        )
        session.result = await client.initialize_session(params)
        if wait_ready:
            await statuses.wait_for("ready")
        yield session
        if not session.shut_down:
            await asyncio.wait_for(client.shutdown_session(), 60)
    finally:
        # pygls' client.stop() waits for the server to exit: after a failed test (no shutdown
        # and exit sent) it would wait forever. The ranks die with the server.
        process = getattr(client, "_server", None)
        if process is not None and process.returncode is None:
            process.kill()
        await client.stop()


def open_doc(client: LanguageClient, uri: str, text: str, language: str = "python") -> None:
    item = t.TextDocumentItem(uri=uri, language_id=language, version=1, text=text)
    client.text_document_did_open(t.DidOpenTextDocumentParams(text_document=item))


def inline_params(uri: str, line: int, character: int, invoked: bool = False) -> Any:
    kind = (
        t.InlineCompletionTriggerKind.Invoked
        if invoked
        else t.InlineCompletionTriggerKind.Automatic
    )
    return t.InlineCompletionParams(
        text_document=t.TextDocumentIdentifier(uri=uri),
        position=t.Position(line=line, character=character),
        context=t.InlineCompletionContext(trigger_kind=kind),
    )


async def inline(session: Session, uri: str, line: int, col: int, invoked: bool = False) -> Any:
    """textDocument/inlineCompletion; the result untyped (lsprotocol's union of shapes)."""
    params = inline_params(uri, line, col, invoked)
    return await session.client.text_document_inline_completion_async(params)


async def expected_texts(
    group: Any,
    tokenizer: Tokenizer,
    settings: CompletionConfig,
    max_seq_len: int,
    before: str,
    after: str,
    invoked: bool = False,
    eol: str = "\n",
) -> tuple[list[int], list[str | None]]:
    """What the server must answer, computed from the worker group directly: the reference's
    prompt, a full (not early-stopped) greedy generation, then the post-processing rules."""
    plan = plan_completion(
        tokenizer, settings, max_seq_len, Cursor(before, after, invoked), Trace()
    )
    count = settings.num_candidates if invoked else 1
    texts: list[str | None] = []
    for index in range(count):
        params = sampling_for(tokenizer, settings, plan.mode, invoked, index)
        generation = await group.generate(
            EngineRequest(f"oracle-{id(plan)}-{index}", tuple(plan.prompt), params)
        )
        text = postprocess_step(decode_infill(tokenizer, generation.tokens), plan.window, plan.mode)
        texts.append(None if text is None else answer_text(text, eol))
    return plan.prompt, texts


def reference_prompt(tokenizer: Tokenizer, before: str, after: str) -> list[int]:
    return infilling_prompt_tokens(tokenizer, before, after)


def with_completion(settings: CompletionConfig, **changes: Any) -> CompletionConfig:
    return replace(settings, **changes)


# -- checkpoints and processes of the reliability tests -------------------------------------------
def write_chain_checkpoint(directory: Path, tokenizer_path: Path, answer: str) -> Path:
    """A tiny checkpoint (Meta's layout, the real Transformer) whose greedy infilling answer is
    `answer`, whatever the document: a bigram chain <MID> -> answer's tokens -> <EOT>.

    The attention and feed-forward outputs are zero, so the last hidden state is the current
    token's normalised embedding; each chain token's output row points at its predecessor's
    embedding (logit ~56 against ~0.2 for every other token). A random model almost never
    writes a line break; this one does, so CRLF out can be checked exactly.
    """
    import torch

    from codellama_lsp.model.random_checkpoint import (
        TINY_ARGS,
        random_state_dict,
        shard_state_dict,
        write_meta_checkpoint,
    )

    tokenizer = Tokenizer(tokenizer_path)
    assert tokenizer.middle_id is not None and tokenizer.eot_id is not None
    chain = [tokenizer.middle_id, *tokenizer.encode_nospace(answer), tokenizer.eot_id]
    assert len(set(chain)) == len(chain), "a bigram chain needs distinct tokens"
    sd = random_state_dict(TINY_ARGS, seed=1, dtype=torch.float32)
    for name in sd:
        if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            sd[name] = torch.zeros_like(sd[name])
        elif name.endswith("norm.weight"):
            sd[name] = torch.ones_like(sd[name])
    emb, out = sd["tok_embeddings.weight"], sd["output.weight"]
    out.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(2))
    for current, following in itertools.pairwise(chain):
        out[following] = 5.0 * emb[current] / emb[current].norm()
    shards = shard_state_dict(sd, TINY_ARGS, 1)
    return write_meta_checkpoint(directory, TINY_ARGS, shards, tokenizer_path)


def server_pid(session: Session) -> int:
    """The pid of the server process pytest-lsp started."""
    process: Any = session.client._server
    return int(process.pid)


def send_raw(session: Session, body: bytes) -> None:
    """One framed message written as given (bytes the typed client would refuse to encode)."""
    process: Any = session.client._server
    stdin = process.stdin
    stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
