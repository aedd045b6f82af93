"""GET /healthz: the database, Redis, the MQTT broker and the Celery worker, each timed.

200 when every component answers, 503 otherwise; the body names each component's status,
latency and, on failure, the error.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import redis
from flask import Blueprint, current_app, jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy import text

from service.broker_files import SERVICE_SECRET_FILE, SERVICE_USERNAME
from service.queue import celery_client
from service.stack.config import redact_url

bp = Blueprint("health", __name__)

CHECK_TIMEOUT_S = 2.0
# MQTT 3.1.1 CONNACK return codes (spec 3.2.2.3) that prove a live, authenticating broker.
_CONNACK_ACCEPTED = 0
_CONNACK_BAD_CREDENTIALS = 4
_CONNACK_NOT_AUTHORIZED = 5


class HealthStatus(StrEnum):
    """Status of one component."""

    OK = "ok"
    ERROR = "error"


@dataclass(frozen=True)
class ComponentHealth:
    """The outcome of one check."""

    status: HealthStatus
    latency_ms: float
    detail: str

    def as_json(self) -> dict[str, object]:
        """The JSON form served by /healthz."""
        return {"status": self.status.value, "latency_ms": round(self.latency_ms, 2),
                "detail": self.detail}


def _timed(check: Callable[[], str]) -> ComponentHealth:
    start = time.perf_counter()
    try:
        detail = check()
    except Exception as exc:  # a failing probe, whatever the cause, is that component's state
        elapsed_ms = (time.perf_counter() - start) * 1000
        return ComponentHealth(HealthStatus.ERROR, elapsed_ms, f"{type(exc).__name__}: {exc}")
    return ComponentHealth(HealthStatus.OK, (time.perf_counter() - start) * 1000, detail)


def check_database() -> str:
    """Run SELECT 1 on the service's engine."""
    engine = current_app.extensions["tinyfleet.engine"]
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    return str(engine.dialect.name)


def check_redis() -> str:
    """PING the Redis the Celery queue uses."""
    url = current_app.config.get("REDIS_URL")
    if not url:
        raise RuntimeError("TINYFLEET_REDIS_URL is not set")
    client = redis.Redis.from_url(url, socket_timeout=CHECK_TIMEOUT_S,
                                  socket_connect_timeout=CHECK_TIMEOUT_S)
    try:
        if not client.ping():
            raise RuntimeError(f"Redis at {url} did not answer PING")
    finally:
        client.close()
    return redact_url(str(url))


def _mqtt_string(text: bytes) -> bytes:
    return struct.pack("!H", len(text)) + text


def _remaining_length(n: int) -> bytes:
    """MQTT's variable-length integer (spec 2.2.3): 7 bits a byte, high bit = more follows."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_connack(host: str, port: int, credentials: tuple[str, str] | None = None,
                 timeout_s: float = CHECK_TIMEOUT_S) -> int:
    """Send one MQTT 3.1.1 CONNECT (with `credentials` if given); the broker's CONNACK code."""
    # A fresh client id: two probes with one id would make the broker drop the older one.
    client_id = f"tinyfleet-healthz-{os.urandom(4).hex()}".encode()
    flags = 0x02  # clean session
    payload = _mqtt_string(client_id)
    if credentials is not None:
        flags |= 0xC0  # user name and password present
        payload += _mqtt_string(credentials[0].encode()) + _mqtt_string(credentials[1].encode())
    body = b"\x00\x04MQTT" + bytes([4, flags]) + struct.pack("!H", 10) + payload
    packet = b"\x10" + _remaining_length(len(body)) + body
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(packet)
        reply = b""
        while len(reply) < 4:
            chunk = sock.recv(4 - len(reply))
            if not chunk:
                raise ConnectionError(f"MQTT broker {host}:{port} closed without a CONNACK")
            reply += chunk
        if reply[0] != 0x20 or reply[1] != 2:
            raise ConnectionError(f"MQTT broker {host}:{port} sent {reply!r}, not a CONNACK")
        if reply[3] == _CONNACK_ACCEPTED:
            sock.sendall(b"\xe0\x00")  # DISCONNECT
        return reply[3]


def check_mqtt() -> str:
    """The service account logs in (when the registry has made one) and anonymous is refused."""
    host = current_app.config["MQTT_HOST"]
    port = int(current_app.config["MQTT_PORT"])
    parts = [f"{host}:{port}"]
    secret_file = Path(current_app.config["BROKER_DIR"]) / SERVICE_SECRET_FILE
    if secret_file.exists():
        code = mqtt_connack(host, port, (SERVICE_USERNAME, secret_file.read_text().strip()))
        if code != _CONNACK_ACCEPTED:
            raise PermissionError(
                f"MQTT broker {host}:{port} refused the service account {SERVICE_USERNAME!r} "
                f"(CONNACK {code}): it does not use the password file in {secret_file.parent}")
        parts.append("service account accepted")
    code = mqtt_connack(host, port)
    if code in (_CONNACK_NOT_AUTHORIZED, _CONNACK_BAD_CREDENTIALS):
        parts.append("anonymous refused")
    elif code == _CONNACK_ACCEPTED:
        parts.append("WARNING anonymous access accepted")
    else:
        raise ConnectionError(f"MQTT broker {host}:{port} refused CONNECT with code {code}")
    return ", ".join(parts)


def check_worker() -> str:
    """A Celery worker answers a broadcast ping through Redis."""
    replies = celery_client().control.ping(timeout=CHECK_TIMEOUT_S, limit=1)
    if not replies:
        raise TimeoutError(f"no Celery worker answered a ping within {CHECK_TIMEOUT_S} s")
    return ", ".join(sorted(name for reply in replies for name in reply))


@bp.get("/healthz")
def healthz() -> ResponseReturnValue:
    """Each component's status and latency; 200 when all are ok, 503 otherwise."""
    components = {
        "database": _timed(check_database),
        "redis": _timed(check_redis),
        "mqtt": _timed(check_mqtt),
    }
    if components["redis"].status is HealthStatus.OK:
        components["worker"] = _timed(check_worker)
    else:
        # Without Redis a control ping would only hang until its timeout.
        components["worker"] = ComponentHealth(HealthStatus.ERROR, 0.0, "Redis is unreachable")
    healthy = all(c.status is HealthStatus.OK for c in components.values())
    body = {"status": "ok" if healthy else "error",
            "components": {name: c.as_json() for name, c in components.items()}}
    return jsonify(body), 200 if healthy else 503
