"""What the scripts and the end-to-end tests share when they drive a real server: its processes
as /proc shows them, and pygls' answers as plain data.

Scripts import it from their own folder; the tests find it through pytest's `pythonpath`
(pyproject.toml). Linux only, like the rank processes' death signal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def child_pids(pid: int) -> list[int]:
    """The direct children of `pid` (the model ranks of a server)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper holds nothing and counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def rss_kib(pid: int) -> int:
    """Resident memory of a process (VmRSS), 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def plain(value: Any) -> Any:
    """pygls' client turns JSON objects of unknown shape into named tuples: back to dicts."""
    if hasattr(value, "_asdict"):
        return {k: plain(v) for k, v in value._asdict().items()}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value
