"""/api/v1: a device's personalization metrics, the fleet summary, and starting a round.

    GET  /api/v1/devices/{key}/metrics       every round the device reported (numbers only)
    GET  /api/v1/personalization             by MCU class and model version
    POST /api/v1/devices/{key}/personalize   send a `personalize` command (task
                                             tinyfleet.personalize publishes it, QoS 1)
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app
from pydantic import Field

from service.api.common import API_PREFIX, json_body
from service.api.openapi import doc
from service.auth import require
from service.db import request_session
from service.models import DeviceState, Role
from service.parsing import validate
from service.personalization import device_metrics, fleet_summary, next_round
from service.problems import ApiError
from service.queue import celery_client
from service.registry import find_device
from service.schemas import RequestModel

bp = Blueprint("personalization", __name__, url_prefix=API_PREFIX)

PERSONALIZE_TASK = "tinyfleet.personalize"


class PersonalizeRequest(RequestModel):
    """A round for one device: its number (default: one past the last it reported) and a
    sparse-update scheme (default: the one in its installed image's manifest)."""

    round: int | None = Field(default=None, ge=0, le=2**31)
    scheme: dict[str, Any] | None = None


@bp.get("/devices/<key>/metrics")
@doc("Every personalization round a device reported (numbers only)", tag="personalization")
@require(Role.VIEWER)
def metrics_view(key: str) -> dict[str, Any]:
    """A device's rounds, oldest first."""
    session = request_session()
    return device_metrics(session, find_device(session, key))


@bp.get("/personalization")
@doc("Personalization across the fleet, by MCU class and model version",
     tag="personalization")
@require(Role.VIEWER)
def summary_view() -> dict[str, Any]:
    """Mean accuracy before and after, gain, rounds and rollbacks per group."""
    return fleet_summary(request_session())


@bp.post("/devices/<key>/personalize")
@doc("Start a personalization round on a device", body=PersonalizeRequest, status=202,
     tag="personalization")
@require(Role.OPERATOR)
def personalize_view(key: str) -> tuple[dict[str, Any], int]:
    """Enqueue the command; the device answers with metrics on its metrics topic."""
    spec = validate(PersonalizeRequest, json_body())
    session = request_session()
    device = find_device(session, key)
    if device.state is not DeviceState.ACTIVE:
        raise ApiError(409, f"device {device.id} is decommissioned")
    if spec.scheme is not None:
        from firmware.training.errors import SchemeError
        from firmware.training.scheme import SparseUpdateScheme

        try:
            SparseUpdateScheme.from_dict(spec.scheme)
        except SchemeError as exc:
            raise ApiError(422, f"scheme: {exc}") from None
    if not current_app.config.get("REDIS_URL"):
        raise ApiError(503, "the task queue is not configured (TINYFLEET_REDIS_URL): run "
                            "`tinyfleet up`, or set it")
    round_id = next_round(session, device.id, spec.round)
    task = celery_client().send_task(PERSONALIZE_TASK, args=[device.id, round_id, spec.scheme])
    return {"device": device.id, "round": round_id, "task_id": task.id}, 202
