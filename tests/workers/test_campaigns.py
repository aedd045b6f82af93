"""OTA campaigns end to end: the API, real Celery worker and beat processes on a real Redis,
the MQTT bridge process with the database sink on a real Mosquitto, and protocol reference
clients (device_agent.reference_client) that verify every image's hash and signature.

One cold campaign (three MCU classes in two fleets: one search and one build per class, one
signature per (artifact, fleet)); the later tests reuse its plans and builds (the same
model version, the same database) and build only the classes they need fresh.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from device_agent import protocol as p
from device_agent.device_loop import DeviceLoop
from device_agent.reference_client import DeviceIdentity, Faults, ReferenceDevice
from service.app import create_app
from service.auth import create_token
from service.broker_sync import full_sync
from service.models import (
    AnalysisState,
    ClassBuild,
    ClassPlan,
    DeploymentJob,
    Device,
    ModelKind,
    ModelVersion,
    Role,
    SignedArtifact,
)
from service.stack.procs import ProcessSpec, Started, spawn, stop_group, stop_groups
from tests.servers import MosquittoServer, RedisServer, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.toolchain, pytest.mark.slow]

CAMPAIGN_S = 90.0


def _worker_argv(name: str) -> tuple[str, ...]:
    return (sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
            "--concurrency", "2", "--loglevel", "INFO", "--hostname", f"{name}@%h",
            "--without-mingle", "--without-gossip")


@dataclass
class Rig:
    """The service side (app, processes) and the devices."""

    app: Flask
    api: FlaskClient
    env: dict[str, str]
    logs: Path
    broker: MosquittoServer
    loop: DeviceLoop
    keys: dict[str, Any] = field(default_factory=dict)  # fleet -> public key
    procs: dict[str, Started] = field(default_factory=dict)
    devices: dict[str, ReferenceDevice] = field(default_factory=dict)
    counter: int = 0

    def start(self, name: str, argv: tuple[str, ...]) -> Started:
        """Start one of the stack's processes with the rig's settings."""
        self.counter += 1
        started = spawn(ProcessSpec(name, argv, self.logs / f"{name}-{self.counter}.log",
                                    env=self.env))
        self.procs[name] = started
        return started

    def register(self, fleet: str, mcu: str, n: int, *, connect: bool = True,
                 claim_mcu: str | None = None, faults: Faults | None = None,
                 layout: str = "ab") -> list[ReferenceDevice]:
        """Register `n` devices through the API and (unless told not to) connect them."""
        self.counter += 1
        rows = [{"name": f"{fleet}-{mcu}-{self.counter}-{i}", "fleet": fleet, "mcu": mcu,
                 "tags": [f"t{self.counter}"], "ota_layout": layout} for i in range(n)]
        response = self.api.post("/api/v1/devices/bulk", json={"devices": rows})
        assert response.status_code == 201, response.get_json()
        out = []
        for row in response.get_json()["devices"]:
            identity = DeviceIdentity(row["id"], row["mqtt_password"], claim_mcu or mcu)
            device = ReferenceDevice(identity, self.keys[fleet], faults=faults, retry_s=0.5)
            self.devices[row["id"]] = device
            out.append(device)
        if connect:
            self.connect(out)
        return out

    def connect(self, devices: list[ReferenceDevice]) -> None:
        """Connect devices and wait until the service knows them online."""
        self.loop.add(devices)
        ids = {d.device_id for d in devices}
        assert wait_for(lambda: all(d.ready.is_set() for d in devices), 20)
        assert wait_for(lambda: self.online(ids), 20), "presence never reached the database"

    def online(self, ids: set[str]) -> bool:
        with self.session() as s:
            return bool(s.scalar(select(func.count()).where(
                Device.id.in_(ids), Device.online.is_(True))) == len(ids))

    def session(self) -> Any:
        return self.app.extensions["tinyfleet.sessionmaker"]()

    def campaign(self, model: str, tag: str | None = None, **policy: Any) -> dict[str, Any]:
        """Start a campaign over devices with tag `tag` (the last registered batch)."""
        body = {"model_version": model, "selector": {"tags": [tag or f"t{self.counter}"]},
                "policy": {"canary_percent": 0, "batch_size": 100,
                           "max_failure_percent": 100, **policy}}
        response = self.api.post("/api/v1/campaigns", json=body)
        assert response.status_code == 201, response.get_json()
        return dict(response.get_json())

    def show(self, campaign_id: int) -> dict[str, Any]:
        return dict(self.api.get(f"/api/v1/campaigns/{campaign_id}").get_json())

    def wait_state(self, campaign_id: int, states: set[str], timeout_s: float = CAMPAIGN_S
                   ) -> dict[str, Any]:
        """Wait until the campaign is in one of `states`; its last view."""
        ok = wait_for(lambda: self.show(campaign_id)["state"] in states, timeout_s, 0.25)
        seen = self.show(campaign_id)
        assert ok, (seen, self.tail())
        return seen

    def tail(self) -> str:
        """The end of every process log (for failure messages)."""
        out = []
        for log in sorted(self.logs.glob("*.log")):
            out.append(f"--- {log.name}\n" + log.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def rows(self, model: type, **where: Any) -> list[Any]:
        with self.session() as s:
            query = select(model)
            for key, value in where.items():
                query = query.where(getattr(model, key) == value)
            return list(s.scalars(query).all())


@contextlib.contextmanager
def campaign_rig(mosquitto_server: MosquittoServer, redis_server: RedisServer, family: Path,
                 name: str, redis_db: int, fleets: Sequence[str],
                 loop: DeviceLoop | None) -> Iterator[Rig]:
    """The real parts of a campaign around the app in process: the Celery worker, beat and
    the MQTT bridge with the database sink as processes, on Redis database `redis_db`;
    `fleets` created and `family` registered. `loop` (reference clients) is started with
    them, None when the devices are processes of their own (agents)."""
    with tempfile.TemporaryDirectory(prefix=f"tinyfleet-{name}-") as tmp:
        var = Path(tmp) / "var"
        files = mosquitto_server.files
        settings: dict[str, Any] = {
            "VAR_DIR": str(var), "DATABASE_URL": f"sqlite:///{var / 'tinyfleet.db'}",
            "BROKER_DIR": str(files.broker_dir), "MOSQUITTO_PID_FILE": str(files.pid_file),
            "MQTT_HOST": mosquitto_server.host, "MQTT_PORT": mosquitto_server.port,
            "REDIS_URL": redis_server.url.rsplit("/", 1)[0] + f"/{redis_db}",
            "SEARCH_POPULATION": 8, "SEARCH_GENERATIONS": 2, "LEASE_S": 3,
            "STUCK_AFTER_S": 4, "RECONCILE_INTERVAL_S": 1}
        app = create_app(settings)
        full_sync(app.extensions["tinyfleet.engine"], mosquitto_server.target)
        with app.app_context():
            session = app.extensions["tinyfleet.sessionmaker"]()
            _, secret = create_token(session, Role.ADMIN, name=f"{name}-tests")
            session.commit()
            session.close()
        api = app.test_client()
        api.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {secret}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TINYFLEET_")}
        env.update({f"TINYFLEET_{k}": str(v) for k, v in settings.items()})
        env["TINYFLEET_AUTO_MIGRATE"] = "0"
        logs = Path(os.environ.get("CAMPAIGN_TEST_LOGS") or Path(tmp) / "logs")
        rig = Rig(app, api, env, logs, mosquitto_server,
                  loop or DeviceLoop(mosquitto_server.host, mosquitto_server.port))
        try:
            for fleet in fleets:
                response = api.post("/api/v1/fleets", json={"name": fleet})
                assert response.status_code == 201
                rig.keys[fleet] = load_pem_public_key(
                    response.get_json()["signing_public_key"].encode())
            rig.start("worker", _worker_argv(name))
            rig.start("beat", (sys.executable, "-m", "celery", "-A", "workers.celery_app",
                               "beat", "--loglevel", "INFO", "--schedule",
                               str(var / "beat-schedule")))
            rig.start("bridge", (sys.executable, "-m", "workers.bridge", "--sink",
                                 "workers.sink:database_sink"))
            if loop is not None:
                loop.start()
            response = api.post("/api/v1/models", json={"name": "digits", "path": str(family),
                                                        "analyze": False})
            assert response.status_code == 201, response.get_json()
            rig.keys["model"] = response.get_json()["model"]["id"]
            yield rig
        finally:
            if loop is not None:
                loop.stop()
            stop_groups(list(rig.procs.values()), 5.0)  # all at once: beat takes its time
            app.extensions["tinyfleet.engine"].dispose()


@pytest.fixture(scope="module")
def rig(mosquitto_server: MosquittoServer, redis_server: RedisServer,
        digits_family: Path) -> Iterator[Rig]:
    loop = DeviceLoop(mosquitto_server.host, mosquitto_server.port, reconnect_s=0.2)
    with campaign_rig(mosquitto_server, redis_server, digits_family, "campaigns", 4,
                      ("north", "south"), loop) as rig:
        yield rig


def test_a_campaign_over_three_classes_in_two_fleets_completes_with_one_build_per_class(
        rig: Rig) -> None:
    tag = "cold"
    # nrf52840 and stm32f412 are one class (Cortex-M4, 256 kB SRAM, 1 MB Flash): one build,
    # named after one of them, that both take (the device checks the core and the sizes).
    devices = (rig.register("north", "stm32f746", 2) + rig.register("north", "rp2040", 1)
               + rig.register("south", "stm32f412", 1) + rig.register("south", "nrf52840", 1)
               + rig.register("south", "stm32f746", 1))
    ids = [d.device_id for d in devices]
    for device_id in ids:  # one tag over all of them
        assert rig.api.patch(f"/api/v1/devices/{device_id}", json={"tags": [tag]}
                             ).status_code == 200
    c = rig.campaign(rig.keys["model"], tag, canary_percent=20, batch_size=3)
    assert c["batch_count"] == 3  # a canary of 2 (20 % of 6, rounded up), then 3, then 1
    done = rig.wait_state(c["id"], {"completed"})
    assert done["counts"] == {"installed": 6}, done
    plans, builds = rig.rows(ClassPlan), rig.rows(ClassBuild)
    assert len(plans) == 3 and not any(r.from_cache for r in plans)  # one search per class
    assert len(builds) == 3 and not any(r.from_cache for r in builds)  # one build per class
    emulated = {b.hw_class.split("-slot")[0]: b.emulated for b in builds}
    assert emulated == {"cortex-m7-sram327680": True, "cortex-m4-sram262144": True,
                        "cortex-m0plus-sram270336": False}
    # One signature per (artifact, fleet): the M7 build is signed for both fleets.
    signed = rig.rows(SignedArtifact)
    assert len(signed) == 4 and len({(s.build_id, s.fleet_id) for s in signed}) == 4
    for device in devices:
        outcome = device.outcomes[f"u{_job_of(rig, c['id'], device.device_id).id}"]
        assert outcome.state is p.UpdateState.INSTALLED  # hash and signature verified
    with rig.session() as s:
        rows = {d.id: d for d in s.scalars(select(Device).where(Device.id.in_(ids)))}
        jobs = {j.device_id: j for j in s.scalars(select(DeploymentJob).where(
            DeploymentJob.campaign_id == c["id"]))}
    for device_id in ids:
        row, job = rows[device_id], jobs[device_id]
        assert row.installed_artifact == job.artifact_sha256
        assert row.installed_model_version == rig.keys["model"]
        assert row.update_state == "installed" and row.installed_slot in ("0", "1")
    m4 = [b for b in builds if b.hw_class.startswith("cortex-m4")]
    assert json.loads(m4[0].manifest)["target"]["name"] in ("stm32f412", "nrf52840")
    rp = next(j for j in jobs.values() if j.hw_class.startswith("cortex-m0plus"))
    rp_events = rig.api.get(f"/api/v1/jobs/{rp.id}").get_json()["events"]
    assert rp.emulated is False and any("not emulated" in (e["reason"] or "")
                                        for e in rp_events)
    if os.environ.get("CAMPAIGN_DEBUG"):
        for j in jobs.values():
            ev = rig.api.get(f"/api/v1/jobs/{j.id}").get_json()["events"]
            print(j.device_id, j.batch, [(e["state"], e["at"][11:23]) for e in ev])
        for b in builds + plans:
            print(type(b).__name__, b.hw_class, b.seconds, b.created_at)
        print(rig.tail())
    job = rig.api.get(f"/api/v1/jobs/{jobs[ids[0]].id}").get_json()
    states = [e["state"] for e in job["events"]]
    changes = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
    assert changes[:5] == ["pending", "queued", "planning", "building", "offering"]
    assert states[-1] == "installed" and all(e["at"] for e in job["events"])


def _job_of(rig: Rig, campaign_id: int, device_id: str) -> DeploymentJob:
    (job,) = rig.rows(DeploymentJob, campaign_id=campaign_id, device_id=device_id)
    return job


def test_a_device_nothing_fits_fails_with_the_numbers_while_the_others_succeed(
        rig: Rig) -> None:
    # 20 kB SRAM, 128 kB Flash in one slot: the smallest subnet's weights and code do not fit.
    small = rig.register("north", "stm32f103", 1, connect=False, layout="single")
    fine = rig.register("north", "stm32f746", 1)
    # An ESP32-S3 (Xtensa): no compiler here builds for it; skipped with that reason, no
    # device failure (it is left out of the failure share).
    esp = rig.register("north", "esp32s3", 1, connect=False)
    tag = "fit"
    for device in small + fine + esp:
        rig.api.patch(f"/api/v1/devices/{device.device_id}", json={"tags": [tag]})
    c = rig.campaign(rig.keys["model"], tag)
    done = rig.wait_state(c["id"], {"completed"})
    assert done["counts"] == {"failed": 1, "installed": 1, "skipped": 1}
    (failure,) = done["failures"]
    assert failure["device"] == small[0].device_id
    assert "fits" in failure["reason"] and "kB Flash, one slot has" in failure["reason"]
    skipped = _job_of(rig, c["id"], esp[0].device_id)
    assert skipped.state.value == "skipped" and skipped.reason is not None
    assert skipped.reason.startswith("no toolchain for xtensa-lx7") and (
        "not built, not emulated" in skipped.reason)
    assert not [r for r in rig.rows(ClassPlan) if r.hw_class.startswith("xtensa")]


def test_the_canary_gates_the_rollout_and_failures_halt_it(rig: Rig) -> None:
    # The canary device claims another MCU: it refuses the offer.
    liar = rig.register("south", "stm32f412", 1, claim_mcu="stm32h743")
    rest = rig.register("south", "stm32f412", 3)
    tag = "canary"
    for device in liar + rest:
        rig.api.patch(f"/api/v1/devices/{device.device_id}", json={"tags": [tag]})
    c = rig.campaign(rig.keys["model"], tag, canary_percent=25, batch_size=3,
                     max_failure_percent=20)
    # The liar has the smallest id? Not necessarily: the canary is the first device by id.
    halted = rig.wait_state(c["id"], {"halted", "completed"})
    canary_job = next(j for j in rig.rows(DeploymentJob, campaign_id=c["id"]) if j.batch == 0)
    if canary_job.device_id == liar[0].device_id:
        assert halted["state"] == "halted" and "1 of 1 finished jobs failed" in (
            halted["halt_reason"])
        assert halted["counts"] == {"failed": 1, "pending": 3}  # batch 1 never released
    else:  # the liar is in batch 1: the canary passed, batch 1 ran, the share halted it
        assert halted["state"] == "halted", halted
        assert halted["counts"]["failed"] == 1 and halted["counts"]["installed"] >= 1
    # The class's build is named after stm32f412 or nrf52840 (one class): the core decides.
    assert "this device is stm32h743: core cortex-m4, not cortex-m7" in halted["failures"][0][
        "reason"]
    closed = rig.api.post(f"/api/v1/campaigns/{c['id']}/close").get_json()
    assert closed["state"] == "closed"


def _sent(counts: dict[str, int], answered: str) -> int:
    """Jobs whose rollback was sent, answered (`answered`) or not yet; nothing else."""
    assert set(counts) <= {"rollback-sent", answered}, counts
    return sum(counts.values())


def test_pause_holds_offers_resume_finishes_and_rollback_reaches_the_devices(
        rig: Rig) -> None:
    devices = rig.register("south", "stm32f412", 2)
    first = rig.campaign(rig.keys["model"])
    rig.wait_state(first["id"], {"completed"})
    # Nothing to go back to yet: each device says so, and the job fails with its reason.
    refused = rig.api.post(f"/api/v1/campaigns/{first['id']}/rollback").get_json()
    # The counts are read after the commands went out: a device may have answered already.
    assert refused["state"] == "rolled-back" and _sent(refused["counts"], "failed") == 2
    assert wait_for(lambda: rig.show(first["id"])["counts"] == {"failed": 2}, 20)
    assert "no previous image" in rig.show(first["id"])["failures"][0]["reason"]
    start_at = datetime.now(UTC) + timedelta(seconds=1)
    c = rig.campaign(rig.keys["model"], start_at=start_at.isoformat())
    assert c["state"] == "scheduled"
    paused = rig.api.post(f"/api/v1/campaigns/{c['id']}/pause").get_json()
    assert paused["state"] == "paused"
    time.sleep(2.5)  # past its start time: paused, nothing is released
    held = rig.show(c["id"])["counts"]
    assert not {"offered", "installed"} & set(held), held
    assert rig.api.post(f"/api/v1/campaigns/{c['id']}/resume").get_json()["state"] == (
        "running")
    rig.wait_state(c["id"], {"completed"})
    rolled = rig.api.post(f"/api/v1/campaigns/{c['id']}/rollback").get_json()
    assert rolled["state"] == "rolled-back" and _sent(rolled["counts"], "rolled-back") == 2
    assert wait_for(lambda: rig.show(c["id"])["counts"] == {"rolled-back": 2}, 20), (
        rig.show(c["id"]))
    for device in devices:
        assert device.events_sent[-1].state is p.UpdateState.ROLLED_BACK


def test_offline_devices_wait_and_deadlines_time_out_silent_devices(rig: Rig) -> None:
    offline = rig.register("north", "stm32f746", 1, connect=False)
    stalled = rig.register("north", "stm32f746", 1,
                           faults=Faults(stall_after_blocks=1, stall_s=120.0))
    tag = "deadlines"
    for device in offline + stalled:
        rig.api.patch(f"/api/v1/devices/{device.device_id}", json={"tags": [tag]})
    c = rig.campaign(rig.keys["model"], tag, install_deadline_s=3, offer_deadline_s=30)
    waiting = rig.wait_state(c["id"], {"waiting-offline"})
    assert waiting["counts"] == {"failed": 1, "waiting-offline": 1}, waiting
    assert waiting["failures"][0]["reason"].startswith(
        "timed out: the install was silent for 3 s")
    rig.connect(offline)  # presence: the waiting offer goes out now
    done = rig.wait_state(c["id"], {"completed"})
    assert done["counts"] == {"failed": 1, "installed": 1}


def _owner_pid(rig: Rig, hw_prefix: str) -> int:
    found: list[int] = []

    def building() -> bool:
        rows = [b for b in rig.rows(ClassBuild) if b.hw_class.startswith(hw_prefix)
                and b.state.value == "running" and b.owner]
        found[:] = [int(b.owner.rsplit(":", 1)[1]) for b in rows]
        return bool(found)

    assert wait_for(building, 60, 0.05), rig.tail()
    return found[0]


def _one_artifact(rig: Rig, campaign_id: int, hw_prefix: str) -> None:
    builds = [b for b in rig.rows(ClassBuild) if b.hw_class.startswith(hw_prefix)]
    assert len(builds) == 1 and builds[0].state.value == "done"
    assert len(rig.rows(SignedArtifact, build_id=builds[0].id)) == 1


def test_a_pool_process_killed_mid_build_the_job_completes_with_one_artifact(
        rig: Rig) -> None:
    rig.register("north", "stm32h743", 1)
    c = rig.campaign(rig.keys["model"])
    pid = _owner_pid(rig, "cortex-m7-sram524288")
    assert pid != rig.procs["worker"].pid  # a pool child builds
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    rig.wait_state(c["id"], {"completed"}, 60)
    assert time.monotonic() - started < 60
    _one_artifact(rig, c["id"], "cortex-m7-sram524288")


def test_the_main_worker_killed_mid_build_a_new_worker_completes_with_one_artifact(
        rig: Rig) -> None:
    rig.register("south", "stm32l476", 1)
    c = rig.campaign(rig.keys["model"])
    child = _owner_pid(rig, "cortex-m4-sram131072")
    main = rig.procs["worker"]
    os.kill(main.pid, signal.SIGKILL)
    os.kill(child, signal.SIGKILL)  # billiard's children die with their parent's pipe
    stop_group(main, 2.0)
    started = time.monotonic()
    rig.start("worker", _worker_argv("campaigns-restarted"))
    rig.wait_state(c["id"], {"completed"}, 60)
    assert time.monotonic() - started < 60
    _one_artifact(rig, c["id"], "cortex-m4-sram131072")


def test_an_analysis_whose_worker_died_is_taken_over_and_failed_after_its_attempts(
        rig: Rig) -> None:
    # A family version whose analysis was running on a worker that died: its lease has
    # passed. The beat's reconciler re-enqueues it; a worker takes it over (the claim's
    # compare-and-set) and, its attempts spent, fails it with the reason.
    from workers.tasks import MAX_ANALYSIS_ATTEMPTS

    with rig.session() as s:
        s.add(ModelVersion(id="dead0analysis00", name="orphan", kind=ModelKind.FAMILY,
                           path="/nonexistent", size_bytes=1,
                           analysis_state=AnalysisState.RUNNING, analysis_owner="gone:1",
                           analysis_lease_until=datetime.now(UTC) - timedelta(seconds=1),
                           analysis_attempts=MAX_ANALYSIS_ATTEMPTS))
        s.commit()

    def ended() -> ModelVersion | None:
        (row,) = rig.rows(ModelVersion, id="dead0analysis00")
        return row if row.analysis_state is not AnalysisState.RUNNING else None

    assert wait_for(lambda: ended() is not None, 20), rig.tail()
    row = ended()
    assert row is not None and row.analysis_state is AnalysisState.FAILED
    assert row.analysis_reason == (
        f"the analysis was interrupted {MAX_ANALYSIS_ATTEMPTS} times (its worker died or "
        "was killed mid-run, its lease ran out); not tried again")
    assert row.analysis_attempts == MAX_ANALYSIS_ATTEMPTS + 1 and row.analysis_owner != "gone:1"
    assert row.analysis_lease_until is None
