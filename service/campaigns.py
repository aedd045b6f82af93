"""Campaigns: create one from a selector snapshot, pause, resume, abort, close, roll back,
and show its progress. The job state machine lives in service.jobs."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from firmware.deploy import HardwareClass
from firmware.targets import Cpu, OtaLayout
from service.jobs import Enqueue, advance, aware, reenqueue, set_state, state_counts
from service.models import (
    ACTIVE_CAMPAIGN_STATES,
    AnalysisState,
    Campaign,
    CampaignState,
    DeploymentJob,
    Device,
    DeviceState,
    DeviceTag,
    Fleet,
    JobEvent,
    JobState,
    ModelKind,
    ModelVersion,
    utcnow,
)
from service.problems import ApiError, FieldError, invalid
from service.rollout import TERMINAL, assign_batches
from service.schemas import CampaignCreate, DeviceSelector

MAX_FAILURES_SHOWN = 100


@dataclass(frozen=True)
class Created:
    """A new campaign and the devices it skipped (id, reason)."""

    campaign: Campaign
    skipped: list[tuple[str, str]]


def hardware_class(device: Device, personalize: bool) -> HardwareClass:
    """The device's hardware class (firmware.deploy)."""
    return HardwareClass(Cpu(device.cpu), device.sram_bytes, device.slot_bytes, personalize,
                         device.mcu, device.flash_bytes, OtaLayout(device.ota_layout))


def select_devices(session: Session, selector: DeviceSelector) -> list[Device]:
    """Active devices matching every given filter, by id; 422 naming unknown ids."""
    query = select(Device).where(Device.state == DeviceState.ACTIVE)
    if selector.fleet is not None:
        fleet_id = session.scalar(select(Fleet.id).where(Fleet.name == selector.fleet))
        if fleet_id is None:
            raise invalid("selector.fleet", f"no fleet {selector.fleet!r}")
        query = query.where(Device.fleet_id == fleet_id)
    if selector.mcu is not None:
        query = query.where(Device.mcu == selector.mcu)
    for tag in selector.tags:
        query = query.where(Device.id.in_(select(DeviceTag.device_id)
                                          .where(DeviceTag.tag == tag)))
    if selector.ids:
        ids = _resolve_ids(session, selector.ids)
        query = query.where(Device.id.in_(ids))
    return list(session.scalars(query.order_by(Device.id)).all())


def _resolve_ids(session: Session, keys: list[str]) -> set[str]:
    found: dict[str, str] = {}
    for chunk in range(0, len(keys), 500):
        part = keys[chunk:chunk + 500]
        for dev_id, name in session.execute(select(Device.id, Device.name).where(
                Device.id.in_(part) | Device.name.in_(part))):
            found[dev_id] = dev_id
            found[name] = dev_id
    missing = [(i, k) for i, k in enumerate(keys) if k not in found]
    if missing:
        errors = [FieldError(f"selector.ids[{i}]", f"no device {k!r}") for i, k in missing[:50]]
        raise ApiError(422, f"selector.ids: {len(missing)} unknown device(s), first "
                            f"{missing[0][1]!r}", errors)
    return {found[k] for k in keys}


def busy_devices(session: Session, device_ids: list[str]) -> dict[str, int]:
    """Devices with an unfinished job in an active campaign -> that campaign's id."""
    busy: dict[str, int] = {}
    unfinished = [s for s in JobState if s not in TERMINAL]
    for chunk in range(0, len(device_ids), 500):
        rows = session.execute(
            select(DeploymentJob.device_id, DeploymentJob.campaign_id)
            .join(Campaign, Campaign.id == DeploymentJob.campaign_id)
            .where(DeploymentJob.device_id.in_(device_ids[chunk:chunk + 500]),
                   DeploymentJob.state.in_(unfinished),
                   Campaign.state.in_(ACTIVE_CAMPAIGN_STATES)))
        busy.update({d: c for d, c in rows})
    return busy


def _check_model(session: Session, spec: CampaignCreate) -> ModelVersion:
    model = session.get(ModelVersion, spec.model_version)
    if model is None:
        raise invalid("model_version", f"no model version {spec.model_version!r}")
    if spec.policy.personalize:
        if model.kind is not ModelKind.FAMILY:
            raise invalid("policy.personalize", "on-device training needs a model family; "
                                                f"{model.id} is a fixed ONNX model")
        if model.analysis_state is not AnalysisState.DONE:
            raise invalid("policy.personalize", (
                f"model version {model.id}'s contribution analysis is "
                f"{model.analysis_state.value}; personalization needs it done"))
    return model


def create_campaign(session: Session, spec: CampaignCreate, enqueue: Enqueue) -> Created:
    """A campaign over the selector's snapshot: one job per device; 422 when none match."""
    model = _check_model(session, spec)
    devices = select_devices(session, spec.selector)
    if not devices:
        raise ApiError(422, "selector: no active device matches", [
            FieldError("selector", "matches no active device")])
    busy = busy_devices(session, [d.id for d in devices])
    eligible = [d for d in devices if d.id not in busy]
    if not eligible:
        raise ApiError(422, f"selector: all {len(devices)} matching devices are in active "
                            "campaigns", [FieldError("selector", "every match is busy")])
    policy = spec.policy
    batches = assign_batches(len(eligible), _policy(spec))
    start_at = policy.start_at.astimezone(UTC) if policy.start_at else None
    now = utcnow()
    scheduled = start_at is not None and start_at > now
    campaign = Campaign(
        model_version_id=model.id,
        state=CampaignState.SCHEDULED if scheduled else CampaignState.RUNNING,
        selector=json.dumps(spec.selector.model_dump(mode="json")),
        canary_percent=policy.canary_percent, batch_size=policy.batch_size,
        max_failure_percent=policy.max_failure_percent, personalize=policy.personalize,
        offer_deadline_s=policy.offer_deadline_s,
        install_deadline_s=policy.install_deadline_s, start_at=start_at,
        batch_count=(max(batches) + 1) if batches else 0, current_batch=-1,
        created_at=now, started_at=None if scheduled else now)
    session.add(campaign)
    session.flush()
    rows: list[DeploymentJob] = []
    skipped = [(d.id, f"already in active campaign {busy[d.id]}") for d in devices
               if d.id in busy]
    for device, batch in zip(eligible, batches, strict=True):
        hw = hardware_class(device, policy.personalize)
        rows.append(DeploymentJob(campaign_id=campaign.id, device_id=device.id,
                                  fleet_id=device.fleet_id, batch=batch, hw_class=hw.key,
                                  hw=json.dumps(hw.to_dict()), state=JobState.PENDING,
                                  attempts=0, state_changed_at=now))
    by_id = {d.id: d for d in devices}
    for device_id, why in skipped:
        device = by_id[device_id]
        hw = hardware_class(device, policy.personalize)
        rows.append(DeploymentJob(campaign_id=campaign.id, device_id=device_id,
                                  fleet_id=device.fleet_id, batch=-1, hw_class=hw.key,
                                  hw=json.dumps(hw.to_dict()), state=JobState.SKIPPED,
                                  reason=why, attempts=0, state_changed_at=now,
                                  finished_at=now))
    session.add_all(rows)
    session.flush()
    session.add_all(JobEvent(job_id=j.id, state=j.state.value, reason=j.reason,
                             source="operator", at=now) for j in rows)
    session.commit()
    if not scheduled:
        advance(session, campaign.id, enqueue)
    return Created(campaign, skipped)


def _policy(spec: CampaignCreate) -> Any:
    from service.rollout import Policy

    p = spec.policy
    return Policy(p.canary_percent, p.batch_size, p.max_failure_percent)


def get_campaign(session: Session, campaign_id: int) -> Campaign:
    """The campaign; 404 when there is none."""
    campaign = session.get(Campaign, campaign_id, populate_existing=True)
    if campaign is None:
        raise ApiError(404, f"no campaign {campaign_id}", [FieldError("id", "no such campaign")])
    return campaign


def _conflict(campaign: Campaign, action: str, allowed: tuple[CampaignState, ...]) -> ApiError:
    states = ", ".join(s.value for s in allowed)
    return ApiError(409, f"campaign {campaign.id} is {campaign.state.value}: {action} needs "
                         f"it {states}", [FieldError("state", f"is {campaign.state.value}")])


def pause(session: Session, campaign_id: int) -> Campaign:
    """Stop releasing batches and offering; jobs in flight on devices go on."""
    campaign = get_campaign(session, campaign_id)
    allowed = (CampaignState.RUNNING, CampaignState.SCHEDULED)
    if campaign.state not in allowed:
        raise _conflict(campaign, "pause", allowed)
    campaign.state = CampaignState.PAUSED
    session.commit()
    return campaign


def resume(session: Session, campaign_id: int, enqueue: Enqueue) -> Campaign:
    """Run a paused campaign again; held jobs are sent on. (A halted campaign stays halted:
    its failures would halt it again at once; abort, close or roll it back.)"""
    campaign = get_campaign(session, campaign_id)
    allowed = (CampaignState.PAUSED,)
    if campaign.state not in allowed:
        raise _conflict(campaign, "resume", allowed)
    start = aware(campaign.start_at)
    campaign.state = (CampaignState.SCHEDULED if start is not None and start > utcnow()
                      else CampaignState.RUNNING)
    if campaign.state is CampaignState.RUNNING and campaign.started_at is None:
        campaign.started_at = utcnow()
    session.commit()
    held = session.scalars(select(DeploymentJob).where(
        DeploymentJob.campaign_id == campaign.id,
        DeploymentJob.state.in_((JobState.QUEUED, JobState.PLANNING, JobState.BUILDING,
                                 JobState.OFFERING)))).all()
    reenqueue(session, held, "operator", enqueue)
    advance(session, campaign.id, enqueue)
    return campaign


def abort(session: Session, campaign_id: int) -> Campaign:
    """End the campaign: every unfinished job is aborted (devices keep what they have)."""
    campaign = get_campaign(session, campaign_id)
    if campaign.state not in ACTIVE_CAMPAIGN_STATES:
        raise _conflict(campaign, "abort", ACTIVE_CAMPAIGN_STATES)
    campaign.state = CampaignState.ABORTED
    campaign.finished_at = utcnow()
    _end_jobs(session, campaign, JobState.ABORTED, "aborted by the operator")
    session.commit()
    return campaign


def close(session: Session, campaign_id: int) -> Campaign:
    """Close a campaign waiting for offline devices (their jobs end `closed`)."""
    campaign = get_campaign(session, campaign_id)
    allowed = (CampaignState.WAITING_OFFLINE, CampaignState.HALTED)
    if campaign.state not in allowed:
        raise _conflict(campaign, "close", allowed)
    campaign.state = CampaignState.CLOSED
    campaign.finished_at = utcnow()
    _end_jobs(session, campaign, JobState.CLOSED, "closed by the operator while the device "
                                                  "was offline or the campaign halted")
    session.commit()
    return campaign


def _end_jobs(session: Session, campaign: Campaign, state: JobState, reason: str) -> None:
    jobs = session.scalars(select(DeploymentJob).where(
        DeploymentJob.campaign_id == campaign.id,
        DeploymentJob.state.not_in(tuple(TERMINAL)))).all()
    now = utcnow()
    for job in jobs:
        set_state(session, job, state, "operator", reason, now=now)


def rollback(session: Session, campaign_id: int,
             send: Callable[[int], None]) -> tuple[Campaign, int]:
    """Send `rollback` to every device the campaign updated; `send(job_id)` has the command
    published (the Celery rollback task). The campaign's unfinished jobs are aborted first."""
    campaign = get_campaign(session, campaign_id)
    if campaign.state is CampaignState.ROLLED_BACK:
        raise _conflict(campaign, "rollback", tuple(s for s in CampaignState
                                                    if s is not CampaignState.ROLLED_BACK))
    if campaign.state in ACTIVE_CAMPAIGN_STATES:
        _end_jobs(session, campaign, JobState.ABORTED, "aborted by a rollback")
    campaign.state = CampaignState.ROLLED_BACK
    campaign.finished_at = utcnow()
    installed = session.scalars(select(DeploymentJob).where(
        DeploymentJob.campaign_id == campaign.id,
        DeploymentJob.state == JobState.INSTALLED)).all()
    for job in installed:
        set_state(session, job, JobState.ROLLBACK_SENT, "operator")
    session.commit()
    for job in installed:
        send(job.id)
    return campaign, len(installed)


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 UTC."""
    moment = aware(moment)
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def campaign_json(session: Session, campaign: Campaign) -> dict[str, Any]:
    """A campaign with its progress (schema CampaignOut)."""
    total = state_counts(session, campaign.id)
    per_batch: dict[int, Counter[str]] = {}
    from sqlalchemy import func

    for batch, state, n in session.execute(
            select(DeploymentJob.batch, DeploymentJob.state, func.count())
            .where(DeploymentJob.campaign_id == campaign.id)
            .group_by(DeploymentJob.batch, DeploymentJob.state)):
        per_batch.setdefault(batch, Counter())[state.value] = int(n)
    failures = [{"job": j, "device": d, "batch": b, "reason": r} for j, d, b, r in
                session.execute(select(DeploymentJob.id, DeploymentJob.device_id,
                                       DeploymentJob.batch, DeploymentJob.reason)
                                .where(DeploymentJob.campaign_id == campaign.id,
                                       DeploymentJob.state == JobState.FAILED)
                                .order_by(DeploymentJob.id).limit(MAX_FAILURES_SHOWN))]
    return {
        "id": campaign.id, "model_version": campaign.model_version_id,
        "state": campaign.state.value, "halt_reason": campaign.halt_reason,
        "selector": json.loads(campaign.selector),
        "policy": {"canary_percent": campaign.canary_percent,
                   "batch_size": campaign.batch_size,
                   "max_failure_percent": campaign.max_failure_percent,
                   "personalize": campaign.personalize,
                   "start_at": iso(campaign.start_at),
                   "offer_deadline_s": campaign.offer_deadline_s,
                   "install_deadline_s": campaign.install_deadline_s},
        "batch_count": campaign.batch_count, "current_batch": campaign.current_batch,
        "jobs": sum(total.values()),
        "counts": {s.value: n for s, n in sorted(total.items(), key=lambda kv: kv[0].value)},
        "batches": [{"batch": b, "counts": dict(sorted(c.items()))}
                    for b, c in sorted(per_batch.items())],
        "failures": failures,
        "created_at": iso(campaign.created_at), "started_at": iso(campaign.started_at),
        "finished_at": iso(campaign.finished_at),
    }


def job_json(job: DeploymentJob, events: list[JobEvent] | None = None) -> dict[str, Any]:
    """A job (schema JobOut)."""
    out: dict[str, Any] = {
        "id": job.id, "campaign": job.campaign_id, "device": job.device_id,
        "batch": job.batch, "hw_class": job.hw_class, "state": job.state.value,
        "reason": job.reason, "emulated": job.emulated,
        "artifact_sha256": job.artifact_sha256, "update_id": job.update_id,
        "progress": job.progress, "attempts": job.attempts,
        "state_changed_at": iso(job.state_changed_at)}
    if events is not None:
        out["events"] = [{"state": e.state, "reason": e.reason, "source": e.source,
                          "at": iso(e.at)} for e in events]
    return out
