"""The demo's steps for the foundation: stack, token, sample fleet, table, one device online."""

from __future__ import annotations

import json
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from service.cli.ui import render_table
from service.demo.api import ApiClient
from service.demo.campaign_steps import (
    DEMO_SETTINGS,
    agents_step,
    campaign_step,
    dashboard_step,
    model_step,
    personalize_step,
    summary_step,
)
from service.demo.runner import DemoContext, DemoError, Step
from service.stack import plan_stack, start_stack
from service.stack.config import free_port
from service.stack.runner import describe

MQTT_TIMEOUT_S = 10.0
ISOLATION_WAIT_S = 1.0

# Six devices over five MCU classes in two fleets, all tagged for the campaign: two
# STM32H743 share one hardware class (one search, one build); the RP2040's Cortex-M0+ has no
# QEMU board here (its MCU image is built unchecked; its agent, on the host backend,
# installs the build's host library, checked bit-exact); the
# STM32F103's 20 kB of SRAM is too small for any subnet (its job fails with the numbers).
SAMPLE_FLEETS = [
    {"name": "greenhouse", "description": "climate sensors with a camera, 3 sites"},
    {"name": "cold-chain", "description": "refrigerated trucks: vibration + audio"},
]
SAMPLE_DEVICES: list[dict[str, Any]] = [
    {"name": "gh-cam-001", "fleet": "greenhouse", "mcu": "stm32h743",
     "tags": ["demo", "site-a", "camera"]},
    {"name": "gh-cam-002", "fleet": "greenhouse", "mcu": "stm32h743",
     "tags": ["demo", "site-b", "camera"]},
    {"name": "gh-air-003", "fleet": "greenhouse", "mcu": "stm32u585", "tags": ["demo", "site-a"]},
    {"name": "gh-air-004", "fleet": "greenhouse", "mcu": "rp2040", "tags": ["demo", "site-c"]},
    {"name": "cc-truck-01", "fleet": "cold-chain", "mcu": "imxrt1062", "tags": ["demo", "north"]},
    {"name": "cc-tag-03", "fleet": "cold-chain", "mcu": "stm32f103",
     "tags": ["demo", "north", "tiny"], "ota_layout": "single"},
]


def start_stack_step(ctx: DemoContext) -> None:
    """Start Redis, Mosquitto, gunicorn and a Celery worker on free ports under var/demo."""
    # Own servers only, whatever TINYFLEET_* says: the demo must not write into a real registry.
    plan = plan_stack(ctx.var_dir, redis_port=free_port(), mqtt_port=free_port(),
                      http_port=free_port(), environ={}, inherit_settings=False,
                      worker_concurrency=2, settings=DEMO_SETTINGS)
    ctx.stack = start_stack(plan, say=lambda line: ctx.say(f"    {line}"))
    ctx.say("\n".join("  " + line for line in describe(ctx.stack).splitlines()))
    ctx.say(f"    /healthz is green at {plan.http_url}/healthz")


def token_step(ctx: DemoContext) -> None:
    """Create an admin API token on the database (what `tinyfleet tokens create` does)."""
    from service import db
    from service.auth import create_token
    from service.models import Role

    engine = db.make_engine(ctx.plan.database_url)
    try:
        with db.make_sessionmaker(engine)() as session:
            token, secret = create_token(session, Role.ADMIN, name="demo")
            session.commit()
            ctx.say(f"    admin token {token.id}: {secret[:10]}... (shown once, stored hashed)")
    finally:
        engine.dispose()
    ctx.api = ApiClient(ctx.plan.http_url, secret)


def register_step(ctx: DemoContext) -> None:
    """Create two fleets and register the sample devices in one bulk request, over HTTP."""
    for fleet in SAMPLE_FLEETS:
        ctx.client.post("/api/v1/fleets", fleet)
        ctx.say(f"    POST /api/v1/fleets {fleet['name']}: created, with its signing key")
    answer = ctx.client.post("/api/v1/devices/bulk", {"devices": SAMPLE_DEVICES})
    if answer["count"] != len(SAMPLE_DEVICES):
        raise DemoError(f"bulk registration answered {answer['count']} devices, "
                        f"sent {len(SAMPLE_DEVICES)}")
    ctx.results["credentials"] = {d["name"]: (d["id"], d["mqtt_password"])
                                  for d in answer["devices"]}
    ctx.say(f"    POST /api/v1/devices/bulk: {answer['count']} devices registered, each with "
            f"its MQTT password (returned once, stored hashed)")


def list_step(ctx: DemoContext) -> None:
    """List the registry through the API and show where the broker's credentials live."""
    from service.broker_files import ACL_FILE, DYNSEC_FILE, PASSWORD_FILE, SYSTEM_USERNAMES

    items = ctx.client.get("/api/v1/devices?limit=100")["items"]
    headers = ["NAME", "ID (MQTT user)", "FLEET", "MCU", "CPU", "SRAM", "FLASH", "OTA SLOT",
               "TAGS"]
    rows = [[d["name"], d["id"], d["fleet"], d["mcu"], d["cpu"], _kib(d["sram_bytes"]),
             _kib(d["flash_bytes"]), f"{_kib(d['slot_bytes'])} ({d['ota_layout']})",
             ",".join(d["tags"])] for d in sorted(items, key=lambda d: (d["fleet"], d["name"]))]
    for line in render_table(headers, rows, right={5, 6}).splitlines():
        ctx.say("    " + line)
    broker_dir = ctx.plan.broker_dir
    system = set(SYSTEM_USERNAMES)
    base = sum(line.split(":", 1)[0] not in system
               for line in (broker_dir / PASSWORD_FILE).read_text().splitlines())
    live = len(json.loads((broker_dir / DYNSEC_FILE).read_text()).get("clients", []))
    ctx.say(f"    broker password file: {broker_dir / PASSWORD_FILE} ({base} devices, the "
            "registry's hashes, read at broker start)")
    ctx.say(f"    broker live layer:    {broker_dir / DYNSEC_FILE} ({live} devices, added since "
            "the start over $CONTROL/dynamic-security, no reload)")
    ctx.say(f"    broker ACL:           {broker_dir / ACL_FILE}")


def _kib(size_bytes: int) -> str:
    return f"{size_bytes // 1024} kB"


def connect_step(ctx: DemoContext) -> None:
    """One device logs in to Mosquitto with its credentials and announces itself."""
    from service.broker_files import SERVICE_USERNAME, service_password

    name = SAMPLE_DEVICES[0]["name"]
    device_id, password = ctx.results["credentials"][name]
    plan = ctx.plan
    topic = f"tinyfleet/v1/{device_id}/presence"
    service = _Client(plan.mqtt_host, plan.mqtt_port, SERVICE_USERNAME,
                      service_password(plan.broker_dir))
    try:
        service.subscribe("tinyfleet/v1/+/presence")
        device = _Client(plan.mqtt_host, plan.mqtt_port, device_id, password,
                         will=(topic, b"offline"))
        ctx.say(f"    {name} ({device_id}) connected to {plan.mqtt_url}: {device.connack}")
        device.publish(topic, b"online", retain=True)
        got = service.next_message()
        if got != (topic, b"online"):
            raise DemoError(f"the service account expected 'online' on {topic}, got {got}")
        ctx.say(f"    the service account received {got[1].decode()!r} on {got[0]}")
        # Mosquitto acknowledges a subscription its ACL denies, then never delivers on it.
        other = f"tinyfleet/v1/{ctx.results['credentials']['cc-truck-01'][0]}/cmd"
        device.subscribe(other)
        service.publish(other, b'{"type": "rollback"}')
        leaked = device.next_message(ISOLATION_WAIT_S)
        if leaked is not None:
            raise DemoError(f"{device_id} received {leaked} on another device's topic")
        ctx.say(f"    {name} subscribed to {other}: nothing delivered in "
                f"{ISOLATION_WAIT_S:.0f} s (the ACL keeps it to tinyfleet/v1/{device_id}/#)")
        device.close()
    finally:
        service.close()
    refused = _Client(plan.mqtt_host, plan.mqtt_port, device_id, password + "-wrong")
    ctx.say(f"    {name} with a wrong password: {refused.connack}")
    if not refused.connack.is_failure:
        raise DemoError("the broker accepted a wrong password")


class _Client:
    """A paho-mqtt 2.x client that waits for its CONNACK and queues what it receives."""

    def __init__(self, host: str, port: int, username: str, password: str,
                 will: tuple[str, bytes] | None = None) -> None:
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._message = threading.Event()
        self._lock = threading.Lock()
        self.messages: list[tuple[str, bytes]] = []
        self.connack = ReasonCode(PacketTypes.CONNACK, "Unspecified error")
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"demo-{username}",
                                  protocol=mqtt.MQTTv311)
        self.client.username_pw_set(username, password)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(MQTT_TIMEOUT_S):
            self.close()
            raise DemoError(f"no CONNACK from {host}:{port} within {MQTT_TIMEOUT_S} s")
        if self.connack.is_failure:
            self.close()  # paho would keep retrying a refused login

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self.connack = reason
        self._connected.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload)))
            self._message.set()

    def subscribe(self, topic: str) -> None:
        """Subscribe with QoS 1 and wait for the SUBACK."""
        self.client.subscribe(topic, qos=1)
        if not self._subscribed.wait(MQTT_TIMEOUT_S):
            raise DemoError(f"no SUBACK for {topic} within {MQTT_TIMEOUT_S} s")

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish with QoS 1 and wait for the PUBACK."""
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(
            MQTT_TIMEOUT_S)

    def next_message(self, timeout_s: float = MQTT_TIMEOUT_S) -> tuple[str, bytes] | None:
        """The oldest message not yet taken, waiting up to `timeout_s` for one."""
        with self._lock:
            if not self.messages:
                self._message.clear()
        self._message.wait(timeout_s)
        with self._lock:
            return self.messages.pop(0) if self.messages else None

    def close(self) -> None:
        """Disconnect, then stop the network thread (paho 2.x order)."""
        self.client.disconnect()
        self.client.loop_stop()


STEPS: list[Step] = [
    ("start the local stack (own Redis, Mosquitto, gunicorn, Celery worker)", start_stack_step),
    ("create an admin API token", token_step),
    ("register a sample fleet through the REST API", register_step),
    ("list the fleet", list_step),
    ("connect one device to the broker with its credentials", connect_step),
    ("a model family: a supernet trained on digits (or the cached one), registered",
     model_step),
    ("start the simulated devices (tinyfleet-agent --simulate)", agents_step),
    ("a campaign through the queue: the worker searches, builds, checks in QEMU and signs "
     "per hardware class; the bridge delivers over MQTT", campaign_step),
    ("a personalization round on every updated device (metrics only come back)",
     personalize_step),
    ("summary", summary_step),
    ("the dashboard", dashboard_step),
]

__all__ = ["SAMPLE_DEVICES", "STEPS"]
