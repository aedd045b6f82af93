"""The dashboard's campaign and personalization pages, and a device's history and curve.

    /campaigns                  the list and (operators) the form to start one
    /campaigns/<id>             progress, counts by state and batch, each device's outcome
                                with its reason; pause, resume, abort, close, roll back
    /personalization            the fleet's accuracy gain per round, by MCU and model version
    /devices/<key>/history      a device's jobs and personalization rounds (polled JSON)

Each page polls its JSON (every POLL_MS, with ETags). Viewers read; operators act, through
the same functions as the API (`service.campaigns`), so the same state checks answer (409).
"""

from __future__ import annotations

from flask import Response, flash, g, redirect, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from firmware.targets import CATALOG
from service import campaigns as ops
from service.dashboard.blueprint import bp, render_page
from service.dashboard.campaigns import (
    ACTIONS,
    campaign_body,
    campaign_list,
    device_history,
    device_outcomes,
    model_choices,
    parse_cursor,
    with_progress,
)
from service.dashboard.fleet import fleet_names
from service.dashboard.forms import ActionForm
from service.dashboard.personalization import personalization_json
from service.dashboard.session import page
from service.dashboard.views import data, json_response
from service.db import request_session
from service.jobs import ROLLBACK_TASK
from service.models import Role
from service.parsing import validate
from service.personalization import device_metrics
from service.problems import ApiError
from service.queue import enqueue
from service.registry import find_device
from service.schemas import CampaignCreate


def _list_page(status: int = 200, error: str | None = None) -> Response:
    session = request_session()
    return render_page(
        "dashboard/campaigns.html", status, campaigns=campaign_list(session),
        models=model_choices(session), fleets=fleet_names(session),
        mcus=[*sorted(CATALOG), "custom"], form=ActionForm(), error=error,
        values=request.form if request.method == "POST" else {},
        can_act=g.viewer.can(Role.OPERATOR))


@bp.get("/campaigns")
@page(Role.VIEWER)
def campaigns() -> Response:
    """The newest campaigns with live progress; the start form for operators."""
    return _list_page()


@data
@bp.get("/campaigns/data")
@page(Role.VIEWER, data=True)
def campaigns_data() -> BaseResponse:
    """The list page's campaigns, for its script."""
    return json_response({"items": campaign_list(request_session())})


@bp.post("/campaigns")
@page(Role.OPERATOR)
def campaign_start() -> BaseResponse:
    """Start a campaign from the form (the API's schema and checks; errors name the field)."""
    session = request_session()
    try:
        spec = validate(CampaignCreate, campaign_body(request.form))
        created = ops.create_campaign(session, spec, enqueue)
    except ApiError as err:
        session.rollback()
        return _list_page(err.status, err.detail)
    skipped = f", {len(created.skipped)} busy device(s) skipped" if created.skipped else ""
    flash(f"Campaign {created.campaign.id} started{skipped}.")
    return redirect(url_for("dashboard.campaign", campaign_id=created.campaign.id), 303)


@bp.get("/campaigns/<int:campaign_id>")
@page(Role.VIEWER)
def campaign(campaign_id: int) -> Response:
    """One campaign: progress, counts by state and batch, devices' outcomes, actions."""
    session = request_session()
    doc = with_progress(ops.campaign_json(session, ops.get_campaign(session, campaign_id)))
    cursor = parse_cursor(request.args.get("cursor"))
    outcomes = device_outcomes(session, campaign_id, cursor)
    return render_page("dashboard/campaign.html", campaign=doc, outcomes=outcomes,
                       cursor=cursor, form=ActionForm(), can_act=g.viewer.can(Role.OPERATOR))


@data
@bp.get("/campaigns/<int:campaign_id>/data")
@page(Role.VIEWER, data=True)
def campaign_data(campaign_id: int) -> BaseResponse:
    """The campaign and one page of its devices' outcomes, for its page's script."""
    session = request_session()
    doc = with_progress(ops.campaign_json(session, ops.get_campaign(session, campaign_id)))
    outcomes = device_outcomes(session, campaign_id, parse_cursor(request.args.get("cursor")))
    return json_response({"campaign": doc, "outcomes": outcomes.items,
                          "next_cursor": outcomes.next_cursor})


@bp.post("/campaigns/<int:campaign_id>/<action>")
@page(Role.OPERATOR)
def campaign_action(campaign_id: int, action: str) -> BaseResponse:
    """Pause, resume, abort, close or roll back (operators); a refused one says why."""
    if action not in ACTIONS:
        raise ApiError(404, f"no campaign action {action!r}: one of {', '.join(ACTIONS)}")
    session = request_session()
    try:
        if action == "pause":
            ops.pause(session, campaign_id)
        elif action == "resume":
            ops.resume(session, campaign_id, enqueue)
        elif action == "abort":
            ops.abort(session, campaign_id)
        elif action == "close":
            ops.close(session, campaign_id)
        else:
            ops.rollback(session, campaign_id, lambda job: enqueue(ROLLBACK_TASK, [job]))
    except ApiError as err:
        if err.status == 404:
            raise
        session.rollback()
        flash(f"{action.capitalize()} refused: {err.detail}")
    else:
        flash(f"Campaign {campaign_id}: {action} done.")
    return redirect(url_for("dashboard.campaign", campaign_id=campaign_id), 303)


@bp.get("/personalization")
@page(Role.VIEWER)
def personalization() -> Response:
    """The fleet's accuracy before and after on-device training, and the gain per round."""
    return render_page("dashboard/personalization.html",
                       summary=personalization_json(request_session()))


@data
@bp.get("/personalization/data")
@page(Role.VIEWER, data=True)
def personalization_data() -> BaseResponse:
    """The personalization page's figures, for its script."""
    return json_response(personalization_json(request_session()))


@data
@bp.get("/devices/<key>/history")
@page(Role.VIEWER, data=True)
def device_history_data(key: str) -> BaseResponse:
    """A device's update history and personalization rounds (metrics only)."""
    session = request_session()
    found = find_device(session, key)
    return json_response({"jobs": device_history(session, found.id),
                          "personalization": device_metrics(session, found)["rounds"]})
