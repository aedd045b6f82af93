"""One stack per var dir: an exclusive lock on var/stack.lock, held for the stack's lifetime.

The lock (flock) belongs to the open file, so the supervising process holds it as long as it
lives, and the kernel releases it when that process dies, however it dies: a crashed `up`
never leaves a stale lock behind. Two `tinyfleet up` started together on one var dir: one
gets the lock, the other fails before it has written or removed anything.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from service.private_files import PRIVATE_FILE
from service.stack.config import StackError

LOCK_FILE = "stack.lock"


class VarLock:
    """The lock on one var dir; `acquire` fails at once (StackError) when another holds it."""

    def __init__(self, var_dir: Path) -> None:
        self.path = Path(var_dir) / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    @property
    def fd(self) -> int:
        """The locked descriptor (a forked supervisor keeps the lock through it)."""
        if self._fd is None:
            raise StackError(f"{self.path} is not locked by this process")
        return self._fd

    def acquire(self) -> VarLock:
        """Take the lock without waiting; StackError naming the holder when it is taken."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            holder = self._holder()
            raise StackError(
                f"a stack from {self.path.parent} is already running or starting"
                f"{f' (supervisor pid {holder})' if holder else ''}; stop it with "
                f"`tinyfleet down --var {self.path.parent}`") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def note_pid(self, pid: int) -> None:
        """Record the process that now holds the lock (a forked supervisor)."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{pid}\n".encode(), 0)

    def release(self) -> None:
        """Release the lock (closing the file releases it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _holder(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def __enter__(self) -> VarLock:
        return self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()
