"""Re-enqueueing stuck jobs (the reconciler, an operator's resume) from rows read earlier:
a job a worker moved on in between is neither recorded nor sent again."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from service.jobs import PLAN_TASK, reenqueue, set_state
from service.models import (
    DeploymentJob,
    JobEvent,
    JobState,
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
    fleet.campaign_jobs("fedcba9876543210", devices, JobState.PLANNING,
                        state_changed_at=long_ago)

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
