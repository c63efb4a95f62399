"""Messages between the language server (the parent) and the rank processes.

Only token ids, sampling settings, request ids, sizes and error descriptions cross this boundary:
document text never leaves the parent. Messages are pickled by `multiprocessing.connection`, so
they are plain frozen dataclasses of this module and of `model.types`.

    parent -> rank 0            Submit, Cancel, Shutdown
    rank 0 -> ranks 1..N-1      StepWork (one per loop turn, through parallel.broadcast_object)
    every rank -> parent        Progress, Ready, Heartbeat, RankError
    rank 0 -> parent            Events, Failed
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from codellama_lsp.model.types import EngineRequest, Event

FailureKind = Literal["oom", "invalid", "internal"]


# -- parent -> rank (the first message a rank reads says who it is) ---------------------------
@dataclass(frozen=True)
class Launch:
    """Everything a rank needs to join the group; sent once, before anything else."""

    rank: int
    world_size: int
    init_method: str
    parent_pid: int
    settings: object  # a worker.settings.WorkerSettings (kept opaque here: no import cycle)


@dataclass(frozen=True)
class Submit:
    request: EngineRequest


@dataclass(frozen=True)
class Cancel:
    request_id: str


@dataclass(frozen=True)
class Shutdown:
    pass


ParentMessage = Submit | Cancel | Shutdown


# -- rank 0 -> the other ranks -----------------------------------------------------------------
@dataclass(frozen=True)
class StepWork:
    """What every rank applies before the next engine step, in this order."""

    submits: tuple[EngineRequest, ...] = ()
    cancels: tuple[str, ...] = ()
    shutdown: bool = False

    def is_empty(self) -> bool:
        return not (self.submits or self.cancels or self.shutdown)


# -- ranks -> parent ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    """Loading progress of one rank: `bytes_done` of `bytes_total` of its shard `shard`."""

    rank: int
    shard: str
    bytes_done: int
    bytes_total: int


@dataclass(frozen=True)
class ReadyInfo:
    world_size: int
    device: str
    dtype: str
    vocab_size: int
    max_seq_len: int
    max_batch_size: int
    load_seconds: float


@dataclass(frozen=True)
class Ready:
    rank: int
    info: ReadyInfo


@dataclass(frozen=True)
class Heartbeat:
    """Sent by every rank from its main loop: proof that the loop turns, not just that the
    process exists (a rank stuck in a collective stops sending them)."""

    rank: int


@dataclass(frozen=True)
class Events:
    """The events of one engine step, in order (one message per step keeps pickling cheap)."""

    events: tuple[Event, ...]


@dataclass(frozen=True)
class Failed:
    """A request that failed without taking the group down (out of memory, invalid request)."""

    request_id: str
    kind: FailureKind
    message: str
    prompt_tokens: int = 0


@dataclass(frozen=True)
class RankError:
    """A rank is about to exit because of an error. `fatal` errors (a bad checkpoint or
    setting) would fail again on restart, so the group gives up at once."""

    rank: int
    message: str
    fatal: bool = False
    details: str = field(default="", repr=False)


RankMessage = Progress | Ready | Heartbeat | Events | Failed | RankError
