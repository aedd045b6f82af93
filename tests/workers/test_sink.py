"""The sink's batches: the bridge hands the events that queued up to the sink as one run and
acknowledges only what the sink took; the database sink applies a run in one transaction,
in order, each event once (a run delivered again changes nothing), a foreign event ignored."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import select

from device_agent import protocol as p
from service.broker_control import BrokerEndpoint
from service.models import (
    Campaign,
    CampaignState,
    DeploymentJob,
    Device,
    JobEvent,
    JobState,
)
from tests.ota_fleet import OtaFleet
from tests.servers import MosquittoServer, wait_for
from workers.artifacts import ArtifactStore
from workers.bridge import Bridge, BrokerLogin, LogSink, _Delivery
from workers.sink import DatabaseSink

pytestmark = pytest.mark.integration


def _event(update_id: str, state: p.UpdateState, **fields: object) -> p.DeviceEvent:
    return p.DeviceEvent(update_id=update_id, state=state, **fields)  # type: ignore[arg-type]


def test_a_run_of_events_is_applied_in_order_once_and_moves_the_campaign_on(
        mosquitto_server: MosquittoServer, tmp_path: Path) -> None:
    fleet = OtaFleet(mosquitto_server, tmp_path)
    a, b = (identity.device_id for identity in fleet.register(2, "stm32f746", "sink"))
    maker = fleet.app.extensions["tinyfleet.sessionmaker"]
    campaign_id, job_ids = fleet.campaign_jobs("0123456789abcdef", [a, b], JobState.OFFERED,
                                               artifact_sha256="ab" * 32)
    with maker() as s:
        for job_id in job_ids:
            job = s.get(DeploymentJob, job_id)
            assert job is not None
            job.update_id = f"u{job.id}"
        s.commit()
        ua, ub = (f"u{job_id}" for job_id in job_ids)
    sink = DatabaseSink({**fleet.config, "REDIS_URL": "redis://127.0.0.1:1/0"})
    run = [(a, _event(ua, p.UpdateState.ACCEPTED)),
           (a, _event(ua, p.UpdateState.DOWNLOADING, progress=0.0)),
           (b, _event(ua, p.UpdateState.REFUSED, reason="not mine")),  # b names a's update
           (a, _event(ua, p.UpdateState.VERIFYING)),
           (a, _event(ua, p.UpdateState.INSTALLED, slot=1)),
           (b, _event(ub, p.UpdateState.REFUSED, reason="slot too small"))]
    sink.on_events(run)
    sink.on_events(run)  # delivered again (a bridge that died before acknowledging): no-op

    with maker() as s:
        got = {j.device_id: j for j in s.scalars(select(DeploymentJob))}
        assert got[a].state is JobState.INSTALLED and got[b].state is JobState.FAILED
        assert got[b].reason == "slot too small"
        events = [e.state for e in s.scalars(select(JobEvent).where(
            JobEvent.job_id == got[a].id).order_by(JobEvent.id))]
        assert events == ["accepted", "downloading", "installing", "installed"]
        device = s.get(Device, a)
        assert device is not None and device.installed_slot == "1"
        assert device.installed_artifact == "ab" * 32
        assert device.installed_model_version == "0123456789abcdef"
        done = s.get(Campaign, campaign_id)
        assert done is not None and done.state is CampaignState.COMPLETED
    assert sink.ignored == 2  # b's event for a's update, in each delivery


class FailingSink(LogSink):
    """Takes runs of events, except that a run holding a `failed` event raises (as a
    transaction that cannot commit), and so does that event on its own."""

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[int] = []
        self.applied: list[str] = []

    def on_events(self, events: Sequence[tuple[str, p.DeviceEvent]]) -> None:
        if any(e.state is p.UpdateState.FAILED for _, e in events):
            raise RuntimeError("the run's transaction failed")
        self.runs.append(len(events))
        self.applied += [e.update_id or "" for _, e in events]

    def on_event(self, device_id: str, event: p.DeviceEvent) -> None:
        self.on_events([(device_id, event)])


@pytest.mark.unit
def test_the_bridge_hands_queued_events_over_as_one_run_and_acks_only_what_the_sink_took(
        tmp_path: Path) -> None:
    sink = FailingSink()
    bridge = Bridge(sink, ArtifactStore(tmp_path), BrokerLogin(
        BrokerEndpoint("127.0.0.1", 1), "svc", "pw"))  # never connected: no broker needed
    acked: list[int] = []
    bridge.client.ack = lambda mid, qos: acked.append(mid)  # type: ignore[method-assign]
    fine = [_Delivery("d1", p.Channel.EVT, _event(f"u{i}", p.UpdateState.ACCEPTED), i, 1)
            for i in range(1, 6)]
    for item in fine:  # queued before the sink thread starts: one batch
        bridge._inbox.put(item)
    bridge._sink_thread.start()
    assert wait_for(lambda: sink.runs == [5], 10)
    bad = _Delivery("d1", p.Channel.EVT, _event("u7", p.UpdateState.FAILED, reason="x"), 7, 1)
    for item in (replace(fine[0], mid=6), bad, replace(fine[1], mid=8)):
        bridge._inbox.put(item)
    bridge._sink_thread.join(10)
    # One run of 5, then the run [6, 7, 8] failed and went one event at a time: 6 applied
    # and acknowledged, 7 stopped the bridge unacknowledged (the broker gives it again),
    # 8 never reached the sink.
    assert sink.runs == [5, 1] and sink.applied == ["u1", "u2", "u3", "u4", "u5", "u1"]
    assert acked == [1, 2, 3, 4, 5, 6]
    assert isinstance(bridge.failure, RuntimeError)
    bridge.blocks.close()


def test_presence_and_backend_show_in_the_api_and_the_device_list(
        mosquitto_server: MosquittoServer, tmp_path: Path) -> None:
    fleet = OtaFleet(mosquitto_server, tmp_path)
    host, mcu = (identity.device_id for identity in fleet.register(2, "stm32f746", "seen"))
    before = fleet.api.get(f"/api/v1/devices/{host}").get_json()
    assert before["reported"] == {"installed_model_version": None, "online": False,
                                  "last_seen_at": None, "backend": "qemu"}
    sink = DatabaseSink({**fleet.config, "REDIS_URL": "redis://127.0.0.1:1/0"})
    sink.on_presence(host, True, "host-x86_64")  # a host-backend agent's JSON presence
    sink.on_presence(mcu, True)  # plain b"online": its MCU image (qemu)
    got = fleet.api.get(f"/api/v1/devices/{host}").get_json()["reported"]
    assert got["online"] is True and got["backend"] == "host-x86_64"
    assert got["last_seen_at"] is not None and got["last_seen_at"].endswith("Z")
    listed = {d["id"]: d["reported"] for d in fleet.api.get(
        "/api/v1/devices?fleet=lab").get_json()["items"]}
    assert listed[host]["backend"] == "host-x86_64" and listed[mcu]["backend"] == "qemu"
    assert listed[mcu]["online"] is True
    sink.on_presence(host, False)  # its last will: offline, the backend it named is kept
    got = fleet.api.get(f"/api/v1/devices/{host}").get_json()["reported"]
    assert got["online"] is False and got["backend"] == "host-x86_64"
