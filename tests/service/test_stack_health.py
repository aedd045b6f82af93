"""GET /healthz against real Redis, Mosquitto and Celery worker processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from service.app import create_app
from service.stack.config import free_port
from tests.servers import CeleryWorker, MosquittoServer

pytestmark = pytest.mark.integration


def make_app(tmp_path: Path, redis_url: str, mqtt_port: int) -> Flask:
    """The service with its own SQLite database and the given Redis and broker."""
    return create_app({"VAR_DIR": str(tmp_path), "REDIS_URL": redis_url,
                       "MQTT_HOST": "127.0.0.1", "MQTT_PORT": mqtt_port})


def healthz(app: Flask) -> tuple[int, dict[str, Any]]:
    """Status code and JSON body of GET /healthz."""
    response = app.test_client().get("/healthz")
    body: dict[str, Any] = response.get_json()
    return response.status_code, body


def test_all_components_green(tmp_path: Path, celery_worker: CeleryWorker,
                              mosquitto_server: MosquittoServer) -> None:
    status, body = healthz(make_app(tmp_path, celery_worker.redis_url, mosquitto_server.port))
    assert status == 200, body
    assert body["status"] == "ok"
    assert set(body["components"]) == {"database", "redis", "mqtt", "worker"}
    for name, component in body["components"].items():
        assert component["status"] == "ok", (name, component)
        assert 0 <= component["latency_ms"] < 5000
    assert "anonymous refused" in body["components"]["mqtt"]["detail"]


def test_unreachable_redis_and_broker_are_reported_with_503(
        tmp_path: Path, mosquitto_server: MosquittoServer) -> None:
    closed = free_port()  # nothing listens there
    status, body = healthz(make_app(tmp_path, f"redis://127.0.0.1:{closed}/0", closed))
    assert status == 503
    components = body["components"]
    assert components["database"]["status"] == "ok"
    for name in ("redis", "mqtt", "worker"):
        assert components[name]["status"] == "error", (name, components[name])
    assert "Connection" in components["redis"]["detail"]
    assert components["worker"]["detail"] == "Redis is unreachable"
