"""Files and folders only their owner can read: the database, logs, secrets, state files.

The var dir holds password and token hashes, signing keys and the brokers' secrets, so what
tinyfleet creates there is 0600 in 0700 folders, whatever the umask. One exception: when
Mosquitto is started by root it drops to user `mosquitto`, which must traverse the var dir to
reach its own folder, so the var dir is then 0711 (others may pass through, never list or read).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
TRAVERSABLE_DIR = 0o711


def private_dir(path: Path, mode: int | None = None) -> Path:
    """Create `path` and missing parents 0700; with `mode`, also set it on `path` if ours.

    Without `mode` an existing folder keeps its mode (a var dir may be 0711 on purpose).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    if mode is not None:
        st = path.stat()
        if st.st_uid == os.geteuid() and (st.st_mode & 0o777) != mode:
            os.chmod(path, mode)
    return path


def create_private(path: Path) -> bool:
    """Create an empty 0600 file at `path` unless it exists; True when this call created it.

    Pre-creating a file before a library opens it (SQLite, a log) is how it gets mode 0600:
    SQLite then also gives its -wal and -shm files the database file's mode.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def open_private_append(path: Path) -> int:
    """An append-only descriptor on `path`, created 0600 (an existing file keeps its mode)."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, PRIVATE_FILE)


def write_private(path: Path, text: str, owner: tuple[int, int] | None = None) -> None:
    """Replace `path` with `text` atomically (temporary file + rename), mode 0600.

    `owner` (uid, gid) hands the file to another user, e.g. Mosquitto's; only root can.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            if owner is not None:
                os.fchown(f.fileno(), *owner)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def read_or_create_secret(path: Path, nbytes: int = 24) -> str:
    """The secret stored in `path`, created (0600, random, URL-safe) on first use.

    Two processes racing to create it agree, and neither ever reads it half-written: the
    secret is written to a file of its own first, then linked to `path` (a link is created
    whole or not at all); the loser of the link reads the winner's.
    """
    path = Path(path)
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    private_dir(path.parent)
    secret = secrets.token_urlsafe(nbytes)
    staged = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        try:
            os.link(staged, path)
        except FileExistsError:
            winner = path.read_text().strip()
            if not winner:
                raise RuntimeError(f"{path} exists but is empty: remove it to make a new "
                                   "secret") from None
            return winner
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
    return secret
