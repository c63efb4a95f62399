"""Typed errors -> JSON-RPC errors, in one place.

Handlers are wrapped with `mapped_errors`. Cancellation (by the client or by a newer request) is
silent: the handler's task ends as cancelled and pygls answers -32800 without logging. Every other
error keeps the message of `codellama_lsp.errors`, written for a person; unexpected exceptions
become -32603 with a generic message (details go to the log, never document text).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from lsprotocol.types import ErrorCodes, LSPErrorCodes
from pygls.exceptions import JsonRpcException

from codellama_lsp.errors import (
    CodeLlamaError,
    ConfigError,
    PromptError,
    RequestCancelledError,
    WorkerError,
)

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


class InvalidParamsError(CodeLlamaError):
    """A request's parameters have the wrong shape (e.g. a command's arguments)."""


class ContentModifiedError(CodeLlamaError):
    """The document changed while the request ran; its result would be wrong."""


def error_code(exc: BaseException) -> int:
    if isinstance(exc, InvalidParamsError | ConfigError):
        return int(ErrorCodes.InvalidParams)
    if isinstance(exc, ContentModifiedError):
        return int(LSPErrorCodes.ContentModified)
    if isinstance(exc, WorkerError | PromptError | CodeLlamaError):
        return int(LSPErrorCodes.RequestFailed)
    return int(ErrorCodes.InternalError)


def to_jsonrpc(exc: BaseException) -> JsonRpcException:
    code = error_code(exc)
    if code == ErrorCodes.InternalError:
        message = f"codellama-lsp: internal error ({type(exc).__name__}); see the server log"
    else:
        message = str(exc) or type(exc).__name__
    return JsonRpcException(code=code, message=message)


def mapped_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Wrap an async handler so that every error leaves it as the right JSON-RPC error."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except RequestCancelledError:
            raise asyncio.CancelledError() from None
        except JsonRpcException:
            raise
        except CodeLlamaError as exc:
            raise to_jsonrpc(exc) from exc
        except Exception as exc:
            log.exception("unexpected error in %s", fn.__name__)
            raise to_jsonrpc(exc) from exc

    return wrapper
