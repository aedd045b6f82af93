"""The dashboard's pages: login and logout, the fleet, a device; and the JSON their scripts
poll (every POLL_MS, with the last ETag: 304 while nothing changed).

Views parse the request, call one function, and render. Viewers read; operators act (today:
a device's tags; campaigns add theirs).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any, TypeVar

from flask import (
    Response,
    flash,
    g,
    redirect,
    request,
    url_for,
)
from werkzeug.wrappers import Response as BaseResponse

from device_agent.protocol import DEFAULT_BACKEND
from firmware.frontend.builtin import BUILTIN_NETWORKS
from firmware.targets import CATALOG, Cpu
from service.api.common import device_json
from service.dashboard.assets import asset_response, plotly_js
from service.dashboard.blueprint import DATA_ENDPOINTS, bp, render_page
from service.dashboard.campaigns import installed_build
from service.dashboard.fit import WIDTHS, ModelChoice, fit_report, parse_model_choice
from service.dashboard.fleet import (
    COLUMNS,
    PAGE_SIZES,
    FleetPage,
    FleetQuery,
    counts_by_mcu,
    fleet_names,
    fleet_page,
    page_json,
    parse_fleet_query,
    presence,
    row_json,
)
from service.dashboard.forms import LoginForm, TagsForm
from service.dashboard.session import current_viewer, log_in, log_out, page, safe_next
from service.db import request_session
from service.models import Device, DeviceState, Role
from service.parsing import validate
from service.problems import ApiError
from service.registry import find_device, set_tags
from service.schemas import DeviceUpdate

F = TypeVar("F", bound=Callable[..., Any])


def data(view: F) -> F:
    """Mark a view as polled by scripts: its errors are problem+json, not pages."""
    DATA_ENDPOINTS.add(f"dashboard.{view.__name__}")
    return view


def json_response(doc: Any) -> BaseResponse:
    """JSON with a strong ETag of its bytes; 304 when the client's copy is current."""
    body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    response = Response(body, mimetype="application/json")
    response.set_etag(hashlib.sha256(body).hexdigest()[:32])
    response.headers["Cache-Control"] = "private, no-cache"
    return response.make_conditional(request)


def device_status(device: Device) -> dict[str, str]:
    """What the device reported: its installed model, last update state, presence, the
    images its agent's backend runs."""
    return {"installed_model_version": device.installed_model_version or "none",
            "update_state": device.update_state or "none",
            "presence": presence(device.online, device.last_seen_at),
            "backend": device.backend or DEFAULT_BACKEND}


@bp.get("/")
def index() -> BaseResponse:
    """The fleet page."""
    return redirect(url_for("dashboard.fleet"))


@bp.route("/login", methods=["GET", "POST"])
def login() -> BaseResponse:
    """The login form: an API token starts a session."""
    form = LoginForm()
    session = request_session()
    target = safe_next(request.args.get("next"))
    if request.method == "GET" and current_viewer(session) is not None:
        return redirect(target)
    error = None
    if form.validate_on_submit():
        try:
            log_in(session, form.token.data or "")
        except ApiError as err:
            error = err.detail
        else:
            return redirect(target, 303)
    elif request.method == "POST":
        error = "; ".join(f"{name}: {', '.join(msgs)}" for name, msgs in form.errors.items())
    return render_page("dashboard/login.html", 401 if error else 200, form=form, error=error,
                       next=target)


@bp.post("/logout")
def logout() -> BaseResponse:
    """End the session (a POST with the form's CSRF token)."""
    log_out()
    return redirect(url_for("dashboard.login"), 303)


@bp.get("/fleet")
@page(Role.VIEWER)
def fleet() -> Response:
    """Devices by page, with filters and a name search; counts by MCU class and state."""
    session = request_session()
    try:
        query = parse_fleet_query(request.args)
        shown = fleet_page(session, query)
        counts = counts_by_mcu(session, query.fleet)
        status, error = 200, None
    except ApiError as err:
        query, shown, counts, status, error = FleetQuery(), FleetPage([], None), [], \
            err.status, err.detail
    return render_page(
        "dashboard/fleet.html", status, query=query, page=shown, counts=counts, error=error,
        columns=COLUMNS, rows=[row_json(d) for d in shown.devices],
        states=[s.value for s in DeviceState], mcus=[*sorted(CATALOG), "custom"],
        fleets=fleet_names(session), page_sizes=PAGE_SIZES, args=request.args)


@data
@bp.get("/fleet/data")
@page(Role.VIEWER, data=True)
def fleet_data() -> BaseResponse:
    """The fleet page's rows and counts, for its script."""
    session = request_session()
    query = parse_fleet_query(request.args)
    return json_response(page_json(fleet_page(session, query),
                                   counts_by_mcu(session, query.fleet)))



@bp.get("/devices/<key>")
@page(Role.VIEWER)
def device(key: str) -> Response:
    """A device's facts, and how a chosen model fits its SRAM and Flash slot."""
    found = find_device(request_session(), key)
    choice, report, fit_error = ModelChoice(), None, None
    try:
        choice = parse_model_choice(request.args)
        report = fit_report(choice, found.sram_bytes, found.slot_bytes, Cpu(found.cpu))
    except ApiError as err:
        fit_error = err.detail
    fit_args: dict[str, Any] = {"key": found.id, **choice.args()}
    return render_page(
        "dashboard/device.html", 422 if fit_error else 200, device=device_json(found),
        choice=choice, report=report, fit_error=fit_error, models=BUILTIN_NETWORKS,
        widths=WIDTHS, tags_form=TagsForm(tags=" ".join(found.tags)),
        reported=device_status(found), installed=installed_build(request_session(), found.id),
        can_act=g.viewer.can(Role.OPERATOR),
        fit_url=url_for("dashboard.device_fit", **fit_args))


@data
@bp.get("/devices/<key>/data")
@page(Role.VIEWER, data=True)
def device_data(key: str) -> BaseResponse:
    """The device's facts, for its page's script."""
    found = find_device(request_session(), key)
    return json_response({**device_json(found), **device_status(found)})



@data
@bp.get("/devices/<key>/fit")
@page(Role.VIEWER, data=True)
def device_fit(key: str) -> BaseResponse:
    """The memory report of the model the query names, on this device."""
    found = find_device(request_session(), key)
    choice = parse_model_choice(request.args)
    return json_response(fit_report(choice, found.sram_bytes, found.slot_bytes,
                                    Cpu(found.cpu)))



@bp.post("/devices/<key>/tags")
@page(Role.OPERATOR)
def device_tags(key: str) -> BaseResponse:
    """Replace the device's tags (operators)."""
    session = request_session()
    form = TagsForm()
    raw = (form.tags.data or "").replace(",", " ").split()
    spec = validate(DeviceUpdate, {"tags": list(dict.fromkeys(raw))})
    found = set_tags(session, key, spec.tags)
    flash(f"Tags of {found.name} saved.")
    return redirect(url_for("dashboard.device", key=found.id), 303)


@bp.get("/dashboard/plotly-<version>.min.js")
def plotly_script(version: str) -> BaseResponse:
    """plotly.min.js from the installed package (its version in the URL, cached a year)."""
    del version  # any version answers the installed file; the URL only busts caches
    return asset_response(plotly_js(), "text/javascript")
