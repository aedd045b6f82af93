"""The state file of a running stack (var/stack.json): which process groups belong to it."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from service.stack.config import StackError
from service.stack.procs import group_alive


@dataclass(frozen=True)
class ProcessRecord:
    """One started server: its pid (= process group id) and the kernel's start time of it."""

    name: str
    pid: int
    start_ticks: int
    address: str
    log_file: str

    def is_ours(self) -> bool:
        """Whether `pid` still is the process we started (pids get reused)."""
        return process_start_ticks(self.pid) == self.start_ticks or (
            self.start_ticks == 0 and group_alive(self.pid)
        )


def process_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (/proc/PID/stat field 22), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return int(fields[19])


def read_state(path: Path) -> list[ProcessRecord]:
    """The records of the state file; [] when there is none."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise StackError(f"state file {path} is unreadable: {exc}") from exc
    return [ProcessRecord(**entry) for entry in raw.get("processes", [])]


def write_state(path: Path, records: list[ProcessRecord]) -> None:
    """Replace the state file atomically, so `down` never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"processes": [asdict(r) for r in records]}, indent=2) + "\n")
    os.replace(tmp, path)
