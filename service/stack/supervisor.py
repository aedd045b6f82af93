"""Supervising a started stack: a process that exits is restarted, with back-off, and logged.

`tinyfleet up` runs `supervise` in the foreground; `tinyfleet up --detach` forks a supervisor
that holds the var dir's lock and runs it until `tinyfleet down` sends SIGTERM. A restart
repeats what the start did (for Mosquitto: its auth state rebuilt from the database first, so a
broker that crashed or lost its files comes back with exactly the registry's devices).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from service.private_files import open_private_append
from service.stack.config import StackError, StackPlan
from service.stack.lock import VarLock
from service.stack.procs import log_tail
from service.stack.runner import RunningStack, launch, start_stack

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0
STABLE_S = 60.0  # a process that ran this long starts its back-off again from FIRST_DELAY_S
WATCH_S = 10.0  # how often the rows' watch hooks run
SUPERVISOR_LOG = "supervisor.log"
Say = Callable[[str], None]


def backoff_s(attempt: int) -> float:
    """Delay before restart number `attempt` (1, 2, ...) of a process that keeps failing."""
    return float(min(FIRST_DELAY_S * 2.0 ** (attempt - 1), MAX_DELAY_S))


def timestamp() -> str:
    """Now, UTC, to the second (the supervisor log's prefix)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Supervisor:
    """Restarts the processes of `stack` that exit; `say` gets one line per event."""

    stack: RunningStack
    say: Say
    attempts: dict[str, int] = field(default_factory=dict)
    due: dict[str, float] = field(default_factory=dict)  # name -> monotonic restart time
    watched_at: float = field(default_factory=time.monotonic)

    def check(self) -> None:
        """One round: notice exits, restart what is due."""
        now = time.monotonic()
        for proc in list(self.stack.processes):
            if proc.name in self.due or proc.popen is None or proc.popen.poll() is None:
                continue
            ran_s = now - self.stack.started_at.get(proc.name, now)
            attempt = 1 if ran_s >= STABLE_S else self.attempts.get(proc.name, 0) + 1
            self.attempts[proc.name] = attempt
            delay = backoff_s(attempt)
            self.due[proc.name] = now + delay
            status = proc.popen.returncode
            self.stack.mark_exited(proc.name, status)
            tail = log_tail(proc.log_file, 5).replace("\n", "\n    ")
            self.say(f"{timestamp()} {proc.name} (pid {proc.pid}) exited with status {status} "
                     f"after {ran_s:.1f} s; restart #{attempt} in {delay:.0f} s. Last lines of "
                     f"{proc.log_file}:\n    {tail}")
        for name, when in sorted(self.due.items(), key=lambda item: item[1]):
            if when <= time.monotonic():
                self._restart(name)
        if time.monotonic() - self.watched_at >= WATCH_S:
            self.watched_at = time.monotonic()
            self._watch()

    def _watch(self) -> None:
        assert self.stack.engine is not None
        for proc in self.stack.processes:
            row = self.stack.row(proc.name)
            if row.watch is None or proc.name in self.due:
                continue
            try:
                row.watch(self.stack.plan, self.stack.engine)
            except Exception as exc:  # a failed check is logged; the next round tries again
                self.say(f"{timestamp()} {proc.name}: check failed: {type(exc).__name__}: "
                         f"{exc}")

    def _restart(self, name: str) -> None:
        row = self.stack.row(name)
        try:
            started = launch(self.stack, row)
        except StackError as exc:
            attempt = self.attempts.get(name, 0) + 1
            self.attempts[name] = attempt
            delay = backoff_s(attempt)
            self.due[name] = time.monotonic() + delay
            self.say(f"{timestamp()} {name} did not come back ({exc}); "
                     f"next try in {delay:.0f} s")
            return
        del self.due[name]
        self.stack.replace_process(started)
        self.say(f"{timestamp()} {name} restarted: pid {started.pid}")

    def run(self, stop: threading.Event, poll_s: float = 0.25) -> None:
        """Supervise until `stop` is set (or KeyboardInterrupt)."""
        while not stop.is_set():
            self.check()
            stop.wait(poll_s)


def raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    """A signal handler: stop like Ctrl-C does."""
    raise KeyboardInterrupt


def detach(plan: StackPlan, say: Say) -> int:
    """Fork a supervisor that starts the stack and keeps it running; the supervisor's pid.

    The lock is taken here, before the fork, so a second `up` fails at once; the child
    inherits it. Returns when the stack is green; StackError (the child's message) when the
    start failed, after the child has stopped what it started.
    """
    plan.var_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = VarLock(plan.var_dir).acquire()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the supervisor
        os.close(read_end)
        code = 1
        try:
            code = _supervise_detached(plan, lock, write_end)
        finally:
            os._exit(code)
    os.close(write_end)
    lock.release()  # the child's copy of the descriptor keeps the lock
    try:
        report = _read_all(read_end)
    except KeyboardInterrupt:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        raise
    finally:
        os.close(read_end)
    if report.strip() != "ok":
        os.waitpid(pid, 0)
        raise StackError(report.strip() or f"the supervisor (pid {pid}) exited during start")
    return pid


def _read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def _supervise_detached(plan: StackPlan, lock: VarLock, report_fd: int) -> int:
    """The forked supervisor: own session, output to var/log/supervisor.log."""
    os.setsid()
    lock.note_pid(os.getpid())
    log_path = plan.log_dir / SUPERVISOR_LOG
    plan.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log_fd = open_private_append(log_path)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(devnull)
    os.close(log_fd)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    signal.signal(signal.SIGTERM, raise_interrupt)
    signal.signal(signal.SIGINT, raise_interrupt)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def say(line: str) -> None:
        print(line, flush=True)

    stack = None
    try:
        say(f"{timestamp()} supervisor pid {os.getpid()} starting the stack in {plan.var_dir}")
        stack = start_stack(plan, say=say, lock=lock)
    except BaseException as exc:  # the parent gets the reason; nothing is left running
        message = str(exc) if isinstance(exc, StackError) else f"{type(exc).__name__}: {exc}"
        say(f"{timestamp()} start failed: {message}")
        _report(report_fd, message or "interrupted while starting")
        return 1
    _report(report_fd, "ok")
    try:
        Supervisor(stack, say).run(threading.Event())
    except KeyboardInterrupt:
        say(f"{timestamp()} SIGTERM: stopping")
    finally:
        for name, graceful in stack.stop():
            say(f"{timestamp()} {name} {'stopped' if graceful else 'killed after timeout'}")
    return 0


def _report(fd: int, text: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, text.encode())
    with contextlib.suppress(OSError):
        os.close(fd)


def supervisor_log(var_dir: Path) -> Path:
    """Where a detached supervisor logs."""
    return var_dir / "log" / SUPERVISOR_LOG
