"""The broker keeping up with a registry of 100,000 devices (bench/registry.py --broker-scale).

A registry of N active devices is loaded with SQL (one shared `$7$` hash: the broker's costs
depend on the number of entries, not on their values), Mosquitto is started as `tinyfleet up`
starts it (base from the database, empty live layer), and then, for real, in this process:

- one change at a time through the registry's own code path (`register_devices`,
  `decommission`, a rotation's `after_change`), timed until the broker shows it: a new device's
  MQTT connect accepted; a decommissioned device's open session dropped and its login refused;
  a rotated device's new password accepted and old one refused;
- a burst of 100 single registrations, one call each, back to back, and the broker's reloads;
- the anchor, measured in the same run: the full path every change took before (base password
  file rewritten from the database + SIGHUP, here also waiting until the reload is done), and
  the fold of the live layer into the base;
- the design not chosen, as a peer: every device in the dynamic-security plugin (its JSON file
  written from the database's hashes, which it accepts), where each change costs the plugin a
  rewrite of that whole file.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import Engine, insert, update

from service import db
from service.broker_control import CONNACK_ACCEPTED, BrokerEndpoint, DynsecSession, mqtt_connack
from service.broker_files import ADMIN_USERNAME, CONTROL_TOPIC, RESPONSE_TOPIC, admin_password
from service.broker_sync import DeviceChange, SyncMode, full_sync, prepare_start
from service.models import Device, DeviceState, Fleet, utcnow
from service.mqtt_passwords import hash_password
from service.private_files import write_private
from service.registry import RegistryContext, after_change, decommission, register_devices
from service.schemas import DeviceCreate
from service.stack.config import LOOPBACK, free_port, plan_stack
from service.stack.mosquitto import MosquittoFiles, broker_user, dynsec_plugin_path
from service.stack.procs import ProcessSpec, Started, spawn, stop_group, tcp_open, wait_until
from service.stack.table import find_program, mosquitto_spec

SINGLES = 7  # repetitions of each single change (median reported)
BURST = 100
_BATCH = 10_000


def load_devices(engine: Engine, n: int) -> None:
    """`n` active devices in one fleet, inserted with SQL in batches."""
    pw_hash = hash_password("bench-password")
    now = utcnow()
    with engine.begin() as conn:
        fleet_id = conn.execute(insert(Fleet).values(
            name="scale", description="", signing_public_key="-", signing_key_path="-",
            created_at=now).returning(Fleet.id)).scalar_one()
        for start in range(0, n, _BATCH):
            conn.execute(insert(Device), [{
                "id": f"dev-{i:016x}", "name": f"scale-{i:06}", "fleet_id": fleet_id,
                "mcu": "rp2040", "cpu": "cortex-m0plus", "sram_bytes": 264 * 1024,
                "flash_bytes": 2 * 1024 * 1024, "slot_bytes": 1 << 20, "ota_layout": "ab",
                "state": DeviceState.ACTIVE, "mqtt_password_hash": pw_hash, "created_at": now,
                "decommissioned_at": None} for i in range(start, min(start + _BATCH, n))])


class Session_:
    """A connected device (paho, client id = username) that notes when it is dropped."""

    def __init__(self, port: int, username: str, password: str) -> None:
        self.dropped = threading.Event()
        self.connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=username,
                                  protocol=mqtt.MQTTv311)
        self.client.username_pw_set(username, password)
        self.client.on_connect = lambda *_a: self.connected.set()
        self.client.on_disconnect = lambda *_a: self.dropped.set()
        self.client.reconnect_delay_set(min_delay=60, max_delay=60)
        self.client.connect(LOOPBACK, port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(10):
            raise RuntimeError(f"{username} could not connect")

    def close(self) -> None:
        """Disconnect and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()


def accepted(port: int, username: str, password: str) -> bool:
    """Whether the broker accepts this login now."""
    return mqtt_connack(BrokerEndpoint(LOOPBACK, port), (username, password)) == CONNACK_ACCEPTED


def until(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll `check` every 2 ms until true."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError("the broker never showed the change")
        time.sleep(0.002)


def measure_broker_at_scale(devices: int, database_url: str | None = None) -> dict[str, Any]:
    """The whole broker-at-scale measurement; returns its numbers (seconds)."""
    root = Path(tempfile.mkdtemp(prefix="tinyfleet-bench-broker-"))
    root.chmod(0o755)  # Mosquitto (user mosquitto) must reach var/broker
    env = {"TINYFLEET_DATABASE_URL": database_url} if database_url else {}
    plan = plan_stack(root / "var", mqtt_port=free_port(), http_port=free_port(), environ=env)
    started: list[Started] = []
    try:
        db.upgrade(plan.database_url)
        engine = db.make_engine(plan.database_url)
        t = time.perf_counter()
        load_devices(engine, devices)
        out: dict[str, Any] = {"devices": devices, "database": plan.database_url.split(":")[0],
                               "load_s": time.perf_counter() - t}
        t = time.perf_counter()
        prepare_start(engine, plan.broker_dir)
        files = MosquittoFiles.in_dir(plan.broker_dir)
        started.append(spawn(mosquitto_spec(plan, files)))
        wait_until(lambda: tcp_open(LOOPBACK, plan.mqtt_port) and files.pid_file.exists(),
                   "mosquitto", 120, started)
        out["broker_start_s"] = time.perf_counter() - t
        ctx = RegistryContext(key_dir=plan.var_dir / "keys", broker_dir=plan.broker_dir,
                              pid_file=files.pid_file, mqtt_port=plan.mqtt_port)
        out.update(_singles(engine, ctx, plan.mqtt_port))
        out.update(_burst(engine, ctx, plan.mqtt_port, files))
        # Folding the live layer (what happens every LIVE_MAX changes): the base rewritten,
        # one reload, then the layer's entries deleted.
        live = out.pop("live_clients")
        fold = full_sync(engine, ctx.broker)
        out.update(fold_s=fold.seconds, fold_live=live)
        # The anchor: what every single change cost before (and now costs a bulk change).
        full = [full_sync(engine, ctx.broker) for _ in range(3)]
        assert all(f.mode is SyncMode.RELOAD for f in [fold, *full]), full
        out["full_sync_s"] = statistics.median(f.seconds for f in full)
        engine.dispose()
        for proc in reversed(started):
            stop_group(proc, 10.0)
        started.clear()
        out.update(measure_dynsec_only(devices, root / "dynsec-only"))
        return out
    finally:
        for proc in reversed(started):
            stop_group(proc, 10.0)
        shutil.rmtree(root, ignore_errors=True)


def measure_dynsec_only(devices: int, broker_dir: Path) -> dict[str, Any]:
    """The peer design: all `devices` in the plugin (pre-hashed), no password file."""
    broker_dir.mkdir(mode=0o700)
    port = free_port()
    files = MosquittoFiles.in_dir(broker_dir)
    pw_hash = hash_password("bench-password")

    def client(user: str, encoded: str, **extra: Any) -> dict[str, Any]:
        _, _, iterations, salt, digest = encoded.split("$")  # `$7$` -> the plugin's fields
        return {"username": user, "password": digest, "salt": salt,
                "iterations": int(iterations), **extra}

    admin = client(ADMIN_USERNAME, hash_password(admin_password(broker_dir)),
                   roles=[{"rolename": "admin"}])
    acls = [{"acltype": kind, "topic": topic, "allow": True}
            for kind, topic in (("publishClientSend", CONTROL_TOPIC),
                                ("subscribeLiteral", RESPONSE_TOPIC),
                                ("publishClientReceive", RESPONSE_TOPIC))]
    deny = dict.fromkeys(("publishClientSend", "publishClientReceive", "subscribe",
                          "unsubscribe"), False)
    body = {"defaultACLAccess": deny, "groups": [],
            "roles": [{"rolename": "admin", "acls": acls}],
            "clients": [admin, *(client(f"dev-{i:016x}", pw_hash, clientid=f"dev-{i:016x}")
                                 for i in range(devices))]}
    user, owner = broker_user(broker_dir)
    write_private(files.dynsec_file, json.dumps(body), owner)
    conf = [f"user {user}", "per_listener_settings false", "allow_anonymous false",
            f"plugin {dynsec_plugin_path()}", f"plugin_opt_config_file {files.dynsec_file}",
            f"listener {port} {LOOPBACK}", "use_username_as_clientid true",
            f"listener 0 {files.socket_file}",
            f"pid_file {files.pid_file}", f"log_dest file {files.log_file}"]
    write_private(files.config_file, "\n".join(conf) + "\n", owner)
    if owner is not None:
        os.chown(broker_dir, *owner)
    t = time.perf_counter()
    proc = spawn(ProcessSpec("mqtt-peer", (find_program("mosquitto"), "-c",
                                           str(files.config_file)),
                             broker_dir / "mosquitto.out"))
    try:
        wait_until(lambda: files.socket_file.exists() and tcp_open(LOOPBACK, port),
                   "mosquitto (plugin only)", 300, [proc])
        start_s = time.perf_counter() - t
        # A device of the JSON file logs in: the plugin takes the database's hashes as they are.
        if not accepted(port, "dev-0000000000000000", "bench-password"):
            raise RuntimeError("the plugin did not accept a pre-hashed password")
        endpoint = BrokerEndpoint.for_broker_dir(broker_dir, LOOPBACK, port)
        with DynsecSession(endpoint, ADMIN_USERNAME, admin_password(broker_dir),
                           timeout_s=120) as dynsec:
            singles = []
            for i in range(3):
                t = time.perf_counter()
                dynsec.run([{"command": "disableClient", "username": f"dev-{i:016x}"}])
                singles.append(time.perf_counter() - t)
            t = time.perf_counter()
            dynsec.run([{"command": "enableClient", "username": f"dev-{i:016x}"}
                        for i in range(10)])
            ten_s = time.perf_counter() - t
    finally:
        stop_group(proc, 10.0)
    return {"dynsec_only_start_s": start_s, "dynsec_only_change_s": statistics.median(singles),
            "dynsec_only_ten_changes_s": ten_s}


def _register_one(engine: Engine, ctx: RegistryContext,
                  name: str) -> tuple[str, str, float, float]:
    """Register one device as `register_devices` does (commit, then `after_change`), timing
    the two parts: (id, password, seconds in total, seconds of after_change)."""
    from dataclasses import replace

    with db.make_sessionmaker(engine)() as session:
        t = time.perf_counter()
        new = register_devices(session, [DeviceCreate(name=name, fleet="scale", mcu="rp2040")],
                               replace(ctx, sync_broker=False)).devices[0]
        b = time.perf_counter()
        after_change(session, ctx, [DeviceChange.registered(new.device_id, new.mqtt_password)])
        end = time.perf_counter()
        return new.device_id, new.mqtt_password, end - t, end - b


def _singles(engine: Engine, ctx: RegistryContext, port: int) -> dict[str, Any]:
    register, drop, rotate, calls, broker = [], [], [], [], []
    for i in range(SINGLES):
        t = time.perf_counter()
        device_id, password, call_s, _broker_s = _register_one(engine, ctx, f"single-{i}")
        until(lambda: accepted(port, device_id, password))  # noqa: B023
        register.append(time.perf_counter() - t)
        calls.append(call_s)

        session = Session_(port, device_id, password)
        new_password = f"rotated-{i}-password"
        t = time.perf_counter()
        with engine.begin() as conn:
            conn.execute(update(Device).where(Device.id == device_id)
                         .values(mqtt_password_hash=hash_password(new_password)))
        with db.make_sessionmaker(engine)() as s:
            outcome = after_change(s, ctx, [DeviceChange.rotated(device_id, new_password)])
        assert outcome is not None and outcome.mode is SyncMode.LIVE, outcome
        broker.append(outcome.seconds)
        until(lambda: accepted(port, device_id, new_password)  # noqa: B023
              and session.dropped.is_set())  # noqa: B023
        rotate.append(time.perf_counter() - t)
        session.close()
        assert not accepted(port, device_id, password)

        session = Session_(port, device_id, new_password)
        t = time.perf_counter()
        with db.make_sessionmaker(engine)() as s:
            decommission(s, device_id, ctx)
        until(lambda: session.dropped.is_set()  # noqa: B023
              and not accepted(port, device_id, new_password))  # noqa: B023
        drop.append(time.perf_counter() - t)
        session.close()
    return {"register_to_connect_s": statistics.median(register),
            "register_call_s": statistics.median(calls),
            "rotate_to_effect_s": statistics.median(rotate),
            "live_apply_s": statistics.median(broker),
            "decommission_to_dropped_s": statistics.median(drop),
            "single_max_s": max(register + rotate + drop)}


def _burst(engine: Engine, ctx: RegistryContext, port: int,
           files: MosquittoFiles) -> dict[str, Any]:
    reloads = files.log_file.read_text(errors="replace").count("Reloading config")
    t = time.perf_counter()
    made = [_register_one(engine, ctx, f"burst-{i:03}") for i in range(BURST)]
    burst_s = time.perf_counter() - t
    # One more, to learn the live layer's size (the outcome reports it).
    with db.make_sessionmaker(engine)() as session:
        rows = [DeviceCreate(name="burst-last", fleet="scale", mcu="rp2040")]
        registration = register_devices(session, rows, ctx)
        outcome = after_change(session, ctx, [DeviceChange.registered(
            registration.devices[0].device_id, registration.devices[0].mqtt_password)])
    assert outcome is not None and outcome.mode is SyncMode.LIVE, outcome
    after = files.log_file.read_text(errors="replace").count("Reloading config")
    missing = [d for d, p, _, _ in made[::10] if not accepted(port, d, p)]
    if missing:
        raise RuntimeError(f"after the burst, {missing} cannot log in")
    return {"burst_s": burst_s, "burst_reloads": after - reloads,
            "burst_call_max_s": max(m[2] for m in made),
            "burst_broker_p50_s": statistics.median(m[3] for m in made),
            "burst_broker_max_s": max(m[3] for m in made), "live_clients": outcome.live_clients}


def report_broker_at_scale(r: dict[str, Any]) -> str:
    """The numbers as text."""
    ms = {k: v * 1000 for k, v in r.items() if k.endswith("_s")}
    return "\n".join([
        f"{r['devices']} active devices ({r['database']}); Mosquitto started on its base "
        f"in {r['broker_start_s']:.2f} s",
        f"register one -> its connect accepted: {ms['register_to_connect_s']:.1f} ms "
        f"(the registry call: {ms['register_call_s']:.1f} ms)",
        f"rotate one -> new password accepted, old session dropped: "
        f"{ms['rotate_to_effect_s']:.1f} ms (of which after_change, lock to broker's answer: "
        f"{ms['live_apply_s']:.1f} ms)",
        f"decommission one -> its session dropped, login refused: "
        f"{ms['decommission_to_dropped_s']:.1f} ms (slowest single change "
        f"{ms['single_max_s']:.1f} ms)",
        f"burst of {BURST} single registrations: {r['burst_s']:.2f} s "
        f"({ms['burst_s'] / BURST:.1f} ms each, {r['burst_reloads']} broker reloads; slowest "
        f"call {ms['burst_call_max_s']:.0f} ms; after_change p50 "
        f"{ms['burst_broker_p50_s']:.1f} ms, max {ms['burst_broker_max_s']:.0f} ms)",
        f"fold of the live layer ({r['fold_live']} clients) into the base: "
        f"{ms['fold_s']:.0f} ms (once every LIVE_MAX changes)",
        f"anchor, the full path (base rewrite + SIGHUP + reload): {ms['full_sync_s']:.0f} ms "
        f"per change; {BURST} of them: {r['full_sync_s'] * BURST:.0f} s "
        f"({r['full_sync_s'] * BURST / r['burst_s']:.0f}x the burst)",
        f"peer, every device in the plugin: started in {r['dynsec_only_start_s']:.2f} s; one "
        f"change {ms['dynsec_only_change_s']:.0f} ms, 10 changes in one message "
        f"{r['dynsec_only_ten_changes_s']:.2f} s",
    ])
