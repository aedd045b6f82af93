"""/api/v1/campaigns and /api/v1/jobs: start, list, show, pause, resume, abort, close and
roll back campaigns; list and show their deployment jobs."""

from __future__ import annotations

from typing import Any

from flask import Blueprint
from sqlalchemy import select

from service import campaigns as ops
from service.api.common import API_PREFIX, parse_body, parse_query
from service.api.openapi import doc
from service.auth import require
from service.db import request_session
from service.jobs import ROLLBACK_TASK
from service.models import Campaign, DeploymentJob, JobEvent, Role
from service.problems import ApiError, FieldError
from service.queue import enqueue
from service.schemas import (
    CampaignCreate,
    CampaignList,
    CampaignOut,
    CampaignQuery,
    JobList,
    JobOut,
    JobQuery,
)

bp = Blueprint("campaigns", __name__, url_prefix=f"{API_PREFIX}/campaigns")
jobs_bp = Blueprint("jobs", __name__, url_prefix=f"{API_PREFIX}/jobs")


@bp.post("")
@doc("Start a campaign: a model version to a snapshot of selected devices, one job each",
     body=CampaignCreate, response=CampaignOut, status=201, tag="campaigns")
@require(Role.OPERATOR)
def create_view() -> tuple[dict[str, Any], int]:
    """Create a campaign; devices busy in an active campaign are skipped with that reason."""
    spec = parse_body(CampaignCreate)
    session = request_session()
    created = ops.create_campaign(session, spec, enqueue)
    return ops.campaign_json(session, created.campaign), 201


@bp.get("")
@doc("List campaigns, newest first", query=CampaignQuery, response=CampaignList,
     tag="campaigns")
@require(Role.VIEWER)
def list_view() -> dict[str, Any]:
    """Campaigns with their progress."""
    query = parse_query(CampaignQuery)
    session = request_session()
    stmt = select(Campaign).order_by(Campaign.id.desc()).limit(query.limit)
    if query.state is not None:
        stmt = stmt.where(Campaign.state == query.state)
    return {"items": [ops.campaign_json(session, c) for c in session.scalars(stmt)]}


@bp.get("/<int:campaign_id>")
@doc("Get a campaign with its progress: counts per state and per batch, failures",
     response=CampaignOut, tag="campaigns")
@require(Role.VIEWER)
def get_view(campaign_id: int) -> dict[str, Any]:
    """One campaign."""
    session = request_session()
    return ops.campaign_json(session, ops.get_campaign(session, campaign_id))


def _action(campaign_id: int, name: str) -> dict[str, Any]:
    session = request_session()
    if name == "pause":
        campaign = ops.pause(session, campaign_id)
    elif name == "resume":
        campaign = ops.resume(session, campaign_id, enqueue)
    elif name == "abort":
        campaign = ops.abort(session, campaign_id)
    else:
        campaign = ops.close(session, campaign_id)
    return ops.campaign_json(session, campaign)


@bp.post("/<int:campaign_id>/pause")
@doc("Pause: no new batch, no new offer", response=CampaignOut, tag="campaigns")
@require(Role.OPERATOR)
def pause_view(campaign_id: int) -> dict[str, Any]:
    """Pause a running or scheduled campaign (409 otherwise)."""
    return _action(campaign_id, "pause")


@bp.post("/<int:campaign_id>/resume")
@doc("Resume a paused campaign", response=CampaignOut, tag="campaigns")
@require(Role.OPERATOR)
def resume_view(campaign_id: int) -> dict[str, Any]:
    """Resume (409 unless paused)."""
    return _action(campaign_id, "resume")


@bp.post("/<int:campaign_id>/abort")
@doc("Abort: every unfinished job ends aborted", response=CampaignOut, tag="campaigns")
@require(Role.OPERATOR)
def abort_view(campaign_id: int) -> dict[str, Any]:
    """Abort an active campaign (409 otherwise)."""
    return _action(campaign_id, "abort")


@bp.post("/<int:campaign_id>/close")
@doc("Close a campaign waiting for offline devices (or halted)", response=CampaignOut,
     tag="campaigns")
@require(Role.OPERATOR)
def close_view(campaign_id: int) -> dict[str, Any]:
    """Close (409 unless waiting-offline or halted)."""
    return _action(campaign_id, "close")


@bp.post("/<int:campaign_id>/rollback")
@doc("Roll back: the `rollback` command to every device the campaign updated",
     response=CampaignOut, tag="campaigns")
@require(Role.OPERATOR)
def rollback_view(campaign_id: int) -> dict[str, Any]:
    """Roll back (409 when already rolled back)."""
    session = request_session()
    campaign, _ = ops.rollback(session, campaign_id,
                               lambda job_id: enqueue(ROLLBACK_TASK, [job_id]))
    return ops.campaign_json(session, campaign)


@jobs_bp.get("")
@doc("List deployment jobs by campaign, state or device, by pages", query=JobQuery,
     response=JobList, tag="jobs")
@require(Role.VIEWER)
def jobs_view() -> dict[str, Any]:
    """A page of jobs ordered by id."""
    query = parse_query(JobQuery)
    stmt = select(DeploymentJob).order_by(DeploymentJob.id).limit(query.limit + 1)
    if query.campaign is not None:
        stmt = stmt.where(DeploymentJob.campaign_id == query.campaign)
    if query.state is not None:
        stmt = stmt.where(DeploymentJob.state == query.state)
    if query.device is not None:
        stmt = stmt.where(DeploymentJob.device_id == query.device)
    if query.cursor is not None:
        stmt = stmt.where(DeploymentJob.id > query.cursor)
    rows = list(request_session().scalars(stmt))
    more = len(rows) > query.limit
    rows = rows[:query.limit]
    return {"items": [ops.job_json(j) for j in rows],
            "next_cursor": rows[-1].id if more else None}


@jobs_bp.get("/<int:job_id>")
@doc("Get a job with every state change and its time", response=JobOut, tag="jobs")
@require(Role.VIEWER)
def job_view(job_id: int) -> dict[str, Any]:
    """One job with its events."""
    session = request_session()
    job = session.get(DeploymentJob, job_id)
    if job is None:
        raise ApiError(404, f"no job {job_id}", [FieldError("id", "no such job")])
    events = list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id)
                                  .order_by(JobEvent.id)))
    return ops.job_json(job, events)
