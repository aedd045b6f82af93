"""OTA campaigns with real agents: `tinyfleet-agent --simulate N` processes (qemu backend:
the self-test runs each image's test vectors in the emulator of its core) instead of the
protocol reference client, through the real stack (the API, Celery worker and beat
processes on Redis, the MQTT bridge with the database sink on Mosquitto).

- a campaign installs on every agent, each reporting its states; the service's device rows
  and the agents' slot files agree;
- a rollback with nothing to go back to fails with the agent's reason; after a second
  campaign a rollback returns every agent to its previous slot;
- an agent killed -9 while writing an update (a durability boundary of the install) boots its
  good slot on restart and reports the interrupted update as failed, with the reason;
- an agent on the `host` backend (an RP2040: no QEMU board for its Cortex-M0+) names its
  backend in its presence and is offered its class build's signed host library
  (host-x86_64), which it installs and self-tests; a device whose presence names a host
  machine the build has no image for fails with that reason.

The campaign rig (tests/workers/test_campaigns.py's `Rig`) is reused; the devices are agents.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from device_agent import protocol as p
from device_agent.config import render_config
from device_agent.durable import CRASH_ENV, RECORD_ENV
from device_agent.mqtt_device import device_client
from device_agent.profile import host_target_name
from device_agent.slots import IMAGE, STATE, sha256_hex
from firmware.image import parse_image, public_key_pem
from service.models import ClassBuild, DeploymentJob, Device, SignedArtifact
from service.stack.procs import Started
from tests.servers import MosquittoServer, RedisServer, wait_for
from tests.workers.test_campaigns import Rig, campaign_rig

pytestmark = [pytest.mark.integration, pytest.mark.toolchain, pytest.mark.slow]

MCU = "stm32f746"  # cortex-m7: QEMU's mps2-an500 runs the agents' self-tests
AGENT = str(Path(sys.executable).with_name("tinyfleet-agent"))
# The job states an agent's events move a job through, in order (the service folds
# verifying, installing and self_test into `installing`, and may fold quick steps together).
AGENT_STATES = ["offered", "accepted", "downloading", "installing", "installed"]


@pytest.fixture(scope="module")
def rig(mosquitto_server: MosquittoServer, redis_server: RedisServer,
        digits_family: Path) -> Iterator[Rig]:
    """The campaign rig of tests/workers/test_campaigns.py on its own Redis database; the
    devices are agent processes (its reference-client loop stays unused)."""
    with campaign_rig(mosquitto_server, redis_server, digits_family, "agent-campaigns", 9,
                      ("agents",), None) as rig:
        yield rig


class Agents:
    """Devices registered through the API, run by one `tinyfleet-agent --simulate N`."""

    def __init__(self, rig: Rig, root: Path, n: int, name: str, mcu: str = MCU,
                 backend: str = "qemu") -> None:
        self.rig, self.name, self.dir = rig, name, root / name
        self.dir.mkdir(parents=True)
        rig.counter += 1
        self.tag = f"{name}-{rig.counter}"
        rows = [{"name": f"{self.tag}-{i}", "fleet": "agents", "mcu": mcu,
                 "tags": [self.tag]} for i in range(n)]
        response = rig.api.post("/api/v1/devices/bulk", json={"devices": rows})
        assert response.status_code == 201, response.get_json()
        pem = public_key_pem(rig.keys["agents"]).decode()
        self.ids: list[str] = []
        for row in response.get_json()["devices"]:
            device_id = row["id"]
            (self.dir / f"{device_id}.toml").write_text(render_config(
                device_id=device_id, password=row["mqtt_password"], mcu=mcu, backend=backend,
                broker_host=rig.broker.host, broker_port=rig.broker.port,
                data_dir=f"{device_id}/data", slot_dir=f"{device_id}/slots",
                public_key_pem=pem))
            self.ids.append(device_id)
        self.proc: Started | None = None

    def start(self, **env: str) -> None:
        """Start the agent process (extra environment: the crash hook) and wait for it."""
        saved = dict(self.rig.env)
        self.rig.env.update(env)
        try:
            self.proc = self.rig.start(self.name, (
                AGENT, "--simulate", str(len(self.ids)), "--config-dir", str(self.dir)))
        finally:
            self.rig.env.clear()
            self.rig.env.update(saved)
        assert wait_for(lambda: self.rig.online(set(self.ids)), 60), self.rig.tail()

    def stop(self) -> None:
        """SIGTERM: a clean stop (every device says offline)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        code = self.proc.popen.wait(30)
        assert code == 0, (code, self.rig.tail())
        self.proc = None

    def slots(self, device_id: str) -> dict[str, Any]:
        """The device's state.json (which slot boots, the previous one, the last outcome)."""
        state: dict[str, Any] = json.loads((self.dir / device_id / "slots" / STATE).read_text())
        return state

    def image_sha(self, device_id: str, slot: str) -> str:
        return sha256_hex((self.dir / device_id / "slots" / f"slot-{slot}" / IMAGE).read_bytes())


def _jobs(rig: Rig, campaign_id: int) -> dict[str, DeploymentJob]:
    return {j.device_id: j for j in rig.rows(DeploymentJob, campaign_id=campaign_id)}


def _states(rig: Rig, job_id: int) -> list[str]:
    events = rig.api.get(f"/api/v1/jobs/{job_id}").get_json()["events"]
    return [e["state"] for e in events]


def _active(agents: Agents, device_id: str) -> str:
    state = agents.slots(device_id)
    active: str = state["active"]
    return active


@pytest.fixture
def work() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="tinyfleet-agents-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_campaigns_install_on_agents_which_report_and_roll_back(rig: Rig, work: Path) -> None:
    agents = Agents(rig, work, 3, "agents")
    agents.start()
    first = rig.campaign(rig.keys["model"], agents.tag)
    done = rig.wait_state(first["id"], {"completed"}, 150)
    assert done["counts"] == {"installed": 3}, done
    jobs = _jobs(rig, first["id"])
    with rig.session() as s:
        rows = {d.id: d for d in s.scalars(select(Device).where(Device.id.in_(agents.ids)))}
    first_slot = {}
    for device_id in agents.ids:
        job, row = jobs[device_id], rows[device_id]
        states = _states(rig, job.id)
        changes = [x for i, x in enumerate(states) if i == 0 or x != states[i - 1]]
        reported = changes[len(changes) - changes[::-1].index("offered"):]
        assert reported[-1] == "installed" and set(reported) <= set(AGENT_STATES), str(changes)
        assert reported == sorted(reported, key=AGENT_STATES.index), str(changes)
        active = _active(agents, device_id)  # the agent's own record agrees with the service
        seen = (row.update_state, row.installed_slot, agents.slots(device_id))
        assert row.update_state == "installed", seen
        assert row.installed_slot == str("ab".index(active)), seen
        assert row.installed_artifact == job.artifact_sha256 == agents.image_sha(device_id,
                                                                                 active)
        first_slot[device_id] = active

    # Nothing to go back to: every agent says so, and its job fails with that reason.
    refused = rig.api.post(f"/api/v1/campaigns/{first['id']}/rollback").get_json()
    assert refused["counts"] == {"rollback-sent": 3}
    assert wait_for(lambda: rig.show(first["id"])["counts"] == {"failed": 3}, 60), (
        rig.show(first["id"]), rig.tail())
    assert "no previous slot to roll back to" in rig.show(first["id"])["failures"][0]["reason"]

    second = rig.campaign(rig.keys["model"], agents.tag)
    done = rig.wait_state(second["id"], {"completed"})
    assert done["counts"] == {"installed": 3}, (done, rig.tail())
    for device_id in agents.ids:  # the other slot now boots
        assert _active(agents, device_id) != first_slot[device_id], agents.slots(device_id)
    rolled = rig.api.post(f"/api/v1/campaigns/{second['id']}/rollback").get_json()
    assert rolled["counts"] == {"rollback-sent": 3}
    assert wait_for(lambda: rig.show(second["id"])["counts"] == {"rolled-back": 3}, 60), (
        rig.show(second["id"]), rig.tail())
    agents.stop()
    for device_id in agents.ids:  # back on the first campaign's slot, after a clean stop
        state = agents.slots(device_id)
        assert state["active"] == first_slot[device_id], state
        assert state["outcome"]["state"] == "rolled_back" and state["outcome"]["reported"], state
    assert wait_for(lambda: not any(d.online for d in rig.rows(Device) if d.id in agents.ids),
                    30), rig.tail()


def test_an_agent_killed_while_writing_an_update_boots_its_good_slot_and_reports_it(
        rig: Rig, work: Path) -> None:
    agents = Agents(rig, work, 1, "victim")
    (device_id,) = agents.ids
    record = work / "boundaries.txt"
    agents.start(**{RECORD_ENV: str(record)})
    first = rig.campaign(rig.keys["model"], agents.tag)
    assert rig.wait_state(first["id"], {"completed"}, 150)["counts"] == {"installed": 1}
    good = _active(agents, device_id)
    agents.stop()
    names = record.read_text().split()
    # The first boundary inside the image's write into the inactive slot: the update is
    # incomplete when the agent dies there.
    kill_at = next(i for i, n in enumerate(names) if IMAGE in n)

    agents.start(**{CRASH_ENV: str(kill_at)})
    second = rig.campaign(rig.keys["model"], agents.tag)
    assert agents.proc is not None
    assert agents.proc.popen.wait(60) == -signal.SIGKILL, rig.tail()
    assert _active(agents, device_id) == good  # nothing was switched
    agents.start()  # restarted without the hook: recovers, boots slot `good`, reports
    done = rig.wait_state(second["id"], {"completed"})
    assert done["counts"] == {"failed": 1}, done
    assert "interrupted while writing" in done["failures"][0]["reason"]
    agents.stop()
    state = agents.slots(device_id)
    assert state["active"] == good and state["pending"] is None
    staging = work / "victim" / device_id / "slots" / "staging"  # its blocks are dropped
    assert not staging.exists() or not any(staging.iterdir())
    assert agents.image_sha(device_id, good) == _jobs(rig, first["id"])[device_id].artifact_sha256


def test_a_host_backend_agent_installs_its_class_builds_host_library(rig: Rig,
                                                                     work: Path) -> None:
    host = host_target_name()
    agents = Agents(rig, work, 1, "host", mcu="rp2040", backend="host")
    (device_id,) = agents.ids
    # A device whose presence names a host machine no build here makes an image for.
    response = rig.api.post("/api/v1/devices/bulk", json={"devices": [
        {"name": f"{agents.tag}-foreign", "fleet": "agents", "mcu": "rp2040",
         "tags": [agents.tag]}]})
    assert response.status_code == 201, response.get_json()
    foreign = response.get_json()["devices"][0]
    client = device_client(foreign["id"], foreign["mqtt_password"])
    client.connect(rig.broker.host, rig.broker.port)
    client.loop_start()
    try:
        client.publish(p.presence_topic(foreign["id"]),
                       p.encode_presence(True, "host-riscv64"), qos=1, retain=True)
        agents.start()
        with rig.session() as s:
            assert wait_for(lambda: s.get(Device, foreign["id"], populate_existing=True
                                          ).backend == "host-riscv64", 20), rig.tail()
            assert s.get(Device, device_id).backend == host  # from the agent's presence
        campaign = rig.campaign(rig.keys["model"], agents.tag)
        done = rig.wait_state(campaign["id"], {"completed"}, 150)
    finally:
        client.loop_stop()
        client.disconnect()
    assert done["counts"] == {"installed": 1, "failed": 1}, (done["failures"], rig.tail())
    (failure,) = done["failures"]
    assert failure["device"] == foreign["id"], failure
    assert "runs host-riscv64 images" in failure["reason"], failure
    assert f"only a {host} host image" in failure["reason"], failure

    job = _jobs(rig, campaign["id"])[device_id]
    assert _states(rig, job.id)[-1] == "installed"
    active = _active(agents, device_id)
    installed = (work / "host" / device_id / "slots" / f"slot-{active}" / IMAGE).read_bytes()
    assert parse_image(installed).manifest.target.name == host
    with rig.session() as s:
        row = s.get(Device, device_id)
        signed = s.scalar(select(SignedArtifact).where(SignedArtifact.host_sha256
                                                       == job.artifact_sha256))
        assert signed is not None, "the offered artifact is not the build's host image"
        build = s.get(ClassBuild, signed.build_id)
        assert build is not None and build.host_target == host and not build.emulated
        assert row.update_state == "installed"
        assert row.installed_artifact == job.artifact_sha256 == sha256_hex(installed)
    agents.stop()
