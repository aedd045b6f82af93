"""/api/v1/fleets: fleets and their firmware-signing public keys."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from service.api.common import API_PREFIX, fleet_json, parse_body, registry_context
from service.api.openapi import doc
from service.auth import require
from service.db import request_session
from service.fleets import discard_key, get_fleet, list_fleets, new_fleet
from service.models import Role
from service.schemas import FleetCreate, FleetList, FleetOut

bp = Blueprint("fleets", __name__, url_prefix=f"{API_PREFIX}/fleets")


@bp.get("")
@doc("List fleets", response=FleetList, tag="fleets")
@require(Role.VIEWER)
def list_view() -> dict[str, Any]:
    """Every fleet with its active device count."""
    return {"items": [fleet_json(f, n) for f, n in list_fleets(request_session())]}


@bp.post("")
@doc("Create a fleet with a new Ed25519 signing key", body=FleetCreate, response=FleetOut,
     status=201, tag="fleets")
@require(Role.OPERATOR)
def create_view() -> tuple[dict[str, Any], int]:
    """Create a fleet; 409 when the name is taken."""
    spec = parse_body(FleetCreate)
    session = request_session()
    fleet = new_fleet(session, spec.name, registry_context().key_dir, spec.description)
    try:
        session.commit()
    except BaseException:
        session.rollback()
        discard_key(fleet)
        raise
    return fleet_json(fleet, 0), 201


@bp.get("/<name>")
@doc("Get a fleet", response=FleetOut, tag="fleets")
@require(Role.VIEWER)
def get_view(name: str) -> dict[str, Any]:
    """One fleet by name."""
    fleet, count = get_fleet(request_session(), name)
    return fleet_json(fleet, count)
