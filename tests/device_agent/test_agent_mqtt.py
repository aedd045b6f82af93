"""The MQTT agent on a real Mosquitto with the OTA bridge: install, resume, personalize, and
privacy (a service-account subscriber on `#` records every message; marker bytes planted in
the local data must appear in none of them, nor in the service's database, logs, artifacts)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from device_agent import protocol as p
from device_agent.agent import DeviceAgent
from device_agent.config import AgentConfig, render_config
from device_agent.local_data import LOCAL_NPZ, write_device_data
from device_agent.loop import AgentLoop
from device_agent.staging import Staging
from firmware.image import public_key_pem
from tests.device_agent.images import Images, resign
from tests.servers import MosquittoServer, wait_for
from tests.workers.test_bridge import Rig, start_rig, stop_rig
from workers.bridge import BrokerLogin

pytestmark = [pytest.mark.integration, pytest.mark.toolchain]

ROOT = Path(__file__).resolve().parents[2]
MARKER = b"\xde\xad\xbe\xefTFPRIVACY\x13\x37"
WAIT_S = 30.0


class Recorder:
    """A service-account subscriber on `#`: every message that crosses the broker."""

    def __init__(self, login: BrokerLogin) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.client = login.client("privacy-recorder")
        self.client.on_connect = lambda c, *_a: c.subscribe("#", qos=1)
        self.client.on_subscribe = lambda *_a: self.ready.set()
        self.client.on_message = self._on_message
        login.endpoint.connect(self.client)
        self.client.loop_start()
        assert self.ready.wait(10)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def from_device(self, device_id: str) -> list[tuple[p.Topic, bytes]]:
        with self.lock:
            found = [(p.parse_topic(t), m) for t, m in self.messages
                     if t.startswith(f"tinyfleet/v1/{device_id}/")]
        return [(t, m) for t, m in found
                if t.channel in (p.Channel.EVT, p.Channel.METRICS, p.Channel.PRESENCE,
                                 p.Channel.REQ)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def rig(mosquitto_server: MosquittoServer) -> Iterator[Rig]:
    with tempfile.TemporaryDirectory(prefix="tinyfleet-agent-") as var:
        started = start_rig(mosquitto_server, Path(var))
        yield started
        stop_rig(started)


def _config(rig: Rig, tmp: Path, index: int, backend: str = "host") -> AgentConfig:
    identity = rig.fleet.register(1, "stm32f746", f"agent{index}-{tmp.name[-8:]}")[0]
    text = render_config(
        device_id=identity.device_id, password=identity.password, mcu="stm32f746",
        backend=backend, broker_host=rig.fleet.broker.host, broker_port=rig.fleet.broker.port,
        data_dir="data", slot_dir="slots",
        public_key_pem=public_key_pem(rig.fleet.signing_key().public_key()).decode())
    base = tmp / identity.device_id
    base.mkdir(parents=True)
    (base / "agent.toml").write_text(text)
    return AgentConfig.load(base / "agent.toml")


def _plant_marker(data_dir: Path) -> bytes:
    """Write MARKER into the first image's pixels; the labels' bytes are a second marker."""
    path = data_dir / LOCAL_NPZ
    with np.load(path) as z:
        x, y = np.array(z["x"]), np.array(z["y"])
    flat = x.reshape(len(x), -1)
    flat[0, :len(MARKER)] = np.frombuffer(MARKER, dtype=np.uint8)
    np.savez(path, x=flat.reshape(x.shape), y=y)
    return y.astype(np.int64).tobytes()[:64]


def _offer(rig: Rig, device_id: str, image: bytes, update_id: str) -> p.OtaOffer:
    sha = rig.store.put(image)
    rig.sink.assigned[(device_id, update_id)] = sha
    offer = p.make_offer(update_id, image)
    rig.publisher.publish(device_id, offer)
    return offer


def _wait_state(rig: Rig, device_id: str, update_id: str, state: str) -> list[str]:
    assert wait_for(lambda: state in rig.sink.states(device_id, update_id), WAIT_S), \
        rig.sink.states(device_id, update_id)
    return rig.sink.states(device_id, update_id)


def test_install_resume_personalize_and_nothing_private_crosses(
        rig: Rig, images: Images, tmp_path: Path) -> None:
    key = rig.fleet.signing_key()
    host_image = resign(images.host, key)
    recorder = Recorder(BrokerLogin.from_config(rig.fleet.config))
    config = _config(rig, tmp_path, 0)
    write_device_data(config.data_dir, 0)
    label_bytes = _plant_marker(config.data_dir)
    # An agent killed mid-download left 5 blocks staged: the next one asks for the rest only.
    offer = p.make_offer("u-1", host_image)
    staging = Staging(config.slot_dir / "staging")
    staging.begin(offer)
    for i in range(5):
        staging.put("u-1", i, host_image[i * offer.block_size:(i + 1) * offer.block_size])
    agent = DeviceAgent(config)
    assert agent.download is not None and len(agent.download.blocks) == 5
    loop = AgentLoop(config.broker_host, config.broker_port, reconnect_min_s=0.2, seed=1)
    loop.add([agent])
    loop.start()
    try:
        assert agent.ready.wait(10)
        sha = rig.store.put(host_image)
        rig.sink.assigned[(config.device_id, "u-1")] = sha
        rig.publisher.publish(config.device_id, offer)
        states = _wait_state(rig, config.device_id, "u-1", "installed")
        assert states[-4:] == ["verifying", "installing", "self_test", "installed"]
        asked = [i for t, m in recorder.from_device(config.device_id)
                 if t.channel is p.Channel.REQ
                 for i in p.decode_block_request(m).indices(offer.block_count)]
        assert asked and min(asked) >= 5, asked  # resumed: the staged blocks were not asked for
        # a personalization round: metrics come back, numbers only
        rig.publisher.publish(config.device_id, p.PersonalizeCommand(round=1))
        assert wait_for(lambda: any(d == config.device_id for d, _ in rig.sink.metrics), 60)
        report = next(r for d, r in rig.sink.metrics if d == config.device_id)
        assert report.round == 1 and report.accuracy_after > report.accuracy_before
        assert agent.personalizer.describe()["overlay_round"] == 1
        # rollback with nothing before it fails with a reason; a second install then rollback
        v2 = resign(images.host, key, model_version="2")
        _offer(rig, config.device_id, v2, "u-2")
        _wait_state(rig, config.device_id, "u-2", "installed")
        rig.publisher.publish(config.device_id, p.RollbackCommand(update_id="u-2"))
        _wait_state(rig, config.device_id, "u-2", "rolled_back")
        assert agent.store.active_image().manifest.model_version == "1"
        assert agent.personalizer.describe()["overlay_round"] == 1  # slot a kept its overlay
    finally:
        loop.stop()
        time.sleep(0.3)
        recorder.close()
    # privacy: every device message is a strict protocol message, and no marker crossed
    sent = recorder.from_device(config.device_id)
    assert {t.channel for t, _ in sent} >= {p.Channel.EVT, p.Channel.METRICS, p.Channel.REQ}
    for topic, payload in sent:
        if topic.channel is p.Channel.EVT:
            p.decode_event(payload)
        elif topic.channel is p.Channel.METRICS:
            p.decode_metrics(payload)
        elif topic.channel is p.Channel.REQ:
            p.decode_block_request(payload)
        else:
            p.decode_presence(payload)
    everything = b"".join(m for _, m in recorder.messages)
    assert recorder.messages and MARKER not in everything and label_bytes not in everything
    var = Path(rig.fleet.config["VAR_DIR"])
    for path in var.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert MARKER not in data and label_bytes not in data, path
    assert ("offline" in [m.decode() for t, m in recorder.messages
                          if t.endswith(f"{config.device_id}/presence")])


def test_the_cli_simulates_devices_and_stops_cleanly_on_sigterm(rig: Rig, images: Images,
                                                                tmp_path: Path) -> None:
    configs = [_config(rig, tmp_path, i) for i in (1, 2)]
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    for c in configs:
        shutil.copy(c.data_dir.parent / "agent.toml", config_dir / f"{c.device_id}.toml")
        # relative paths are the file's: point them back at each device's directory
        text = (config_dir / f"{c.device_id}.toml").read_text()
        (config_dir / f"{c.device_id}.toml").write_text(
            text.replace('"data"', f'"{c.data_dir}"').replace('"slots"', f'"{c.slot_dir}"'))
    proc = subprocess.Popen([sys.executable, "-m", "device_agent.cli", "--simulate", "2",
                             "--config-dir", str(config_dir)],
                            cwd=ROOT, env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        for c in configs:
            assert wait_for(lambda c=c: (c.device_id, True) in rig.sink.presence, WAIT_S)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    for c in configs:  # a clean stop: each said offline itself (no last will needed)
        assert wait_for(lambda c=c: (c.device_id, False) in rig.sink.presence, 10)
        assert (c.data_dir / "local.npz").exists()  # simulated devices got their data
