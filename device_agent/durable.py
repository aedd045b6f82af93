"""Durable file writes with every durability boundary named, so that tests can crash at each.

A boundary is one system call whose effect survives a crash on its own: writing a file's
bytes, fsyncing it, renaming it into place, fsyncing its directory, unlinking. Every one goes
through a `Disk`, which calls its `boundary` hook *before* the call with a name such as
`write:B/image.tfimg.tmp`. The kill -9 test sets `TINYFLEET_AGENT_CRASH_AT=N` so that the
N-th boundary SIGKILLs the process (see `crash_hook_from_env`); `TINYFLEET_AGENT_BOUNDARIES=F`
appends each boundary's name to F, which is how the test enumerates them.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

Hook = Callable[[str], None]
CRASH_ENV = "TINYFLEET_AGENT_CRASH_AT"
RECORD_ENV = "TINYFLEET_AGENT_BOUNDARIES"


def _no_hook(name: str) -> None:
    """Boundaries pass silently in production."""


class Disk:
    """Writes, fsyncs, renames and unlinks under one root, each announced to `boundary`."""

    def __init__(self, root: Path, boundary: Hook | None = None) -> None:
        self.root = root
        self.boundary = boundary or _no_hook

    def _name(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def write(self, path: Path, data: bytes) -> None:
        """Write `data` to `path` (created or truncated) and fsync it: two boundaries."""
        self.boundary(f"write:{self._name(path)}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            self.boundary(f"fsync:{self._name(path)}")
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: Path, dst: Path) -> None:
        """Atomically replace `dst` by `src`, then fsync the directory: two boundaries."""
        self.boundary(f"rename:{self._name(dst)}")
        os.replace(src, dst)
        self.fsync_dir(dst.parent)

    def fsync_dir(self, directory: Path) -> None:
        """fsync a directory so that renames and unlinks in it survive a power cut."""
        self.boundary(f"fsync-dir:{self._name(directory) or '.'}")
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def atomic_write(self, path: Path, data: bytes) -> None:
        """Write a temp file beside `path`, fsync, rename over `path`, fsync the directory."""
        tmp = path.with_name(path.name + ".tmp")
        self.write(tmp, data)
        self.rename(tmp, path)

    def unlink(self, path: Path) -> None:
        """Remove a file if it exists (one boundary, then the directory's fsync)."""
        if not path.exists():
            return
        self.boundary(f"unlink:{self._name(path)}")
        path.unlink()
        self.fsync_dir(path.parent)


def crash_hook_from_env(environ: dict[str, str] | None = None) -> Hook | None:
    """The test hook the environment asks for (crash at boundary N, record names), or None."""
    env = dict(os.environ if environ is None else environ)
    crash_at = env.get(CRASH_ENV)
    record = env.get(RECORD_ENV)
    if crash_at is None and record is None:
        return None
    target = None if crash_at is None else int(crash_at)
    count = [0]

    def hook(name: str) -> None:
        if record is not None:
            with open(record, "a", encoding="utf-8") as f:
                f.write(name + "\n")
        if target is not None and count[0] == target:
            os.kill(os.getpid(), signal.SIGKILL)
        count[0] += 1

    return hook
