"""GET /healthz against real Redis, Mosquitto and Celery worker processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from service.app import create_app
from service.broker_control import remaining_length
from service.broker_files import SERVICE_SECRET_FILE
from service.broker_sync import full_sync
from service.stack.config import free_port
from tests.servers import CeleryWorker, MosquittoServer, wait_for


def make_app(tmp_path: Path, redis_url: str, mqtt_port: int) -> Flask:
    """The service with its own SQLite database and the given Redis and broker."""
    return create_app({"VAR_DIR": str(tmp_path), "REDIS_URL": redis_url,
                       "MQTT_HOST": "127.0.0.1", "MQTT_PORT": mqtt_port})


def healthz(app: Flask) -> tuple[int, dict[str, Any]]:
    """Status code and JSON body of GET /healthz."""
    response = app.test_client().get("/healthz")
    body: dict[str, Any] = response.get_json()
    return response.status_code, body


@pytest.mark.integration
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


@pytest.mark.integration
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


@pytest.mark.integration
def test_mqtt_check_logs_in_as_the_service_account(
        tmp_path: Path, mosquitto_server: MosquittoServer) -> None:
    files = mosquitto_server.files
    app = create_app({"VAR_DIR": str(tmp_path), "BROKER_DIR": str(files.broker_dir),
                      "MOSQUITTO_PID_FILE": str(files.pid_file), "MQTT_HOST": "127.0.0.1",
                      "MQTT_PORT": mosquitto_server.port})
    full_sync(app.extensions["tinyfleet.engine"], mosquitto_server.target)

    def mqtt() -> dict[str, Any]:
        component: dict[str, Any] = healthz(app)[1]["components"]["mqtt"]
        return component

    assert wait_for(lambda: mqtt()["status"] == "ok", 5, 0.1), mqtt()
    # The service account logs in on the broker's local socket, where the service's clients do.
    assert mqtt()["detail"].endswith(f"service account accepted on {files.socket_file}, "
                                     "anonymous refused")

    # A broker that does not read our password file fails the check, naming the account.
    other = tmp_path / "other-broker"
    other.mkdir()
    (other / SERVICE_SECRET_FILE).write_text("not-the-password\n")
    app.config["BROKER_DIR"] = str(other)
    failed = mqtt()
    assert failed["status"] == "error"
    assert "refused the service account 'tinyfleet-service'" in failed["detail"]


@pytest.mark.unit
@pytest.mark.parametrize(("n", "encoded"), [(0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"),
                                            (16_383, b"\xff\x7f"), (16_384, b"\x80\x80\x01")])
def test_mqtt_remaining_length_encoding(n: int, encoded: bytes) -> None:
    assert remaining_length(n) == encoded  # the examples of MQTT 3.1.1, table 2.4
