"""The state file of a running stack (var/stack.json): its supervisor and its process groups.

Only the holder of the var dir's lock (service/stack/lock.py) writes it; `down` and
`status` read it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from service.private_files import PRIVATE_FILE
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
    restarts: int = 0  # how often the supervisor has restarted it
    last_exit: int | None = None  # the status it last exited with (negative: signal)
    state: str = "running"  # running | restarting (exited, a restart is scheduled)

    def is_ours(self) -> bool:
        """Whether `pid` still is the process we started (pids get reused)."""
        return process_start_ticks(self.pid) == self.start_ticks or (
            self.start_ticks == 0 and group_alive(self.pid)
        )


@dataclass(frozen=True)
class StackState:
    """The whole state file: the supervising process (if any) and the supervised ones."""

    supervisor: ProcessRecord | None
    processes: list[ProcessRecord]


def process_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (/proc/PID/stat field 22), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields_ = stat[stat.rfind(")") + 2 :].split()
    return int(fields_[19])


def _record(entry: dict[str, Any]) -> ProcessRecord:
    known = {f.name for f in fields(ProcessRecord)}
    return ProcessRecord(**{k: v for k, v in entry.items() if k in known})


def read_stack_state(path: Path) -> StackState:
    """The state file's content; empty when there is none."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return StackState(None, [])
    except (OSError, ValueError) as exc:
        raise StackError(f"state file {path} is unreadable: {exc}") from exc
    supervisor = raw.get("supervisor")
    return StackState(_record(supervisor) if supervisor else None,
                      [_record(entry) for entry in raw.get("processes", [])])


def read_state(path: Path) -> list[ProcessRecord]:
    """The supervised processes' records; [] when there is no state file."""
    return read_stack_state(path).processes


def write_state(path: Path, records: list[ProcessRecord],
                supervisor: ProcessRecord | None = None) -> None:
    """Replace the state file atomically (0600), so `down` never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    body: dict[str, Any] = {"processes": [asdict(r) for r in records]}
    if supervisor is not None:
        body["supervisor"] = asdict(supervisor)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(body, indent=2) + "\n")
    os.replace(tmp, path)
