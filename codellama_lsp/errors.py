"""Typed errors of codellama-lsp.

Every failure a user can cause or meet is one of these. They carry a message meant for a person
(no traceback needed to understand it); the LSP layer maps them to JSON-RPC errors in one place and
the CLI prints them and exits non-zero.
"""

from __future__ import annotations


class CodeLlamaError(Exception):
    """Base class of every error this package raises on purpose."""


class CheckpointError(CodeLlamaError):
    """A checkpoint folder is missing, incomplete, corrupt or inconsistent."""


class CheckpointChangedError(CheckpointError):
    """A checkpoint file changed (truncated, deleted, replaced) while it was loaded; loading again
    may succeed once the files are whole."""


class TokenizerError(CheckpointError):
    """The tokenizer file is missing, unreadable or disagrees with the model."""


class ConfigError(CodeLlamaError):
    """A setting has an invalid value."""


class PromptError(CodeLlamaError):
    """A prompt cannot be built (dialog of the wrong shape, too long, refused tags)."""


class WorkerError(CodeLlamaError):
    """The worker group failed to serve a request."""


class WorkerRestartingError(WorkerError):
    """The worker group is restarting after a fault; try again shortly."""


class WorkerNotReadyError(WorkerError):
    """The model is still loading."""


class OutOfMemoryError(WorkerError):
    """The accelerator ran out of memory for this request; the group stays healthy."""


class RequestCancelledError(CodeLlamaError):
    """The request was cancelled (by the client or by a newer request). Not a failure."""
