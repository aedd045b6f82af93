"""Starting, watching and stopping the stack's server processes, each in its own process group."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from service.private_files import open_private_append, private_dir
from service.stack.config import StackError

CHILD_UMASK = 0o077


@dataclass(frozen=True)
class ProcessSpec:
    """How to start one server process."""

    name: str
    argv: tuple[str, ...]
    log_file: Path
    env: Mapping[str, str] | None = None
    cwd: Path | None = None


@dataclass(frozen=True)
class Started:
    """A process we started: its pid is also its process group id (own session)."""

    name: str
    pid: int
    log_file: Path
    popen: subprocess.Popen[bytes] | None = None


def spawn(spec: ProcessSpec) -> Started:
    """Start `spec` in a new session, output appended to its log file (0600)."""
    private_dir(spec.log_file.parent)
    log = open_private_append(spec.log_file)
    try:
        popen = subprocess.Popen(
            list(spec.argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(spec.env) if spec.env is not None else None,
            cwd=spec.cwd,
            # Own session: Ctrl-C in the terminal reaches only `tinyfleet up`, which stops
            # the children in order; and `down` can signal a whole group (gunicorn's and
            # Celery's own children included) after `up` has exited.
            start_new_session=True,
            # What the servers create (logs, dumps, pid files, sockets) is theirs alone.
            umask=CHILD_UMASK,
        )
    except FileNotFoundError as exc:
        raise StackError(f"{spec.name}: cannot run {spec.argv[0]!r}: not installed") from exc
    finally:
        os.close(log)
    return Started(spec.name, popen.pid, spec.log_file, popen)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM for the duration: a second Ctrl-C must not cut a shutdown
    short and leave orphans. No-op outside the main thread (signals go to the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` is alive (zombies do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command: state ppid pgrp ...
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def stop_group(started: Started, timeout_s: float = 10.0) -> bool:
    """SIGTERM the leader, SIGKILL its group after `timeout_s`; True if it all ended by SIGTERM."""
    return stop_groups([started], timeout_s)[0]


def stop_groups(started: Sequence[Started], timeout_s: float = 10.0) -> list[bool]:
    """Stop several process groups at once; for each, True if it ended by SIGTERM.

    Only each leader gets SIGTERM: gunicorn's arbiter and Celery's main process then stop
    their own children in order. Whatever is left of a group after the timeout is killed.
    """
    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    graceful = [_wait_gone(proc, deadline) for proc in started]
    for proc, ended in zip(started, graceful, strict=True):
        if not ended:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            _wait_gone(proc, time.monotonic() + 5.0)
    return graceful


def _wait_gone(started: Started, deadline: float) -> bool:
    while True:
        if started.popen is not None:
            started.popen.poll()  # reap our child so it does not linger as a zombie
        if not group_alive(started.pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def wait_until(
    check: Callable[[], bool],
    what: str,
    timeout_s: float,
    started: Sequence[Started] = (),
) -> None:
    """Poll `check` until true; fail early, with the log's tail, if a started process exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        for proc in started:
            if proc.popen is not None and proc.popen.poll() is not None:
                raise StackError(
                    f"{proc.name} exited with status {proc.popen.returncode} while waiting "
                    f"for {what}; last lines of {proc.log_file}:\n{log_tail(proc.log_file)}"
                )
        if check():
            return
        if time.monotonic() >= deadline:
            tails = "".join(f"\n--- {p.log_file}\n{log_tail(p.log_file)}" for p in started)
            raise StackError(f"timed out after {timeout_s:.0f} s waiting for {what}{tails}")
        time.sleep(0.05)


def tcp_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = 15) -> str:
    """The last `lines` lines of a log file ('' if there is none)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
