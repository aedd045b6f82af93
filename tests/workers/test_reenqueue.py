"""Re-enqueueing stuck jobs (the reconciler, an operator's resume) from rows read earlier:
a job a worker moved on in between is neither recorded nor sent again."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from service.jobs import PLAN_TASK, reenqueue, set_state
from service.models import (
    AnalysisState,
    Campaign,
    CampaignState,
    DeploymentJob,
    Fleet,
    JobEvent,
    JobState,
    ModelKind,
    ModelVersion,
    utcnow,
)
from tests.ota_fleet import OtaFleet
from tests.servers import MosquittoServer

pytestmark = pytest.mark.integration


def test_a_job_moved_on_since_it_was_read_is_not_reenqueued(
        mosquitto_server: MosquittoServer, tmp_path: Path) -> None:
    fleet = OtaFleet(mosquitto_server, tmp_path)
    devices = [identity.device_id for identity in fleet.register(3, "stm32f746", "stale")]
    maker = fleet.app.extensions["tinyfleet.sessionmaker"]
    long_ago = utcnow() - timedelta(minutes=10)
    with maker() as s:
        fleet_id = s.scalars(select(Fleet.id)).one()
        s.add(ModelVersion(id="fedcba9876543210", name="m", kind=ModelKind.ONNX, path="/x",
                           size_bytes=1, analysis_state=AnalysisState.NONE))
        s.flush()
        campaign = Campaign(model_version_id="fedcba9876543210", state=CampaignState.RUNNING,
                            selector="{}", canary_percent=0, batch_size=10,
                            max_failure_percent=100, personalize=False, offer_deadline_s=60,
                            install_deadline_s=600, batch_count=1, current_batch=0)
        s.add(campaign)
        s.flush()
        s.add_all(DeploymentJob(campaign_id=campaign.id, device_id=d, fleet_id=fleet_id,
                                batch=0, hw_class="c", hw=json.dumps({}),
                                state=JobState.PLANNING, state_changed_at=long_ago)
                  for d in devices)
        s.commit()

    sent: list[tuple[str, list[Any]]] = []
    with maker() as reconciler, maker() as worker:
        stuck = reconciler.scalars(select(DeploymentJob).order_by(DeploymentJob.id)).all()
        moved, again, still = stuck
        # Meanwhile a worker finishes planning one job and takes up another again.
        for job_id, state in ((moved.id, JobState.BUILDING), (again.id, JobState.PLANNING)):
            row = worker.get(DeploymentJob, job_id)
            assert row is not None
            set_state(worker, row, state, "worker")
        worker.commit()
        assert reenqueue(reconciler, stuck, "reconciler",
                         lambda task, args: sent.append((task, args))) == 1

    assert sent == [(PLAN_TASK, [still.id])]
    with maker() as s:
        events = {(e.job_id, e.reason) for e in s.scalars(select(JobEvent).where(
            JobEvent.source == "reconciler"))}
        assert events == {(still.id, f"re-enqueued {PLAN_TASK}")}
        jobs = {j.id: j for j in s.scalars(select(DeploymentJob))}
        assert jobs[moved.id].state is JobState.BUILDING
        assert jobs[still.id].state is JobState.PLANNING
        assert jobs[still.id].state_changed_at.replace(tzinfo=None) > long_ago.replace(
            tzinfo=None)
