"""The campaign pages' data: the list, one campaign's progress and its devices' outcomes,
the start form's choices, and the actions an operator may take in each state.

Everything comes from `service.campaigns` (the API's own functions: `campaign_json`, the
state machine's actions); this module only adds what a page shows beside it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import campaigns as ops
from service.models import (
    ACTIVE_CAMPAIGN_STATES,
    Campaign,
    CampaignState,
    DeploymentJob,
    Device,
    JobState,
    ModelVersion,
)
from service.problems import ApiError, FieldError
from service.rollout import TERMINAL

CAMPAIGNS_LISTED = 50
OUTCOMES_PAGE = 100
MODELS_LISTED = 100

# Actions by the campaign states that allow them (service.campaigns checks again: 409).
ACTIONS: dict[str, tuple[CampaignState, ...]] = {
    "pause": (CampaignState.RUNNING, CampaignState.SCHEDULED),
    "resume": (CampaignState.PAUSED,),
    "abort": ACTIVE_CAMPAIGN_STATES,
    "close": (CampaignState.WAITING_OFFLINE, CampaignState.HALTED),
    "rollback": tuple(s for s in CampaignState if s is not CampaignState.ROLLED_BACK),
}


def actions_for(state: str) -> list[str]:
    """The actions a campaign in `state` allows, in the order the page shows them."""
    return [name for name, states in ACTIONS.items() if state in {s.value for s in states}]


def with_progress(doc: dict[str, Any]) -> dict[str, Any]:
    """`campaign_json`'s document plus finished jobs, percent done and the allowed actions."""
    terminal = {s.value for s in TERMINAL}
    finished = sum(n for state, n in doc["counts"].items() if state in terminal)
    jobs = int(doc["jobs"])
    return {**doc, "finished": finished,
            "percent": round(100.0 * finished / jobs, 1) if jobs else 100.0,
            "actions": actions_for(doc["state"])}


def campaign_list(session: Session, limit: int = CAMPAIGNS_LISTED) -> list[dict[str, Any]]:
    """The newest campaigns with their progress."""
    stmt = select(Campaign).order_by(Campaign.id.desc()).limit(limit)
    return [with_progress(ops.campaign_json(session, c)) for c in session.scalars(stmt)]


@dataclass(frozen=True)
class Outcomes:
    """One page of a campaign's jobs (device name, state, reason) and the next cursor."""

    items: list[dict[str, Any]]
    next_cursor: int | None


def parse_cursor(raw: str | None) -> int | None:
    """The outcomes page's cursor (a job id); ApiError 422 naming `cursor` otherwise."""
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or len(raw) > 12:
        raise ApiError(422, "cursor: is not the cursor of a page of this list",
                       [FieldError("cursor", "a job id")])
    return int(raw)


def device_outcomes(session: Session, campaign_id: int, cursor: int | None = None,
                    limit: int = OUTCOMES_PAGE) -> Outcomes:
    """Each device's job in the campaign, by job id: state, batch, progress, reason."""
    stmt = (select(DeploymentJob.id, DeploymentJob.device_id, Device.name, Device.mcu,
                   DeploymentJob.batch, DeploymentJob.state, DeploymentJob.reason,
                   DeploymentJob.progress, DeploymentJob.emulated)
            .join(Device, Device.id == DeploymentJob.device_id)
            .where(DeploymentJob.campaign_id == campaign_id)
            .order_by(DeploymentJob.id).limit(limit + 1))
    if cursor is not None:
        stmt = stmt.where(DeploymentJob.id > cursor)
    rows = list(session.execute(stmt).all())
    more = len(rows) > limit
    items = [{"job": job, "device": device, "name": name, "mcu": mcu, "batch": batch,
              "state": state.value, "reason": reason, "progress": progress,
              "emulated": emulated}
             for job, device, name, mcu, batch, state, reason, progress, emulated
             in rows[:limit]]
    return Outcomes(items, rows[limit - 1][0] if more else None)


def device_history(session: Session, device_id: str, limit: int = 20) -> list[dict[str, Any]]:
    """A device's latest jobs, newest first: campaign, model version, state, reason."""
    stmt = (select(DeploymentJob.id, DeploymentJob.campaign_id, Campaign.model_version_id,
                   DeploymentJob.state, DeploymentJob.reason, DeploymentJob.state_changed_at)
            .join(Campaign, Campaign.id == DeploymentJob.campaign_id)
            .where(DeploymentJob.device_id == device_id)
            .order_by(DeploymentJob.id.desc()).limit(limit))
    return [{"job": job, "campaign": campaign, "model_version": model, "state": state.value,
             "reason": reason, "at": ops.iso(at)}
            for job, campaign, model, state, reason, at in session.execute(stmt)]


def installed_build(session: Session, device_id: str) -> dict[str, Any] | None:
    """What the device's latest installed job deployed: campaign, model version, subnet,
    the search pick's memory report (the fit chart's format) and the build's measured
    figures; None when no campaign installed anything on it."""
    from service.models import ClassBuild, ClassPlan

    row = session.execute(
        select(DeploymentJob.campaign_id, Campaign.model_version_id, ClassPlan.result,
               ClassBuild.manifest, DeploymentJob.emulated)
        .join(Campaign, Campaign.id == DeploymentJob.campaign_id)
        .join(ClassPlan, (ClassPlan.hw_class == DeploymentJob.hw_class)
              & (ClassPlan.model_version_id == Campaign.model_version_id))
        .outerjoin(ClassBuild, (ClassBuild.hw_class == DeploymentJob.hw_class)
                   & (ClassBuild.model_version_id == Campaign.model_version_id))
        .where(DeploymentJob.device_id == device_id, DeploymentJob.state == JobState.INSTALLED)
        .order_by(DeploymentJob.id.desc()).limit(1)).first()
    if row is None:
        return None
    campaign, model, plan_text, manifest_text, emulated = row
    plan = json.loads(plan_text or "{}")
    manifest = json.loads(manifest_text or "{}")
    report = plan.get("memory")
    return {"campaign": campaign, "model_version": model,
            "subnet": (plan.get("config") or {}).get("name") or plan.get("graph"),
            "report": report if isinstance(report, dict) and "sram" in report else None,
            "predicted": (manifest.get("memory") or {}).get("predicted"),
            "measured": (manifest.get("memory") or {}).get("measured"),
            "emulated": emulated, "sparse_update": plan.get("sparse_update") is not None}


def model_choices(session: Session) -> list[dict[str, str]]:
    """Model versions for the start form (newest first): id, name, kind."""
    stmt = (select(ModelVersion.id, ModelVersion.name, ModelVersion.kind)
            .order_by(ModelVersion.created_at.desc()).limit(MODELS_LISTED))
    return [{"id": i, "name": n, "kind": k.value} for i, n, k in session.execute(stmt)]


def _number(form: Mapping[str, str], name: str, default: str) -> Any:
    raw = (form.get(name) or "").strip() or default
    try:
        return int(raw) if raw.isdigit() else float(raw)
    except ValueError:
        return raw  # the schema names the field and says what it wants


def campaign_body(form: Mapping[str, str]) -> dict[str, Any]:
    """The API's CampaignCreate body from the start form's fields (checked by the schema)."""
    selector: dict[str, Any] = {}
    for name in ("fleet", "mcu"):
        value = (form.get(name) or "").strip()
        if value:
            selector[name] = value
    for name in ("tags", "ids"):
        values = (form.get(name) or "").replace(",", " ").split()
        if values:
            selector[name] = list(dict.fromkeys(values))
    policy = {"canary_percent": _number(form, "canary_percent", "10"),
              "batch_size": _number(form, "batch_size", "100"),
              "max_failure_percent": _number(form, "max_failure_percent", "10"),
              "personalize": form.get("personalize") in ("y", "on", "true", "1")}
    return {"model_version": (form.get("model_version") or "").strip(),
            "selector": selector, "policy": policy}


__all__ = ["ACTIONS", "Outcomes", "actions_for", "campaign_body", "campaign_list",
           "device_history", "device_outcomes", "installed_build", "model_choices",
           "parse_cursor",
           "with_progress"]
