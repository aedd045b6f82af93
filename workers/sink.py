"""The BridgeSink against the database: device events drive the deployment-job state machine.

`python -m workers.bridge --sink workers.sink:database_sink` (what `tinyfleet up` runs). The
bridge has already validated every message (device_agent.protocol); this side decides what
it means for the job whose update it names:

- an event for an update that is not the device's (another device's id, an old update) is
  logged and counted, and changes nothing;
- presence updates the device row; a device coming online gets the offers of its jobs that
  wait for it (`pending_commands`), which move to `offered`;
- `installed` records the model version, artifact and slot on the device row; a terminal
  state lets the campaign move on (service.jobs.advance), with the next batch queued
  through Celery by task name.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session, lazyload, sessionmaker

from device_agent import protocol as p
from service import db
from service import jobs as J
from service.models import Campaign, CampaignState, DeploymentJob, Device, JobState, utcnow
from service.personalization import record_metrics
from service.queue import celery_settings
from service.rollout import TERMINAL

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 2.0
IN_CHUNK = 500  # ids per IN (...) list: far below any database's parameter limit


def _job_id(update_id: str | None) -> int | None:
    """The job an update id names (`u<job id>`), or None."""
    if update_id is None or not update_id.startswith("u") or not update_id[1:].isdigit():
        return None
    return int(update_id[1:])


class DatabaseSink:
    """Device messages -> job states, device rows and the campaign's next step."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.config = config
        self.engine = db.make_engine(str(config["DATABASE_URL"]))
        self.sessions: sessionmaker[Session] = db.make_sessionmaker(self.engine)
        self.celery = Celery("tinyfleet-bridge")
        self.celery.conf.update(celery_settings(config.get("REDIS_URL"),
                                                int(config.get("VISIBILITY_TIMEOUT_S", 3600))))
        self.ignored = 0  # events that named no job of theirs
        self._progress_at: dict[str, float] = {}  # update id -> last progress written

    def enqueue(self, name: str, args: list[Any]) -> None:
        """Send a task by name."""
        self.celery.send_task(name, args=args)

    def _job(self, session: Session, device_id: str, update_id: str | None
             ) -> DeploymentJob | None:
        job_id = _job_id(update_id)
        job = None if job_id is None else session.get(DeploymentJob, job_id)
        if job is None or job.device_id != device_id or job.update_id != update_id:
            return None
        return job

    def _throttled(self, event: p.DeviceEvent) -> bool:
        """True for a download progress event within PROGRESS_EVERY_S of the last one
        written for its update (progress only keeps the install deadline from firing)."""
        if event.state is p.UpdateState.DOWNLOADING and event.update_id and event.progress:
            now = time.monotonic()
            if now - self._progress_at.get(event.update_id, 0.0) < PROGRESS_EVERY_S:
                return True
            self._progress_at[event.update_id] = now
        elif event.update_id is not None:
            self._progress_at.pop(event.update_id, None)
        return False

    def on_event(self, device_id: str, event: p.DeviceEvent) -> None:
        """Apply one OTA event to the job it names (a batch of one)."""
        self.on_events([(device_id, event)])

    def on_events(self, events: Sequence[tuple[str, p.DeviceEvent]]) -> None:
        """Apply OTA events in arrival order in one transaction: their jobs and devices are
        loaded by one query each, and each campaign with a job that ended moves on once,
        after the commit."""
        kept = [(device_id, event) for device_id, event in events
                if not self._throttled(event)]
        if not kept:
            return
        with self.sessions() as session:
            ids = sorted({i for _, e in kept if (i := _job_id(e.update_id)) is not None})
            jobs: dict[int, DeploymentJob] = {}
            for start in range(0, len(ids), IN_CHUNK):
                jobs.update((j.id, j) for j in session.scalars(select(DeploymentJob).where(
                    DeploymentJob.id.in_(ids[start:start + IN_CHUNK]))))
            # Held here: the identity map keeps only weak references, and apply_device_event
            # finds these rows by session.get without a query while they live.
            owners = sorted({j.device_id for j in jobs.values()})
            devices = [d for start in range(0, len(owners), IN_CHUNK)
                       for d in session.scalars(select(Device).options(lazyload("*")).where(
                           Device.id.in_(owners[start:start + IN_CHUNK])))]
            campaigns = session.scalars(select(Campaign).where(
                Campaign.id.in_({j.campaign_id for j in jobs.values()}))).all()
            ended: set[int] = set()
            for device_id, event in kept:
                job = jobs.get(_job_id(event.update_id) or -1)
                if job is None or job.device_id != device_id or job.update_id != (
                        event.update_id):
                    self.ignored += 1
                    log.warning("event %s from %s names no job of its own (update %r): "
                                "ignored", event.state.value, device_id, event.update_id)
                    continue
                slot = None if event.slot is None else str(event.slot)
                if J.apply_device_event(session, job, event.state.value, event.reason,
                                        event.progress, slot) and job.state in TERMINAL:
                    ended.add(job.campaign_id)
            session.commit()
            del devices, campaigns
            for campaign_id in sorted(ended):
                J.advance(session, campaign_id, self.enqueue)

    def on_presence(self, device_id: str, online: bool, backend: str | None = None) -> None:
        """Record presence on the device row, and the backend a device coming online names
        (None: it did not say; the MCU image is offered)."""
        with self.sessions() as session:
            device = session.get(Device, device_id)
            if device is None:
                return
            device.online = online
            if online:
                device.backend = backend
            device.last_seen_at = utcnow()
            session.commit()

    def on_metrics(self, device_id: str, report: p.MetricsReport) -> None:
        """Personalization metrics: stored per device and round, with the device's installed
        model version (a repeated round is kept once)."""
        with self.sessions() as session:
            device = session.get(Device, device_id)
            if device is None:
                log.warning("metrics from unknown device %s dropped", device_id)
                return
            stored = record_metrics(session, device_id, report, device.installed_model_version)
        log.info("metrics from %s: round %d, accuracy %.3f -> %.3f%s", device_id, report.round,
                 report.accuracy_before, report.accuracy_after, "" if stored else " (repeat)")

    def artifact_for(self, device_id: str, update_id: str) -> str | None:
        """The signed image of the device's job for this update."""
        with self.sessions() as session:
            job = self._job(session, device_id, update_id)
            if job is None or job.state not in (JobState.OFFERED, *J.IN_DEVICE):
                return None
            return job.artifact_sha256

    def pending_commands(self, device_id: str) -> Sequence[Any]:
        """Offers of the device's jobs waiting for it to come online (now `offered`)."""
        from workers.artifacts import ArtifactStore
        from workers.offers import NoArtifactForBackend, artifact_for_backend, offer_for

        store = ArtifactStore.from_config(dict(self.config))
        commands = []
        with self.sessions() as session:
            waiting = session.scalars(select(DeploymentJob).join(
                Campaign, Campaign.id == DeploymentJob.campaign_id).where(
                DeploymentJob.device_id == device_id,
                DeploymentJob.state == JobState.WAITING_OFFLINE,
                Campaign.state.in_((CampaignState.RUNNING, CampaignState.WAITING_OFFLINE))
            )).all()
            backend = session.scalar(select(Device.backend).where(Device.id == device_id))
            failed: list[tuple[DeploymentJob, str]] = []
            for job in waiting:
                campaign = session.get(Campaign, job.campaign_id)
                assert campaign is not None and job.artifact_sha256 is not None
                try:
                    job.artifact_sha256 = artifact_for_backend(session, job, backend)
                except NoArtifactForBackend as exc:
                    failed.append((job, str(exc)))
                    continue
                commands.append(offer_for(
                    store, job.artifact_sha256, job.update_id or f"u{job.id}",
                    block_size=int(self.config.get("OTA_BLOCK_SIZE", 4096)),
                    offer_deadline_s=campaign.offer_deadline_s,
                    install_deadline_s=campaign.install_deadline_s))
                J.set_state(session, job, JobState.OFFERED, "bridge",
                            now=utcnow())
                job.offered_at = utcnow()
            session.commit()
            for job, reason in failed:  # a backend with no artifact: the job fails, saying so
                J.fail(session, job, reason, "bridge", self.enqueue)
        return commands


def database_sink(config: Mapping[str, Any]) -> DatabaseSink:
    """The factory `--sink workers.sink:database_sink` names."""
    return DatabaseSink(config)
