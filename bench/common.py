"""What every bench script shares: the environment, figures as records, the table, timing.

A record is one figure: {name, value, unit, pct_of_floor, card, torch, cuda, date, command} (and
an optional note). Scripts append each record, as soon as it is measured, to one JSON list
(`--json`), so run_all.sh gathers a whole device call in one file, even one cut short.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
# The tokenizer does not travel with ../shared to the device machine: run_all.sh's callers carry a
# copy in .bench-assets/ (ignored by git).
TOKENIZER_CANDIDATES = (
    REPO / ".bench-assets" / "codellama-tokenizer.model",
    REPO.parent / "shared" / "fixtures" / "codellama-tokenizer.model",
)


@dataclass
class Record:
    name: str
    value: float
    unit: str
    pct_of_floor: float | None
    card: str
    torch: str
    cuda: str | None
    date: str
    command: str
    note: str | None = None


def environment(device: torch.device) -> dict[str, Any]:
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "card": card,
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python " + shlex.join(sys.argv),
    }


def _cpu_name() -> str:
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


class Results:
    """Figures of one script run; printed as a table and appended to the JSON list."""

    def __init__(self, device: torch.device, json_path: Path | None) -> None:
        self.env = environment(device)
        self.json_path = json_path
        self.records: list[Record] = []

    def add(
        self, name: str, value: float, unit: str, pct: float | None = None, note: str | None = None
    ) -> Record:
        pct_r = None if pct is None else round(pct, 1)
        record = Record(name, _round(value), unit, pct_r, **self.env, note=note)
        self.records.append(record)
        if self.json_path is not None:  # at once: a run killed at its time limit keeps its figures
            append_records(self.json_path, [asdict(record)])
        print(f"  {name:<44} {record.value:>12} {unit:<8} {_pct(pct_r)} {note or ''}", flush=True)
        return record

    def finish(self) -> None:
        print(self.table(), flush=True)

    def table(self) -> str:
        env = self.env
        head = f"\n{env['card']} | torch {env['torch']} | CUDA {env['cuda']} | {env['date']}"
        rows = [f"| {'figure':<44} | {'value':>12} | {'unit':<8} | {'% floor':>7} |"]
        rows.append(f"|{'-' * 46}|{'-' * 14}|{'-' * 10}|{'-' * 9}|")
        for r in self.records:
            rows.append(f"| {r.name:<44} | {r.value:>12} | {r.unit:<8} | {_pct(r.pct_of_floor)} |")
        return "\n".join([head, *rows])


def _round(value: float) -> float:
    return float(f"{value:.4g}") if abs(value) < 1e4 else round(value, 1)


def _pct(pct: float | None) -> str:
    return f"{pct:>6.1f}%" if pct is not None else f"{'-':>7}"


def append_records(path: Path, records: list[dict[str, Any]]) -> None:
    existing = json.loads(path.read_text()) if path.is_file() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(existing + records, indent=1) + "\n")


# -- timing ----------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call, the device's queue drained before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def median_time(
    fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1
) -> float:
    """Median seconds of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(wall(fn, device) for _ in range(repeats))


# -- arguments -------------------------------------------------------------------------------------
def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--json", type=Path, default=None, help="append records to this file")
    return parser


def find_tokenizer(given: Path | None) -> Path:
    for path in (given, *TOKENIZER_CANDIDATES):
        if path is not None and path.is_file():
            return path
    raise SystemExit(f"no tokenizer.model: pass --tokenizer (looked in {TOKENIZER_CANDIDATES})")


def load_for_bench(run: argparse.Namespace) -> tuple[torch.device, Results, Any]:
    """The device, the results and `run.ckpt_dir`'s model in one process (bf16; float32 with
    `--tiny`), for the scripts that time one model."""
    from codellama_lsp.model import parallel
    from codellama_lsp.model.checkpoint import load_model

    device = torch.device(run.device)
    parallel.init_single_process()
    out = Results(device, run.json)
    dtype = torch.float32 if run.tiny else torch.bfloat16
    return device, out, load_model(run.ckpt_dir, device=device, dtype=dtype)[0]
