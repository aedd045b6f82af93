"""OTA delivery end to end on a real Mosquitto: the bridge, the reference client, the registry's
device credentials and the fleet's signing key; a recording sink stands where the campaigns'
job state machine goes."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device_agent import protocol as p
from device_agent.device_loop import DeviceLoop
from device_agent.reference_client import DeviceIdentity, Faults, Outcome, ReferenceDevice
from firmware.image import generate_signing_key
from service.stack.config import free_port
from service.stack.procs import spawn, stop_group, tcp_open, wait_until
from service.stack.runner import mosquitto_spec
from tests.ota_fleet import OtaFleet, signed_image
from tests.servers import MosquittoServer, _plan, wait_for
from workers.artifacts import ArtifactStore
from workers.bridge import Bridge, BrokerLogin, CommandMessage, CommandPublisher

pytestmark = pytest.mark.integration

IMAGE_BYTES = 120 * 1024  # 30 blocks of 4 KiB plus a short one
WAIT_S = 20.0


@dataclass
class RecordingSink:
    """A BridgeSink that records what reaches it and serves what the test assigns."""

    assigned: dict[tuple[str, str], str] = field(default_factory=dict)
    pending: dict[str, list[CommandMessage]] = field(default_factory=dict)
    events: list[tuple[str, p.DeviceEvent]] = field(default_factory=list)
    presence: list[tuple[str, bool]] = field(default_factory=list)
    metrics: list[tuple[str, p.MetricsReport]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_event(self, device_id: str, event: p.DeviceEvent) -> None:
        with self.lock:
            self.events.append((device_id, event))

    def on_presence(self, device_id: str, online: bool,
                    backend: str | None = None) -> None:
        with self.lock:
            self.presence.append((device_id, online))

    def on_metrics(self, device_id: str, report: p.MetricsReport) -> None:
        with self.lock:
            self.metrics.append((device_id, report))

    def artifact_for(self, device_id: str, update_id: str) -> str | None:
        return self.assigned.get((device_id, update_id))

    def pending_commands(self, device_id: str) -> Sequence[CommandMessage]:
        return self.pending.pop(device_id, [])

    def states(self, device_id: str, update_id: str | None = None) -> list[str]:
        with self.lock:
            return [e.state.value for d, e in self.events
                    if d == device_id and (update_id is None or e.update_id == update_id)]

    def everything_from(self, device_id: str) -> list[object]:
        with self.lock:
            return [m for d, m in [*self.events, *self.metrics, *self.presence]
                    if d == device_id]


@dataclass
class Rig:
    """Everything one test needs: registry, bridge, publisher, store, device loop."""

    fleet: OtaFleet
    store: ArtifactStore
    sink: RecordingSink
    bridge: Bridge
    publisher: CommandPublisher
    loop: DeviceLoop
    counter: int = 0

    def device(self, mcu: str = "stm32f746", **kwargs: object) -> ReferenceDevice:
        self.counter += 1
        identity = self.fleet.register(1, mcu, f"dev{self.counter}-{mcu}")[0]
        return ReferenceDevice(identity, self.fleet.signing_key().public_key(),
                               **kwargs)  # type: ignore[arg-type]

    def offer(self, device: ReferenceDevice, image: bytes, update_id: str,
              **override: object) -> p.OtaOffer:
        """Store `image`, assign it to the device's update and publish the offer."""
        assert device.ready.wait(10), f"device {device.device_id} never subscribed"
        sha = self.store.put(image)
        self.sink.assigned[(device.device_id, update_id)] = sha
        offer = p.make_offer(update_id, image).model_copy(update=override)
        self.publisher.publish(device.device_id, offer)
        return offer


def outcome(device: ReferenceDevice, update_id: str) -> Outcome:
    assert wait_for(lambda: update_id in device.outcomes, WAIT_S), (
        f"device {device.device_id} did not finish {update_id}: "
        f"{len(device.download.blocks) if device.download else '-'} blocks held")
    return device.outcomes[update_id]


def start_rig(broker: MosquittoServer, var: Path) -> Rig:
    fleet = OtaFleet(broker, var)
    store = ArtifactStore(var / "artifacts")
    sink = RecordingSink()
    login = BrokerLogin.from_config(fleet.config)
    bridge = Bridge(sink, store, login)
    bridge.start()
    loop = DeviceLoop(broker.host, broker.port, reconnect_s=0.2)
    loop.start()
    return Rig(fleet, store, sink, bridge, CommandPublisher(login), loop)


def stop_rig(rig: Rig) -> None:
    rig.loop.stop()
    rig.publisher.close()
    rig.bridge.stop()


@pytest.fixture(scope="module")
def rig(mosquitto_server: MosquittoServer) -> Iterator[Rig]:
    with tempfile.TemporaryDirectory(prefix="tinyfleet-ota-") as var:
        started = start_rig(mosquitto_server, Path(var))
        yield started
        stop_rig(started)


def test_a_transfer_completes_verifies_and_installs(rig: Rig, tmp_path: Path) -> None:
    device = rig.device(slot_dir=tmp_path)
    rig.loop.add([device])
    image = signed_image(rig.fleet.signing_key(), "stm32f746", IMAGE_BYTES)
    sent_before = rig.bridge.metrics.value("tinyfleet_bridge_blocks_sent")
    offer = rig.offer(device, image, "upd-1")
    result = outcome(device, "upd-1")
    assert (result.state, result.reason, result.slot) == (p.UpdateState.INSTALLED, None, 0)
    assert (tmp_path / device.device_id / "slot-a.img").read_bytes() == image
    assert wait_for(lambda: "installed" in rig.sink.states(device.device_id), 5)
    assert rig.sink.states(device.device_id, "upd-1") == [
        "accepted", "downloading", "downloading", "downloading", "downloading", "verifying",
        "installing", "self_test", "installed"]
    # Exactly the image's blocks were served: nothing twice, nothing unasked.
    sent = rig.bridge.metrics.value("tinyfleet_bridge_blocks_sent") - sent_before
    assert sent == offer.block_count == 31
    assert (device.device_id, True) in rig.sink.presence


def test_a_corrupt_block_is_refused_by_crc_and_asked_again_and_a_lost_one_too(
        rig: Rig) -> None:
    device = rig.device(faults=Faults(drop=frozenset({5}), corrupt=frozenset({3, 30})),
                        retry_s=0.3)
    rig.loop.add([device])
    image = signed_image(rig.fleet.signing_key(), "stm32f746", IMAGE_BYTES, seed=2)
    rig.offer(device, image, "upd-crc")
    assert outcome(device, "upd-crc").state is p.UpdateState.INSTALLED
    assert len(device.crc_refusals) == 2 and all("CRC-32" in r for r in device.crc_refusals)
    asked = [indices for indices, _held in device.requests]
    assert [3] in asked and [30] in asked  # each asked again on its own, at once
    assert any(5 in indices for indices in asked[1:])  # the lost one, after the retry timer
    assert device.slots[0] == image


def test_an_image_for_another_mcu_of_the_same_class_installs(rig: Rig) -> None:
    # One hardware class (Cortex-M4, 256 kB SRAM, 1 MB Flash), one build named after one
    # member: the nrf52840 takes the stm32f412's image (the core and the sizes decide).
    device = rig.device("nrf52840")
    rig.loop.add([device])
    image = signed_image(rig.fleet.signing_key(), "stm32f412", IMAGE_BYTES // 4, seed=4)
    rig.offer(device, image, "upd-class")
    result = outcome(device, "upd-class")
    assert (result.state, result.reason) == (p.UpdateState.INSTALLED, None)
    assert device.slots[0] == image


@pytest.mark.parametrize("case", ["foreign key", "wrong hash", "offer for another core",
                                  "image for another core", "image for more sram"])
def test_bad_images_are_refused_with_their_reason(rig: Rig, case: str) -> None:
    device = rig.device()
    rig.loop.add([device])
    key = rig.fleet.signing_key()
    image = signed_image(key, "stm32f746", IMAGE_BYTES // 4, seed=3)
    override: dict[str, object] = {}
    if case == "foreign key":
        image = signed_image(generate_signing_key(), "stm32f746", IMAGE_BYTES // 4, seed=3)
        expected = "signature does not verify"
    elif case == "wrong hash":
        override = {"image_sha256": "0" * 64}
        expected = "the offer's sha256 is 0000000000000000..."
    elif case == "offer for another core":
        image = signed_image(key, "stm32f412", IMAGE_BYTES // 4, seed=3)
        expected = "offer is for stm32f412, this device is stm32f746: core cortex-m4, not cortex-m7"
    elif case == "image for another core":  # the offer claims this device's core, the
        image = signed_image(key, "stm32f412", IMAGE_BYTES // 4, seed=3)  # signed image not
        override = {"target_mcu": "stm32f746", "target_cpu": "cortex-m7"}
        expected = "image is built for stm32f412, this device is stm32f746: core cortex-m4"
    else:  # the same core (Cortex-M7), linked for 1 MB of SRAM: the device has 320 kB
        image = signed_image(key, "stm32h743", IMAGE_BYTES // 4, seed=3)
        expected = ("image is built for stm32h743, this device is stm32f746: 1048576 bytes "
                    "of SRAM, the device has 327680")
    rig.offer(device, image, "upd-bad", **override)
    result = outcome(device, "upd-bad")
    assert result.state is p.UpdateState.REFUSED
    assert result.reason is not None and expected in result.reason
    assert wait_for(lambda: "refused" in rig.sink.states(device.device_id), 5)
    refused = [e for d, e in rig.sink.events if d == device.device_id and e.state.value ==
               "refused"]
    assert refused[0].reason == result.reason
    assert device.slots == [None, None]  # nothing installed


class RawDevice:
    """A device's own MQTT login publishing whatever bytes a test gives it."""

    def __init__(self, broker: MosquittoServer, identity: DeviceIdentity,
                 will: bool = False) -> None:
        self.connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=identity.device_id,
                                  protocol=mqtt.MQTTv311)
        self.client.username_pw_set(identity.device_id, identity.password)
        if will:
            self.client.will_set(p.presence_topic(identity.device_id), p.OFFLINE, 1, True)
        self.client.on_connect = lambda *_a: self.connected.set()
        self.client.connect(broker.host, broker.port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(5)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, 1, retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_bad_device_messages_are_rejected_logged_counted_and_never_reach_the_sink(
        rig: Rig, mosquitto_server: MosquittoServer, caplog: pytest.LogCaptureFixture) -> None:
    identity = rig.fleet.register(1, "stm32f746", "hostile")[0]
    device_id = identity.device_id
    raw = RawDevice(mosquitto_server, identity)
    metrics = rig.bridge.metrics
    before = {ch: metrics.rejections(ch) for ch in ("evt", "metrics", "presence", "req")}
    evt, met = p.evt_topic(device_id), p.metrics_topic(device_id)
    bad = [
        (evt, b"{not json"),
        (evt, b'{"update_id": "u", "state": "installed", "secret": 1}'),  # unknown field
        (evt, b'{"update_id": "u", "state": "installed", "progress": "all"}'),  # wrong type
        (evt, b'{"update_id": "u", "state": "failed", "reason": "' + b"x" * 2000 + b'"}'),
        (met, b'{"round": 1, "samples_used": 3, "raw_samples": [[0.1, 0.2]]}'),
        (p.presence_topic(device_id), b"maybe"),
        (p.req_topic(device_id, "nothing-here"), b'{"ranges": [[0, 4]]}'),  # no artifact
        (p.req_topic(device_id, "nothing-here"), b'{"ranges": [[4, 0]]}'),
    ]
    # A device that asks for its image again and again is served 4 images' worth, no more.
    small = signed_image(rig.fleet.signing_key(), "stm32f746", 5000, seed=9)  # 2 blocks
    rig.sink.assigned[(device_id, "flood")] = rig.store.put(small)
    bad += [(p.req_topic(device_id, "flood"), b'{"ranges": [[0, 2]]}')] * 5
    caplog.set_level(logging.WARNING, logger="workers.bridge")
    for topic, payload in bad:
        raw.publish(topic, payload)
    marker = p.DeviceEvent(update_id="marker", state=p.UpdateState.ACCEPTED)
    raw.publish(evt, p.encode(marker))  # in order after the bad ones: once it is in, all are
    assert wait_for(lambda: rig.sink.everything_from(device_id) == [marker], 5), \
        rig.sink.everything_from(device_id)
    raw.close()
    after = {ch: metrics.rejections(ch) - before[ch] for ch in before}
    assert after == {"evt": 4, "metrics": 1, "presence": 1, "req": 3}
    assert metrics.value("tinyfleet_bridge_rejected", channel="evt", kind="too_large") >= 1
    assert metrics.value("tinyfleet_bridge_rejected", channel="req", kind="over_budget") >= 1
    logged = [r.getMessage() for r in caplog.records if f"device={device_id}" in r.getMessage()]
    assert len(logged) == 9 and all(m.startswith("rejected ") for m in logged)
    assert any("update flood: 10 blocks asked in all, over 4 x the image's 2" in m
               for m in logged)
    assert any("secret: unknown field" in m for m in logged)
    assert any("progress" in m and "kind=invalid" in m for m in logged)
    assert any("over the 1024-byte cap" in m for m in logged)
    assert any("no artifact for update nothing-here" in m for m in logged)


def test_presence_follows_the_last_will_and_pending_offers_go_out_on_online(
        rig: Rig, mosquitto_server: MosquittoServer) -> None:
    # Presence: online, then the last will when the connection drops without a goodbye.
    identity = rig.fleet.register(1, "stm32f746", "flaky")[0]
    raw = RawDevice(mosquitto_server, identity, will=True)
    raw.publish(p.presence_topic(identity.device_id), p.ONLINE, retain=True)
    assert wait_for(lambda: (identity.device_id, True) in rig.sink.presence, 5)
    sock = raw.client.socket()
    assert sock is not None
    sock.close()  # a dead device: the broker publishes its will
    assert wait_for(lambda: (identity.device_id, False) in rig.sink.presence, 10)
    raw.client.loop_stop()
    # An offer made while a device was offline reaches it when it comes online.
    device = rig.device()
    image = signed_image(rig.fleet.signing_key(), "stm32f746", IMAGE_BYTES // 2, seed=4)
    sha = rig.store.put(image)
    rig.sink.assigned[(device.device_id, "upd-late")] = sha
    rig.sink.pending[device.device_id] = [p.make_offer("upd-late", image)]
    rig.loop.add([device])
    assert outcome(device, "upd-late").state is p.UpdateState.INSTALLED
    assert rig.bridge.metrics.value("tinyfleet_bridge_commands_sent") >= 1


def restart_broker(broker: MosquittoServer) -> MosquittoServer:
    """Stop Mosquitto and start it again on the same port and directory (state kept)."""
    broker.stop()
    plan = _plan(broker.files.broker_dir.parent, mqtt_port=broker.port)
    proc = spawn(mosquitto_spec(plan, broker.files))
    try:
        wait_until(lambda: tcp_open(broker.host, broker.port), "mosquitto to listen again",
                   30, [proc])
    except BaseException:
        stop_group(proc, 2.0)
        raise
    return MosquittoServer(broker.port, broker.files, proc)


def test_the_broker_restarted_mid_transfer_the_device_resumes_with_missing_blocks_only(
        mosquitto_factory: Callable[[], MosquittoServer]) -> None:
    broker = mosquitto_factory()  # its own: this test restarts it
    var = Path(tempfile.mkdtemp(prefix="tinyfleet-ota-restart-"))
    rig = start_rig(broker, var)
    restarted: MosquittoServer | None = None
    try:
        device = rig.device(window=8, retry_s=1.0,
                            faults=Faults(stall_after_blocks=12, stall_s=2.5))
        rig.loop.add([device])
        image = signed_image(rig.fleet.signing_key(), "stm32f746", IMAGE_BYTES, seed=5)
        rig.offer(device, image, "upd-restart")
        assert wait_for(lambda: device.download is not None and device.download.stalled, 10)
        held_at_restart = set(device.download.blocks) if device.download else set()
        assert 12 <= len(held_at_restart) < 31
        restarted = restart_broker(broker)
        result = outcome(device, "upd-restart")
        assert result.state is p.UpdateState.INSTALLED, result.reason
        assert device.connects >= 2
        # Never asked for a block it held; after the restart, only for what it lacked.
        assert all(not set(asked) & held for asked, held in device.requests)
        later = [set(asked) for asked, held in device.requests if held >= held_at_restart]
        assert later and not set().union(*later) & held_at_restart
        assert device.slots[0] == image  # sha256 and signature verified before this
    finally:
        stop_rig(rig)
        if restarted is not None:
            restarted.stop()
        shutil.rmtree(var, ignore_errors=True)


def test_the_bridge_process_runs_from_the_environment(
        rig: Rig, mosquitto_server: MosquittoServer) -> None:
    """`python -m workers.bridge` with TINYFLEET_* settings: validates, logs, exports counters,
    stops on SIGTERM."""
    metrics_port = free_port()
    env = {**os.environ, "TINYFLEET_VAR_DIR": str(rig.fleet.config["VAR_DIR"]),
           "TINYFLEET_BROKER_DIR": str(mosquitto_server.files.broker_dir),
           "TINYFLEET_MQTT_HOST": mosquitto_server.host,
           "TINYFLEET_MQTT_PORT": str(mosquitto_server.port),
           "TINYFLEET_BRIDGE_METRICS_PORT": str(metrics_port)}
    proc = subprocess.Popen([sys.executable, "-m", "workers.bridge", "--client-id",
                             "bridge-process-test"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        assert wait_for(lambda: any("bridge connected" in line for line in lines), 15), lines
        identity = rig.fleet.register(1, "stm32f746", "process")[0]
        raw = RawDevice(mosquitto_server, identity)
        raw.publish(p.evt_topic(identity.device_id), b'{"state": "installed", "x": 1}')
        raw.publish(p.evt_topic(identity.device_id), p.encode(
            p.DeviceEvent(update_id="u-9", state=p.UpdateState.ACCEPTED)))
        raw.close()
        assert wait_for(lambda: any(f"event device={identity.device_id} update=u-9 state="
                                    "accepted" in line for line in lines), 10), lines
        assert any(f"rejected device={identity.device_id} channel=evt kind=invalid" in line
                   for line in lines)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            exported = response.read().decode()
        assert 'tinyfleet_bridge_rejected_total{channel="evt",kind="invalid"} 1.0' in exported
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
