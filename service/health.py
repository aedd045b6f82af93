"""GET /healthz: the database, Redis, the MQTT broker and the Celery worker, each timed.

200 when every component answers, 503 otherwise; the body names each component's status,
latency and, on failure, the error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import redis
from flask import Blueprint, current_app, jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy import text

from service.broker_control import (
    CONNACK_ACCEPTED,
    CONNACK_BAD_CREDENTIALS,
    CONNACK_NOT_AUTHORIZED,
    BrokerEndpoint,
    mqtt_connack,
)
from service.broker_files import SERVICE_SECRET_FILE, SERVICE_USERNAME
from service.queue import celery_client
from service.stack.config import redact_url

bp = Blueprint("health", __name__)

CHECK_TIMEOUT_S = 2.0


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


def check_mqtt() -> str:
    """Devices' listener refuses anonymous logins; the service account logs in (when made).

    The service account logs in where the service's own clients do: the broker's local
    socket when it has one (over TCP, where the client id becomes the username, a probe would
    take over a long-lived service connection of the same account).
    """
    host = current_app.config["MQTT_HOST"]
    port = int(current_app.config["MQTT_PORT"])
    broker_dir = Path(current_app.config["BROKER_DIR"])
    tcp = BrokerEndpoint(host, port)
    parts = [f"{host}:{port}"]
    secret_file = broker_dir / SERVICE_SECRET_FILE
    if secret_file.exists():
        local = BrokerEndpoint.for_broker_dir(broker_dir, host, port)
        code = mqtt_connack(local, (SERVICE_USERNAME, secret_file.read_text().strip()),
                            CHECK_TIMEOUT_S)
        if code != CONNACK_ACCEPTED:
            raise PermissionError(
                f"MQTT broker {local} refused the service account {SERVICE_USERNAME!r} "
                f"(CONNACK {code}): it does not use the password file in {secret_file.parent}")
        parts.append(f"service account accepted{' on ' + str(local) if local.unix_path else ''}")
    code = mqtt_connack(tcp, None, CHECK_TIMEOUT_S)
    if code in (CONNACK_NOT_AUTHORIZED, CONNACK_BAD_CREDENTIALS):
        parts.append("anonymous refused")
    elif code == CONNACK_ACCEPTED:
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
