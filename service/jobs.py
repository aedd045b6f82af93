"""The deployment-job state machine and the campaign's progress through its batches.

Shared by the API (create, pause, resume...), the Celery tasks (plan -> build -> offer), the
MQTT bridge's sink (device events) and the reconciler. Work is enqueued by task name through
an `Enqueue` callable (the service never imports workers/).

Every state change goes through `set_state`, which records a JobEvent with its time and
source. `advance` moves a campaign on (rollout.decide): it releases the next batch with a
compare-and-set on `current_batch`, so two workers finishing jobs at once release it once.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.models import (
    Campaign,
    CampaignState,
    DeploymentJob,
    JobEvent,
    JobState,
    utcnow,
)
from service.rollout import TERMINAL, Decision, Policy, decide

log = logging.getLogger(__name__)

Enqueue = Callable[[str, list[Any]], None]

PLAN_TASK = "tinyfleet.jobs.plan"
BUILD_TASK = "tinyfleet.jobs.build"
OFFER_TASK = "tinyfleet.jobs.offer"
ANALYZE_TASK = "tinyfleet.models.analyze"
ROLLBACK_TASK = "tinyfleet.jobs.rollback"

# The task that moves a job on from each state it waits in (the reconciler re-sends it).
TASK_FOR_STATE = {JobState.QUEUED: PLAN_TASK, JobState.PLANNING: PLAN_TASK,
                  JobState.BUILDING: BUILD_TASK, JobState.OFFERING: OFFER_TASK}
# A device's OTA event state -> the job state it means.
DEVICE_STATES = {"accepted": JobState.ACCEPTED, "downloading": JobState.DOWNLOADING,
                 "verifying": JobState.INSTALLING, "installing": JobState.INSTALLING,
                 "self_test": JobState.INSTALLING, "installed": JobState.INSTALLED,
                 "refused": JobState.FAILED, "failed": JobState.FAILED,
                 "rolled_back": JobState.ROLLED_BACK}
# States in which a device is working on the offer (its install deadline runs).
IN_DEVICE = (JobState.ACCEPTED, JobState.DOWNLOADING, JobState.INSTALLING)


def aware(moment: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; they are UTC here."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


def set_state(session: Session, job: DeploymentJob, state: JobState, source: str,
              reason: str | None = None, now: datetime | None = None) -> None:
    """Move `job` to `state` and record the change (not committed)."""
    moment = now or utcnow()
    job.state = state
    job.state_changed_at = moment
    if reason is not None or state not in (JobState.FAILED, JobState.SKIPPED):
        job.reason = reason if reason is None else reason[:1000]
    if state in TERMINAL:
        job.finished_at = moment
    session.add(JobEvent(job_id=job.id, state=state.value, reason=job.reason, source=source,
                         at=moment))


def policy_of(campaign: Campaign) -> Policy:
    """The campaign's rollout policy."""
    return Policy(campaign.canary_percent, campaign.batch_size, campaign.max_failure_percent)


def state_counts(session: Session, campaign_id: int, batch: int | None = None
                 ) -> Counter[JobState]:
    """Jobs per state, of the campaign or of one of its batches."""
    query = (select(DeploymentJob.state, func.count()).where(
        DeploymentJob.campaign_id == campaign_id).group_by(DeploymentJob.state))
    if batch is not None:
        query = query.where(DeploymentJob.batch == batch)
    return Counter({state: int(n) for state, n in session.execute(query)})


def advance(session: Session, campaign_id: int, enqueue: Enqueue) -> Decision | None:
    """Move a running campaign on: release its next batch, halt it, or finish it."""
    campaign = session.get(Campaign, campaign_id, populate_existing=True)
    if campaign is None or campaign.state not in (CampaignState.RUNNING,
                                                  CampaignState.WAITING_OFFLINE):
        return None
    total = state_counts(session, campaign_id)
    current = campaign.current_batch
    batch = state_counts(session, campaign_id, current) if current >= 0 else Counter()
    verdict = decide(policy_of(campaign), current, campaign.batch_count, total, batch)
    if verdict.decision is Decision.HALT and campaign.state is CampaignState.RUNNING:
        campaign.state = CampaignState.HALTED
        campaign.halt_reason = verdict.reason
        session.commit()
        log.warning("campaign %s halted: %s", campaign_id, verdict.reason)
    elif verdict.decision is Decision.RELEASE and campaign.state is CampaignState.RUNNING:
        release_batch(session, campaign, current + 1, enqueue)
    elif verdict.decision is Decision.FINISH:
        waiting = total.get(JobState.WAITING_OFFLINE, 0)
        new = CampaignState.WAITING_OFFLINE if waiting else CampaignState.COMPLETED
        if new is not campaign.state:
            campaign.state = new
            campaign.finished_at = None if waiting else utcnow()
            session.commit()
    return verdict.decision


def release_batch(session: Session, campaign: Campaign, batch: int, enqueue: Enqueue) -> None:
    """Queue batch `batch`'s jobs, once: the compare-and-set on current_batch decides."""
    won = session.execute(
        update(Campaign).where(Campaign.id == campaign.id,
                               Campaign.current_batch == batch - 1,
                               Campaign.state == CampaignState.RUNNING)
        .values(current_batch=batch)
        .execution_options(synchronize_session=False)).rowcount  # type: ignore[attr-defined]
    if not won:
        session.rollback()
        return
    campaign.current_batch = batch
    jobs = session.scalars(select(DeploymentJob).where(
        DeploymentJob.campaign_id == campaign.id, DeploymentJob.batch == batch,
        DeploymentJob.state == JobState.PENDING).order_by(DeploymentJob.id)).all()
    now = utcnow()
    for job in jobs:
        set_state(session, job, JobState.QUEUED, "rollout", now=now)
    session.commit()
    for job in jobs:
        enqueue(PLAN_TASK, [job.id])
    if not jobs:  # an empty batch (every device skipped): move on at once
        advance(session, campaign.id, enqueue)


def device_event(session: Session, job: DeploymentJob, device_state: str, reason: str | None,
                 progress: float | None, slot: str | None, enqueue: Enqueue) -> bool:
    """Apply one OTA event of the job's device and commit; False when it changes nothing
    (stale). A terminal job lets its campaign move on."""
    changed = apply_device_event(session, job, device_state, reason, progress, slot)
    session.commit()
    if changed and job.state in TERMINAL:
        advance(session, job.campaign_id, enqueue)
    return changed


def apply_device_event(session: Session, job: DeploymentJob, device_state: str,
                       reason: str | None, progress: float | None, slot: str | None) -> bool:
    """One OTA event of the job's device, in the session (not committed: the bridge's sink
    applies a batch of events in one transaction); False when it changes nothing (stale)."""
    from service.models import Device

    target = DEVICE_STATES.get(device_state)
    if target is None:
        return False
    device = session.get(Device, job.device_id)
    if device is not None:
        device.update_state = device_state
    if job.state is JobState.ROLLBACK_SENT and target in (JobState.ROLLED_BACK,
                                                           JobState.FAILED):
        if target is JobState.ROLLED_BACK:
            set_state(session, job, JobState.ROLLED_BACK, "device", reason)
            if device is not None:
                device.installed_slot = slot or device.installed_slot
                device.installed_artifact = device.installed_model_version = None
        else:  # the device could not go back (no previous image): it keeps this one
            set_state(session, job, JobState.FAILED, "device",
                      f"rollback failed on the device: {reason or device_state}")
        return True
    if job.state not in (JobState.OFFERED, *IN_DEVICE):
        return False  # stale; the device's update state is still news
    if progress is not None:
        job.progress = progress
    if target is JobState.ROLLED_BACK:
        target, reason = JobState.FAILED, f"rolled back on the device: {reason or 'self-test'}"
    if target is JobState.FAILED and not reason:
        reason = f"the device reported {device_state}"
    if target is not job.state:
        set_state(session, job, target, "device", reason if target is JobState.FAILED else None)
    else:
        job.state_changed_at = utcnow()  # progress: the install is not silent
    if target is JobState.INSTALLED and device is not None:
        campaign = session.get(Campaign, job.campaign_id)
        device.installed_artifact = job.artifact_sha256
        device.installed_slot = slot
        device.installed_model_version = None if campaign is None else campaign.model_version_id
    return True


def fail(session: Session, job: DeploymentJob, reason: str, source: str, enqueue: Enqueue
         ) -> None:
    """Fail a job with its reason, commit, and let the campaign react."""
    set_state(session, job, JobState.FAILED, source, reason)
    session.commit()
    advance(session, job.campaign_id, enqueue)


def reenqueue(session: Session, jobs: Iterable[DeploymentJob], source: str,
              enqueue: Enqueue) -> int:
    """Send again the task each job waits for; its state_changed_at restarts the clock.

    `jobs` were read earlier: a job a worker has moved on since (another state, or the same
    state entered again later) is left alone, by a compare-and-set on (state,
    state_changed_at), so that no stale re-enqueue is recorded or sent.
    """
    count = 0
    sends: list[tuple[str, int]] = []
    now = utcnow()
    for job in jobs:
        task = TASK_FOR_STATE.get(job.state)
        if task is None:
            continue
        claimed = session.execute(
            update(DeploymentJob)
            .where(DeploymentJob.id == job.id, DeploymentJob.state == job.state,
                   DeploymentJob.state_changed_at <= job.state_changed_at)
            .values(state_changed_at=now)
            .execution_options(synchronize_session=False)).rowcount  # type: ignore[attr-defined]
        if claimed != 1:
            log.info("job %s: not re-enqueued, it left %s since it was read", job.id,
                     job.state.value)
            continue
        session.add(JobEvent(job_id=job.id, state=job.state.value, source=source, at=now,
                             reason=f"re-enqueued {task}"))
        sends.append((task, job.id))
        count += 1
    session.commit()
    for job in jobs:
        session.expire(job, ["state", "state_changed_at"])  # changed underneath
    for task, job_id in sends:
        enqueue(task, [job_id])
    return count


def reconcile(session: Session, enqueue: Enqueue, stuck_after_s: float,
              now: datetime | None = None) -> dict[str, int]:
    """One pass of the reconciler: start scheduled campaigns, time out offers and installs,
    re-enqueue jobs stuck past `stuck_after_s`, and move every running campaign on."""
    now = now or utcnow()
    done: Counter[str] = Counter()
    for campaign in session.scalars(select(Campaign).where(
            Campaign.state == CampaignState.SCHEDULED)).all():
        start = aware(campaign.start_at)
        if start is None or start <= now:
            campaign.state = CampaignState.RUNNING
            campaign.started_at = now
            session.commit()
            advance(session, campaign.id, enqueue)
            done["started"] += 1
    running = session.scalars(select(Campaign).where(
        Campaign.state.in_((CampaignState.RUNNING, CampaignState.HALTED,
                            CampaignState.WAITING_OFFLINE, CampaignState.PAUSED)))).all()
    for campaign in running:
        done["timed_out"] += _deadlines(session, campaign, now, enqueue)
        if campaign.state is CampaignState.PAUSED:
            continue
        stuck = session.scalars(select(DeploymentJob).where(
            DeploymentJob.campaign_id == campaign.id,
            DeploymentJob.state.in_(tuple(TASK_FOR_STATE)),
            DeploymentJob.state_changed_at < now - timedelta(seconds=stuck_after_s))).all()
        done["reenqueued"] += reenqueue(session, stuck, "reconciler", enqueue)
        advance(session, campaign.id, enqueue)
    return dict(done)


def _deadlines(session: Session, campaign: Campaign, now: datetime, enqueue: Enqueue) -> int:
    """Fail offers unanswered past the offer deadline and installs silent past theirs."""
    offer_cut = now - timedelta(seconds=campaign.offer_deadline_s)
    install_cut = now - timedelta(seconds=campaign.install_deadline_s)
    late = session.scalars(select(DeploymentJob).where(
        DeploymentJob.campaign_id == campaign.id,
        ((DeploymentJob.state == JobState.OFFERED)
         & (DeploymentJob.state_changed_at < offer_cut))
        | (DeploymentJob.state.in_(IN_DEVICE)
           & (DeploymentJob.state_changed_at < install_cut)))).all()
    for job in late:
        if job.state is JobState.OFFERED:
            why = f"timed out: the offer was unanswered for {campaign.offer_deadline_s} s"
        else:
            why = (f"timed out: the install was silent for {campaign.install_deadline_s} s "
                   f"(last state {job.state.value})")
        set_state(session, job, JobState.FAILED, "reconciler", why, now=now)
    if late:
        session.commit()
        advance(session, campaign.id, enqueue)
    return len(late)
