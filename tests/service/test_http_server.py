"""Through the stack's real web server (gunicorn with service.gunicorn_conf): long URIs and
large bodies get a problem+json answer that the client actually receives."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from service import db
from service.auth import create_token
from service.models import Role
from service.stack.config import free_port
from service.stack.procs import tcp_open
from tests.servers import wait_for

pytestmark = pytest.mark.integration

LIMIT = 32 * 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """gunicorn (1 sync worker, the stack's config) on a free port; (port, admin token)."""
    var = tmp_path_factory.mktemp("web") / "var"
    url = f"sqlite:///{var / 'tinyfleet.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    with db.make_sessionmaker(engine)() as session:
        _, token = create_token(session, Role.ADMIN, "web")
        session.commit()
    engine.dispose()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINYFLEET_")}
    env.update(TINYFLEET_VAR_DIR=str(var), TINYFLEET_SYNC_BROKER_FILES="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--config", "python:service.gunicorn_conf",
         "--bind", f"127.0.0.1:{port}", "--workers", "1", "service.app:create_app()"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(var / "web.log", "wb"))  # noqa: SIM115
    try:
        assert wait_for(lambda: tcp_open("127.0.0.1", port), 60), (var / "web.log").read_text()
        yield port, token
    finally:
        proc.terminate()
        proc.wait(20)


def send(port: int, method: str, path: str, token: str, body: object = None,
         headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, object]]:
    """One request; (status, content type, JSON body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, body=body,  # type: ignore[arg-type]
                     headers={"Authorization": f"Bearer {token}", **(headers or {})})
        response = conn.getresponse()
        return (response.status, response.getheader("Content-Type") or "",
                json.loads(response.read() or b"null"))
    finally:
        conn.close()


@pytest.mark.parametrize("length", [4_200, 9_000, 20_000])
def test_long_uris_get_problem_json_414(server: tuple[int, str], length: int) -> None:
    # Up to gunicorn's 8190-byte request line the app answers; beyond, gunicorn's worker.
    port, token = server
    status, kind, body = send(port, "GET", "/api/v1/devices?tag=" + "a" * length, token)
    assert (status, kind) == (414, "application/problem+json")
    assert body["errors"][0]["field"] == "uri"  # type: ignore[index]


def test_bodies_over_32_mb_get_413_not_a_broken_pipe(server: tuple[int, str]) -> None:
    port, token = server
    big = b'{"devices": [' + b" " * (LIMIT + 1024) + b"]}"
    status, kind, body = send(port, "POST", "/api/v1/devices/bulk", token, big,
                              {"Content-Type": "application/json"})
    assert (status, kind) == (413, "application/problem+json")
    assert str(LIMIT) in str(body["detail"])
    # The same without Content-Length (chunked): refused once the limit is read.
    chunks = (b" " * (1 << 20) for _ in range(40))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/api/v1/devices/bulk", body=chunks, encode_chunked=True,
                     headers={"Authorization": f"Bearer {token}",
                              "Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 413
        assert response.getheader("Content-Type") == "application/problem+json"
    finally:
        conn.close()
    # The server is fine afterwards.
    assert send(port, "GET", "/api/v1/devices", token)[0] == 200


def test_malformed_requests_get_problem_json(server: tuple[int, str]) -> None:
    port, _token = server
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /api/v1/devices HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n")
        answer = sock.recv(65536).decode("latin-1")
    head, _, body = answer.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 400") and "application/problem+json" in head
    assert json.loads(body)["errors"][0]["field"] == "headers"


def test_web_log_has_no_tracebacks(server: tuple[int, str], tmp_path_factory: pytest.TempPathFactory
                                   ) -> None:
    log = next(Path(tmp_path_factory.getbasetemp()).glob("web*/var/web.log"))
    assert "Traceback" not in log.read_text()
