"""A real PostgreSQL for tests: initdb into a temporary directory, started on a free port.

Run as the unprivileged `postgres` user when the tests run as root (PostgreSQL refuses root).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PG_BIN_DIRS = [Path("/usr/lib/postgresql/15/bin"), *sorted(
    Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)]
START_TIMEOUT_S = 30.0


def pg_bin() -> Path | None:
    """The directory holding initdb and postgres, None when PostgreSQL is not installed."""
    for d in PG_BIN_DIRS:
        if (d / "initdb").exists() and (d / "postgres").exists():
            return d
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    """A running postgres with trust authentication on 127.0.0.1."""

    root: Path
    port: int
    proc: subprocess.Popen[bytes]

    def url(self, database: str) -> str:
        """SQLAlchemy URL of `database` (psycopg 3)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database `name`, return its URL."""
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then remove the data directory."""
        if self.proc.poll() is None:
            self.proc.send_signal(2)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)


def _as_postgres() -> dict[str, Any]:
    """Popen arguments that drop root to `postgres` (PostgreSQL refuses to run as root)."""
    if os.geteuid() != 0:
        return {}
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no `postgres` user to run PostgreSQL as")
    # Popen's own user/group switch: no wrapper process between us and postgres, so
    # signals reach the postmaster itself.
    return {"user": "postgres", "group": "postgres", "extra_groups": []}


def start_postgres() -> PostgresServer:
    """initdb + postgres on a free port; skips the test when PostgreSQL is not installed."""
    bindir = pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries not found (apt-get install postgresql)")
    as_user = _as_postgres()
    owner = (pwd.getpwnam('postgres').pw_uid, pwd.getpwnam('postgres').pw_gid) if as_user \
        else None
    root = Path(tempfile.mkdtemp(prefix="tinyfleet-pg-"))
    root.chmod(0o755)  # the postgres user must reach its data directory
    data, sockets = root / "data", root / "sock"
    for d in (data, sockets):
        d.mkdir()
        if owner is not None:
            os.chown(d, *owner)
    subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", "postgres",
                    "--auth=trust", "-E", "UTF8", "--no-sync", "--locale=C"],
                   check=True, capture_output=True, timeout=120, cwd=root, **as_user)
    port = _free_port()
    log = open(root / "postgres.log", "wb")  # noqa: SIM115  (the child keeps it open)
    # Durability settings off: a test database is thrown away.
    proc = subprocess.Popen(
        [str(bindir / "postgres"), "-D", str(data), "-p", str(port),
         "-k", str(sockets), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
         "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
        stdout=subprocess.DEVNULL, stderr=log, cwd=root, **as_user)
    log.close()
    server = PostgresServer(root, port, proc)
    deadline = time.monotonic() + START_TIMEOUT_S
    import psycopg

    while True:
        try:
            psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres",
                            connect_timeout=1).close()
            return server
        except psycopg.OperationalError:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = (root / "postgres.log").read_text(errors="replace")[-2000:]
                server.stop()
                raise RuntimeError(f"postgres did not start on port {port}:\n{tail}") from None
            time.sleep(0.1)
