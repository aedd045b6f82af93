"""The broker follows the registry: a real Mosquitto started with the stack's generated config,
devices registered and decommissioned through the REST API, MQTT clients over TCP."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from service.app import create_app
from service.auth import create_token
from service.broker_files import SERVICE_USERNAME, service_password, sync_broker_files
from service.models import Role
from tests.mqtt_probe import MqttProbe, connack
from tests.servers import MosquittoServer, wait_for

pytestmark = pytest.mark.integration

RELOAD_TIMEOUT_S = 5.0
SILENCE_S = 1.0  # how long a message that must not arrive is waited for


@pytest.fixture(scope="module")
def app(mosquitto_server: MosquittoServer) -> Iterator[Flask]:
    """The service, writing its broker files where the broker reads them, SIGHUP on change."""
    with tempfile.TemporaryDirectory(prefix="tinyfleet-broker-test-") as var:
        files = mosquitto_server.files
        app = create_app({
            "VAR_DIR": var,
            "DATABASE_URL": f"sqlite:///{Path(var) / 'registry.db'}",
            "BROKER_DIR": str(files.broker_dir),
            "MOSQUITTO_PID_FILE": str(files.pid_file),
            "MQTT_HOST": mosquitto_server.host,
            "MQTT_PORT": mosquitto_server.port,
        })
        # As `tinyfleet up` does before it starts the broker: files from the (empty) registry.
        with app.app_context():
            session = app.extensions["tinyfleet.sessionmaker"]()
            sync_broker_files(session, files.broker_dir, files.pid_file)
            session.close()
        yield app


@pytest.fixture(scope="module")
def api(app: Flask) -> FlaskClient:
    """A test client that sends an admin token and has created fleet `lab`."""
    with app.app_context():
        session = app.extensions["tinyfleet.sessionmaker"]()
        _, secret = create_token(session, Role.ADMIN, name="broker-tests")
        session.commit()
        session.close()
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {secret}"
    response = client.post("/api/v1/fleets", json={"name": "lab"})
    assert response.status_code == 201, response.get_json()
    return client


def register(api: FlaskClient, name: str, mcu: str = "stm32f746") -> tuple[str, str]:
    """Register a device through the API; (MQTT username, password)."""
    response = api.post("/api/v1/devices", json={"name": name, "fleet": "lab", "mcu": mcu})
    assert response.status_code == 201, response.get_json()
    mqtt: dict[str, Any] = response.get_json()["mqtt"]
    return mqtt["username"], mqtt["password"]


def accepted_soon(broker: MosquittoServer, username: str, password: str) -> bool:
    """Whether the broker accepts these credentials once it has reloaded (SIGHUP is async)."""
    return wait_for(lambda: _accepted(broker, username, password), RELOAD_TIMEOUT_S, 0.1)


def _accepted(broker: MosquittoServer, username: str, password: str) -> bool:
    code = connack(broker.host, broker.port, username, password)
    return code is not None and not code.is_failure


@pytest.fixture()
def service_probe(mosquitto_server: MosquittoServer) -> Iterator[MqttProbe]:
    """The service account, connected (its password lives beside the broker files)."""
    password = service_password(mosquitto_server.files.broker_dir)
    assert accepted_soon(mosquitto_server, SERVICE_USERNAME, password)
    probe = MqttProbe(mosquitto_server.host, mosquitto_server.port, SERVICE_USERNAME, password)
    yield probe
    probe.close()


def test_registered_device_publishes_and_the_service_receives(
        api: FlaskClient, mosquitto_server: MosquittoServer, service_probe: MqttProbe) -> None:
    device_id, password = register(api, "pub-1")
    assert accepted_soon(mosquitto_server, device_id, password)
    service_probe.subscribe("tinyfleet/v1/+/evt")
    device = MqttProbe(mosquitto_server.host, mosquitto_server.port, device_id, password)
    try:
        assert device.accepted
        event = json.dumps({"state": "online"}).encode()
        device.publish(f"tinyfleet/v1/{device_id}/evt", event)
        message = service_probe.next_message()
        assert message is not None, "the service account received nothing"
        assert (message.topic, message.payload) == (f"tinyfleet/v1/{device_id}/evt", event)
    finally:
        device.close()


def test_wrong_password_is_refused(api: FlaskClient, mosquitto_server: MosquittoServer) -> None:
    device_id, password = register(api, "pw-1")
    assert accepted_soon(mosquitto_server, device_id, password)
    code = connack(mosquitto_server.host, mosquitto_server.port, device_id, password + "x")
    assert code is not None and code.is_failure, code
    unknown = connack(mosquitto_server.host, mosquitto_server.port, "0" * 16, password)
    assert unknown is not None and unknown.is_failure, unknown


def test_a_device_never_receives_another_devices_messages(
        api: FlaskClient, mosquitto_server: MosquittoServer, service_probe: MqttProbe) -> None:
    a_id, a_password = register(api, "iso-a")
    b_id, b_password = register(api, "iso-b", mcu="nrf52840")
    assert accepted_soon(mosquitto_server, a_id, a_password)
    assert accepted_soon(mosquitto_server, b_id, b_password)
    host, port = mosquitto_server.host, mosquitto_server.port
    a = MqttProbe(host, port, a_id, a_password)
    b = MqttProbe(host, port, b_id, b_password)
    try:
        # Mosquitto acknowledges both subscriptions; its ACL acts on delivery.
        a.subscribe(f"tinyfleet/v1/{b_id}/cmd")
        a.subscribe("tinyfleet/v1/#")
        b.subscribe(f"tinyfleet/v1/{b_id}/cmd")
        service_probe.subscribe(f"tinyfleet/v1/{b_id}/evt")

        service_probe.publish(f"tinyfleet/v1/{b_id}/cmd", b"for-b")
        got = b.next_message()
        assert got is not None and got.payload == b"for-b"
        assert a.next_message(SILENCE_S) is None, "device A received device B's command"

        # Nor can A write into B's subtree: the service never sees A's forged event.
        a.publish(f"tinyfleet/v1/{b_id}/evt", b"forged")
        b.publish(f"tinyfleet/v1/{b_id}/evt", b"genuine")
        seen = service_probe.next_message()
        assert seen is not None and seen.payload == b"genuine"
        assert service_probe.next_message(SILENCE_S) is None
    finally:
        a.close()
        b.close()


def test_a_decommissioned_device_can_no_longer_connect(
        api: FlaskClient, mosquitto_server: MosquittoServer) -> None:
    gone_id, gone_password = register(api, "old-1")
    kept_id, kept_password = register(api, "kept-1", mcu="rp2040")
    assert accepted_soon(mosquitto_server, gone_id, gone_password)
    reloads_before = mosquitto_server.reloads()

    response = api.delete(f"/api/v1/devices/{gone_id}")
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["state"] == "decommissioned"

    assert wait_for(lambda: mosquitto_server.reloads() > reloads_before, RELOAD_TIMEOUT_S)
    assert wait_for(lambda: not _accepted(mosquitto_server, gone_id, gone_password),
                    RELOAD_TIMEOUT_S, 0.1)
    assert _accepted(mosquitto_server, kept_id, kept_password)
    line = f"{gone_id}:"
    assert not any(row.startswith(line) for row in
                   mosquitto_server.files.password_file.read_text().splitlines())
