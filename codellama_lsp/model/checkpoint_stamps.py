"""Checkpoint files that change while they are read.

Shards are mmapped. A file truncated under a rank that is copying from it kills the rank with
SIGBUS (the worker supervisor then names the shard); a file deleted, replaced or rewritten while
it is read would otherwise go unnoticed, or leave ranks holding parts of two different files.
`stamp` records what identifies a file's content cheaply (device, inode, size, modification time)
when the folder is inspected; `check_unchanged` compares once the weights were read, or when
reading failed, so a load that did not see one consistent set of files fails and says which
file changed. Such a failure is worth a retry: the files may be whole again by then.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from codellama_lsp.errors import CheckpointChangedError


@dataclass(frozen=True)
class FileStamp:
    path: Path
    device: int
    inode: int
    size: int
    mtime_ns: int


def stamp(path: Path) -> FileStamp:
    try:
        st = path.stat()
    except FileNotFoundError as exc:  # listed a moment ago: gone between the listing and now
        message = f"the checkpoint shard {path} was deleted while loading"
        raise CheckpointChangedError(message) from exc
    return FileStamp(path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def change_since(before: FileStamp) -> str | None:
    """How the file changed since its stamp was taken, in words; None when it looks the same."""
    try:
        st = before.path.stat()
    except FileNotFoundError:
        return "was deleted while loading"
    if (st.st_dev, st.st_ino) != (before.device, before.inode):
        return "was replaced by another file while loading"
    if st.st_size != before.size:
        return f"changed or was truncated while loading ({before.size} bytes, now {st.st_size})"
    if st.st_mtime_ns != before.mtime_ns:
        return "was modified while loading"
    return None


def check_unchanged(stamps: Iterable[FileStamp]) -> None:
    for before in stamps:
        change = change_since(before)
        if change is not None:
            raise CheckpointChangedError(f"the checkpoint shard {before.path} {change}")
