"""The broker follows the registry: a real Mosquitto started with the stack's generated config,
devices registered and decommissioned through the REST API, real MQTT clients over TCP.

Single changes reach the broker live (dynamic-security commands, no reload: the broker's log
counts its reloads); a broker that lost its state is rebuilt from the database."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from flask import Flask
from flask.testing import FlaskClient
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import Engine, update

from service import broker_sync
from service.app import create_app
from service.auth import create_token
from service.broker_files import SERVICE_USERNAME, service_password
from service.broker_sync import (
    DeviceChange,
    SyncMode,
    apply_changes,
    ensure_in_step,
    full_sync,
)
from service.models import Device, Role
from service.mqtt_passwords import hash_password
from service.registry import RegistryContext, after_change
from service.stack.procs import spawn, stop_group, tcp_open, wait_until
from service.stack.table import mosquitto_spec
from tests.mqtt_probe import MqttProbe, connack
from tests.servers import MosquittoServer, _plan, wait_for

pytestmark = pytest.mark.integration

SILENCE_S = 1.0  # how long a message (or disconnect) that must not come is waited for


@pytest.fixture(scope="module")
def app(mosquitto_server: MosquittoServer) -> Iterator[Flask]:
    """The service, keeping the broker in step; the broker synced as `tinyfleet up` does."""
    with tempfile.TemporaryDirectory(prefix="tinyfleet-broker-test-") as var:
        yield make_app(var, mosquitto_server)


def make_app(var: str, broker: MosquittoServer) -> Flask:
    """An app on its own SQLite registry whose broker is `broker` (base synced from it)."""
    files = broker.files
    app = create_app({
        "VAR_DIR": var,
        "DATABASE_URL": f"sqlite:///{Path(var) / 'registry.db'}",
        "BROKER_DIR": str(files.broker_dir),
        "MOSQUITTO_PID_FILE": str(files.pid_file),
        "MQTT_HOST": broker.host,
        "MQTT_PORT": broker.port,
    })
    assert full_sync(engine_of(app), broker.target).mode is SyncMode.RELOAD
    return app


def engine_of(app: Flask) -> Engine:
    """The app's database engine."""
    engine: Engine = app.extensions["tinyfleet.engine"]
    return engine


def admin_client(app: Flask, fleet: str = "lab") -> FlaskClient:
    """A test client that sends an admin token and has created `fleet`."""
    with app.app_context():
        session = app.extensions["tinyfleet.sessionmaker"]()
        _, secret = create_token(session, Role.ADMIN, name="broker-tests")
        session.commit()
        session.close()
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {secret}"
    response = client.post("/api/v1/fleets", json={"name": fleet})
    assert response.status_code == 201, response.get_json()
    return client


@pytest.fixture(scope="module")
def api(app: Flask) -> FlaskClient:
    """An admin client of `app` with fleet `lab`."""
    return admin_client(app)


def register(api: FlaskClient, name: str, mcu: str = "stm32f746") -> tuple[str, str]:
    """Register a device through the API; (MQTT username, password)."""
    response = api.post("/api/v1/devices", json={"name": name, "fleet": "lab", "mcu": mcu})
    assert response.status_code == 201, response.get_json()
    mqtt_: dict[str, Any] = response.get_json()["mqtt"]
    return mqtt_["username"], mqtt_["password"]


def accepted(broker: MosquittoServer, username: str, password: str) -> bool:
    """Whether the broker accepts this login now (no waiting: changes are synchronous)."""
    code = connack(broker.host, broker.port, username, password)
    return code is not None and not code.is_failure


class Device_:
    """A real device connection (paho, client id = its id) that records its disconnects."""

    def __init__(self, broker: MosquittoServer, username: str, password: str,
                 client_id: str | None = None) -> None:
        self.disconnected = threading.Event()
        self.connected = threading.Event()
        self.rc: Any = None
        self.messages: list[bytes] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or username,
                                  protocol=mqtt.MQTTv311)
        self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_a: self.disconnected.set()
        self.client.on_message = lambda _c, _u, msg: self.messages.append(bytes(msg.payload))
        self.client.reconnect_delay_set(min_delay=30, max_delay=30)  # no silent comeback
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(5), "no CONNACK"

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self.rc = reason
        self.connected.set()

    def close(self) -> None:
        """Disconnect (paho 2.x order: disconnect, then stop the loop)."""
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture()
def service_probe(mosquitto_server: MosquittoServer) -> Iterator[MqttProbe]:
    """The service account, connected (its password lives beside the broker files)."""
    password = service_password(mosquitto_server.files.broker_dir)
    probe = MqttProbe(mosquitto_server.host, mosquitto_server.port, SERVICE_USERNAME, password)
    assert probe.accepted
    yield probe
    probe.close()


def test_a_registered_device_connects_at_once_without_a_reload(
        api: FlaskClient, mosquitto_server: MosquittoServer, service_probe: MqttProbe) -> None:
    reloads = mosquitto_server.reloads()
    device_id, password = register(api, "pub-1")
    assert accepted(mosquitto_server, device_id, password)  # no waiting, no retry
    assert mosquitto_server.reloads() == reloads
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
    assert accepted(mosquitto_server, device_id, password)
    assert not accepted(mosquitto_server, device_id, password + "x")
    assert not accepted(mosquitto_server, "dev-" + "0" * 16, password)


def test_a_device_never_receives_another_devices_messages(
        api: FlaskClient, mosquitto_server: MosquittoServer, service_probe: MqttProbe) -> None:
    a_id, a_password = register(api, "iso-a")
    b_id, b_password = register(api, "iso-b", mcu="nrf52840")
    host, port = mosquitto_server.host, mosquitto_server.port
    a = MqttProbe(host, port, a_id, a_password)
    b = MqttProbe(host, port, b_id, b_password)
    try:
        # Mosquitto acknowledges both subscriptions; its ACL acts on delivery.
        a.subscribe(f"tinyfleet/v1/{b_id}/cmd")
        a.subscribe("tinyfleet/v1/#")
        a.subscribe("$CONTROL/dynamic-security/#")
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
        # Nor command the broker's auth plugin: a device's control message changes nothing.
        a.publish("$CONTROL/dynamic-security/v1",
                  json.dumps({"commands": [{"command": "disableClient",
                                            "username": b_id}]}).encode())
        assert accepted(mosquitto_server, b_id, b_password)
    finally:
        a.close()
        b.close()


def test_decommission_drops_the_connected_device_at_once_without_a_reload(
        api: FlaskClient, mosquitto_server: MosquittoServer) -> None:
    gone_id, gone_password = register(api, "old-1")
    kept_id, kept_password = register(api, "kept-1", mcu="rp2040")
    connected = Device_(mosquitto_server, gone_id, gone_password)
    try:
        assert not connected.rc.is_failure
        reloads = mosquitto_server.reloads()
        response = api.delete(f"/api/v1/devices/{gone_id}")
        assert response.status_code == 200, response.get_json()
        assert response.get_json()["state"] == "decommissioned"
        # The session is dropped by the time the API answered (give the socket a moment).
        assert connected.disconnected.wait(SILENCE_S), "the decommissioned session stayed"
    finally:
        connected.close()
    assert not accepted(mosquitto_server, gone_id, gone_password)
    assert accepted(mosquitto_server, kept_id, kept_password)
    assert mosquitto_server.reloads() == reloads


def test_a_device_cannot_take_over_another_devices_client_id(
        api: FlaskClient, mosquitto_server: MosquittoServer, service_probe: MqttProbe) -> None:
    a_id, a_password = register(api, "victim")
    b_id, b_password = register(api, "intruder")
    victim = Device_(mosquitto_server, a_id, a_password)
    try:
        victim.client.subscribe(f"tinyfleet/v1/{a_id}/cmd", qos=1)
        # B logs in with its own credentials but A's client id: it is connected as itself
        # (the listener replaces the client id with the username) and A stays connected.
        intruder = Device_(mosquitto_server, b_id, b_password, client_id=a_id)
        try:
            assert not intruder.rc.is_failure
            assert not victim.disconnected.wait(SILENCE_S), "the victim was kicked off"
            service_probe.publish(f"tinyfleet/v1/{a_id}/cmd", b"still-here")
            assert wait_for(lambda: victim.messages == [b"still-here"], 5)
            assert not intruder.disconnected.is_set() and not victim.disconnected.is_set()
        finally:
            intruder.close()
    finally:
        victim.close()


def set_password(app: Flask, device_id: str, password: str) -> None:
    """Store a new password hash for a device, as a rotation commits it."""
    with engine_of(app).begin() as conn:
        conn.execute(update(Device).where(Device.id == device_id)
                     .values(mqtt_password_hash=hash_password(password)))


def test_a_rotated_password_replaces_the_old_one_at_once(
        app: Flask, api: FlaskClient, mosquitto_server: MosquittoServer) -> None:
    ctx = RegistryContext.from_config(app.config)
    device_id, old = register(api, "rot-1")
    connected = Device_(mosquitto_server, device_id, old)
    try:
        set_password(app, device_id, "new-password-1")
        with app.app_context():
            session = app.extensions["tinyfleet.sessionmaker"]()
            outcome = after_change(session, ctx, [DeviceChange.rotated(device_id,
                                                                       "new-password-1")])
            session.close()
        assert outcome is not None and outcome.mode is SyncMode.LIVE
        assert connected.disconnected.wait(SILENCE_S), "a session on the old password stayed"
    finally:
        connected.close()
    assert not accepted(mosquitto_server, device_id, old)
    assert accepted(mosquitto_server, device_id, "new-password-1")

    # Two rotations racing: the second commits first, the first's call comes last. Only the
    # stored password may end up accepted, whatever order the calls reach the broker in.
    set_password(app, device_id, "newest")
    apply_changes(engine_of(app), ctx.broker, [DeviceChange.rotated(device_id, "newest")])
    stale = apply_changes(engine_of(app), ctx.broker,
                          [DeviceChange.rotated(device_id, "new-password-1")])
    assert stale.mode is SyncMode.LIVE
    assert accepted(mosquitto_server, device_id, "newest")
    assert not accepted(mosquitto_server, device_id, "new-password-1")
    # A registration's call arriving after the device was decommissioned does not revive it.
    api.delete(f"/api/v1/devices/{device_id}")
    apply_changes(engine_of(app), ctx.broker, [DeviceChange.registered(device_id, "newest")])
    assert not accepted(mosquitto_server, device_id, "newest")


def test_a_burst_of_single_changes_needs_no_reload_and_the_live_layer_is_folded(
        app: Flask, api: FlaskClient, mosquitto_server: MosquittoServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    reloads = mosquitto_server.reloads()
    devices = [register(api, f"burst-{i}") for i in range(20)]
    assert mosquitto_server.reloads() == reloads
    assert all(accepted(mosquitto_server, *d) for d in devices[::4])
    # Past LIVE_MAX clients the live layer is folded into the base: one reload, and every
    # device keeps its password (the base has its stored hash).
    monkeypatch.setattr(broker_sync, "LIVE_MAX", 5)
    gone = devices.pop()
    assert api.delete(f"/api/v1/devices/{gone[0]}").status_code == 200
    assert mosquitto_server.reloads() == reloads + 1
    assert all(accepted(mosquitto_server, *d) for d in devices)
    assert not accepted(mosquitto_server, *gone)
    # A bulk registration goes through the base in one reload too.
    monkeypatch.setattr(broker_sync, "BULK_CHANGES", 3)
    rows = [{"name": f"bulk-{i}", "fleet": "lab", "mcu": "rp2040"} for i in range(5)]
    response = api.post("/api/v1/devices/bulk", json={"devices": rows})
    assert response.status_code == 201, response.get_json()
    assert mosquitto_server.reloads() == reloads + 2
    for item in response.get_json()["devices"]:
        assert accepted(mosquitto_server, item["id"], item["mqtt_password"])


def test_a_broker_that_lost_its_state_is_rebuilt_from_the_registry(
        mosquitto_factory: Callable[[], MosquittoServer]) -> None:
    broker = mosquitto_factory()
    var = tempfile.mkdtemp(prefix="tinyfleet-lost-")
    try:
        app = make_app(var, broker)
        api = admin_client(app)
        active = [register(api, f"keep-{i}") for i in range(3)]
        gone = register(api, "gone")
        assert api.delete(f"/api/v1/devices/{gone[0]}").status_code == 200

        # Mosquitto restarts with empty state: every file of its own is gone.
        restarted = restart_empty(broker)
        try:
            assert not accepted(restarted, *active[0])  # nobody gets in on an empty state
            # The next change finds the broker refusing our admin account and rebuilds it.
            newcomer = register(api, "newcomer")
            assert all(accepted(restarted, *d) for d in [*active, newcomer])
            assert not accepted(restarted, *gone)
        finally:
            restarted.stop()
        # Without a change to reveal it: the stack's supervisor checks every few seconds.
        restarted = restart_empty(broker)
        try:
            assert not accepted(restarted, *newcomer)
            outcome = ensure_in_step(engine_of(app), restarted.target)
            assert outcome is not None and outcome.mode is SyncMode.RELOAD
            assert all(accepted(restarted, *d) for d in [*active, newcomer])
            assert not accepted(restarted, *gone)
            assert ensure_in_step(engine_of(app), restarted.target) is None  # in step now
        finally:
            restarted.stop()
    finally:
        shutil.rmtree(var, ignore_errors=True)


def restart_empty(broker: MosquittoServer) -> MosquittoServer:
    """Stop Mosquitto, delete its state (credentials, ACL, plugin file, persistence), and
    start it again on the same port and broker directory."""
    broker.stop()
    files = broker.files
    for path in (files.password_file, files.acl_file, files.dynsec_file,
                 files.broker_dir / "mosquitto.db"):
        path.unlink(missing_ok=True)
    return restart_mosquitto(broker)


def restart_mosquitto(broker: MosquittoServer) -> MosquittoServer:
    """Start Mosquitto again on the same port and broker directory."""
    plan = _plan(broker.files.broker_dir.parent, mqtt_port=broker.port)
    proc = spawn(mosquitto_spec(plan, broker.files))
    try:
        wait_until(lambda: tcp_open(broker.host, broker.port) and broker.files.pid_file.exists(),
                   "mosquitto to listen again", 30, [proc])
    except BaseException:
        stop_group(proc, 2.0)
        raise
    return MosquittoServer(broker.port, broker.files, proc)
