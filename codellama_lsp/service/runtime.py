"""The models the server runs: the completion model and, when configured, an Instruct model.

Each is a tokenizer (held here, in the server process) and a worker group (the rank processes).
Where the completion model is itself 7B/13B Instruct, one group serves both. Loading runs in the
background; until a model is ready its requests fail fast with a clear error, never wait.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from codellama_lsp.config import Config, ModelConfig
from codellama_lsp.errors import (
    CodeLlamaError,
    ConfigError,
    WorkerError,
    WorkerNotReadyError,
    WorkerRestartingError,
)
from codellama_lsp.model.tokenizer import Tokenizer
from codellama_lsp.service.generator import Generator

log = logging.getLogger(__name__)

States = ("stopped", "loading", "ready", "restarting", "error")


class ActionsUnavailableError(CodeLlamaError):
    """No Instruct model is configured for code actions."""


@dataclass(frozen=True)
class ModelStatus:
    state: str  # stopped | loading | ready | restarting | error
    message: str = ""
    progress: float | None = None


@dataclass
class LoadedModel:
    """What a request needs: the tokenizer, the token stream and the sequence limit."""

    name: str
    tokenizer: Tokenizer
    generator: Generator
    max_seq_len: int


GroupFactory = Callable[[ModelConfig, Callable[[Any], None]], Any]
StatusListener = Callable[[str, ModelStatus], None]


def default_group_factory(model: ModelConfig, on_status: Callable[[Any], None]) -> Any:
    from codellama_lsp.worker.group import WorkerGroup  # torch-free, but keeps imports lazy

    return WorkerGroup(model, on_status=on_status)


class ModelSlot:
    """One model: its tokenizer, its worker group and its status."""

    def __init__(
        self, name: str, model: ModelConfig, factory: GroupFactory, listener: StatusListener
    ) -> None:
        self.name = name
        self.model = model
        self._factory = factory
        self._listener = listener
        self.status = ModelStatus("stopped", "not started")
        self.tokenizer: Tokenizer | None = None
        self.group: Any = None

    def _set(self, status: ModelStatus) -> None:
        self.status = status
        self._listener(self.name, status)

    def _group_status(self, worker_status: Any) -> None:
        state = getattr(worker_status, "state", "error")
        message = getattr(worker_status, "message", "")
        if state == "loading" and self.status.state != "loading":
            return  # a late report from the loader after we decided; ignore
        self._set(ModelStatus(state, message, getattr(worker_status, "progress", None)))

    async def start(self) -> None:
        self._set(ModelStatus("loading", f"loading the {self.name} model"))
        try:
            if self.model.ckpt_dir is None:
                raise ConfigError(f"no checkpoint folder configured for the {self.name} model")
            tokenizer_file = self.model.tokenizer_file
            self.tokenizer = await asyncio.to_thread(Tokenizer, tokenizer_file)  # type: ignore[arg-type]
            self.group = self._factory(self.model, self._group_status)
            await self.group.start()
        except CodeLlamaError as exc:
            self._set(ModelStatus("error", str(exc)))
            return
        except Exception as exc:  # a loader bug must not take the server down
            log.exception("loading the %s model failed", self.name)
            self._set(ModelStatus("error", f"loading the {self.name} model failed: {exc}"))
            return
        self._set(ModelStatus("ready", f"{self.name} model ready"))

    def loaded(self) -> LoadedModel:
        state, message = self.status.state, self.status.message
        if state == "ready" and self.tokenizer is not None and self.group is not None:
            return LoadedModel(self.name, self.tokenizer, self.group, self.model.max_seq_len)
        if state in ("loading", "stopped"):
            raise WorkerNotReadyError(f"Code Llama is still loading the {self.name} model")
        if state == "restarting":
            raise WorkerRestartingError(f"the {self.name} model is restarting: {message}")
        raise WorkerError(f"the {self.name} model is unavailable: {message}")

    async def close(self) -> None:
        group, self.group = self.group, None
        if group is not None:
            await group.close()
        self.status = ModelStatus("stopped", "closed")


class Runtime:
    def __init__(
        self,
        config: Config,
        listener: StatusListener,
        factory: GroupFactory = default_group_factory,
    ) -> None:
        self.completion = ModelSlot("completion", config.model, factory, listener)
        instruct = config.instruct_model()
        self.instruct = ModelSlot("instruct", instruct, factory, listener) if instruct else None
        self._shared = config.shares_model()
        self._missing_actions = config.actions_model_missing()

    def slots(self) -> list[ModelSlot]:
        return [self.completion] + ([self.instruct] if self.instruct is not None else [])

    async def start(self) -> None:
        await asyncio.gather(*(slot.start() for slot in self.slots()))

    def completion_model(self) -> LoadedModel:
        return self.completion.loaded()

    def chat_model(self) -> LoadedModel:
        if self._shared:
            return self.completion.loaded()
        if self.instruct is None:
            raise ActionsUnavailableError(
                "no Code Llama Instruct model is configured for code actions: set "
                "actions.instructCkptDir (or --instruct-ckpt-dir), or actions.useCompletionModel "
                "when the completion model is a 7B/13B Instruct model"
            )
        return self.instruct.loaded()

    def overall(self) -> ModelStatus:
        """One status for status bars: the least ready model decides."""
        order = {"error": 0, "restarting": 1, "loading": 2, "stopped": 3, "ready": 4}
        worst = min((slot.status for slot in self.slots()), key=lambda s: order.get(s.state, 0))
        return worst

    def describe(self) -> dict[str, Any]:
        return {
            slot.name: {"state": slot.status.state, "message": slot.status.message}
            for slot in self.slots()
        }

    async def close(self) -> None:
        await asyncio.gather(*(slot.close() for slot in self.slots()), return_exceptions=True)
