"""GET /api/v1/mcus: the MCU catalog."""

from __future__ import annotations

from typing import Any

from flask import Blueprint

from firmware.targets import CATALOG
from service.api.common import API_PREFIX, mcu_json
from service.api.openapi import doc
from service.auth import require
from service.models import Role
from service.problems import ApiError, FieldError
from service.schemas import McuList, McuOut

bp = Blueprint("mcus", __name__, url_prefix=f"{API_PREFIX}/mcus")


@bp.get("")
@doc("List the MCU catalog", response=McuList, tag="mcus")
@require(Role.VIEWER)
def list_mcus() -> dict[str, Any]:
    """Every catalog MCU, by name."""
    return {"items": [mcu_json(CATALOG[name]) for name in sorted(CATALOG)]}


@bp.get("/<name>")
@doc("Get one catalog MCU", response=McuOut, tag="mcus")
@require(Role.VIEWER)
def get_mcu(name: str) -> dict[str, Any]:
    """One catalog MCU; 404 naming the known ones."""
    target = CATALOG.get(name.lower())
    if target is None:
        message = f"unknown MCU {name!r}; known: {', '.join(sorted(CATALOG))}"
        raise ApiError(404, message, [FieldError("name", message)])
    return mcu_json(target)
