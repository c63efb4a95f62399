"""`checklist.chk`: the md5 sums Meta's download.sh writes next to the weights."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from codellama_lsp.errors import CheckpointError

CHECKLIST_NAME = "checklist.chk"
_CHUNK = 1 << 22  # 4 MiB: hashing a 13 GB shard must not read it into memory

ProgressFn = Callable[[str, int, int], None]


def verify_checklist(ckpt_dir: str | Path, progress: ProgressFn | None = None) -> list[str]:
    """md5 every file listed in checklist.chk; returns their names or raises naming the bad ones."""
    folder = Path(ckpt_dir).expanduser()
    entries = read_checklist(folder / CHECKLIST_NAME)
    problems = []
    for name, want in entries:
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        got = md5_file(path, progress)
        if got != want:
            problems.append(f"{name}: md5 {got}, expected {want}")
    if problems:
        raise CheckpointError(
            f"{folder} fails its checklist ({len(problems)} of {len(entries)} files): "
            + "; ".join(problems)
            + ". Download these files again."
        )
    return [name for name, _ in entries]


def read_checklist(path: Path) -> list[tuple[str, str]]:
    """`md5sum` output lines: `<32 hex>  <name>` (or `<hex> *<name>` in binary mode)."""
    if not path.is_file():
        raise CheckpointError(
            f"no {CHECKLIST_NAME} in {path.parent}: Meta's download.sh writes one with the md5 "
            "sums of the weights (Hugging Face folders have none)"
        )
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            entries.append(_parse_line(line, path, number))
    if not entries:
        raise CheckpointError(f"{path} lists no files")
    return entries


def _parse_line(line: str, path: Path, number: int) -> tuple[str, str]:
    parts = line.strip().split(maxsplit=1)
    digest = parts[0].lower() if parts else ""
    name = parts[1].lstrip("*") if len(parts) == 2 else ""
    valid_digest = len(digest) == 32 and all(c in "0123456789abcdef" for c in digest)
    if not valid_digest or not name:
        raise CheckpointError(f"{path}, line {number}: expected '<md5>  <file name>'")
    # The names must stay inside the folder: a checklist is data, not a list of paths to read.
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts:
        raise CheckpointError(f"{path}, line {number}: {name!r} is not a file of the folder")
    return str(pure), digest


def md5_file(path: Path, progress: ProgressFn | None = None) -> str:
    digest = hashlib.md5()
    total, done = path.stat().st_size, 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(path.name, done, total)
    return digest.hexdigest()
