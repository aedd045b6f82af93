"""/api/v1/devices: register (one or bulk), list, get, tag and decommission devices."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify, request, url_for

from service.api.common import (
    API_PREFIX,
    device_json,
    json_body,
    mqtt_endpoint,
    parse_body,
    parse_query,
    registry_context,
)
from service.api.openapi import doc
from service.auth import require
from service.db import request_session
from service.models import Role
from service.problems import ApiError, FieldError
from service.registry import (
    decommission,
    find_device,
    list_devices,
    parse_rows,
    register_devices,
    set_tags,
)
from service.schemas import (
    MAX_BULK_DEVICES,
    BulkRegistered,
    DeviceBulkCreate,
    DeviceBulkEnvelope,
    DeviceCreate,
    DeviceList,
    DeviceOut,
    DeviceQuery,
    DeviceRegistered,
    DeviceUpdate,
)
from service.validation import parse

bp = Blueprint("devices", __name__, url_prefix=f"{API_PREFIX}/devices")


@bp.post("")
@doc("Register a device; the response holds its MQTT password, once", body=DeviceCreate,
     response=DeviceRegistered, status=201, tag="devices")
@require(Role.OPERATOR)
def create_view() -> tuple[dict[str, Any], int]:
    """Register one device."""
    spec = parse_body(DeviceCreate)
    result = register_devices(request_session(), [spec], registry_context(), indexed=False)
    (registered,) = result.devices
    host, port = mqtt_endpoint()
    device = find_device(request_session(), registered.device_id)
    return {"device": device_json(device),
            "mqtt": {"host": host, "port": port, "username": device.mqtt_username,
                     "password": registered.mqtt_password},
            "fleet_signing_public_key": device.fleet.signing_public_key}, 201


@bp.post("/bulk")
@doc("Register up to 10,000 devices, all or nothing", body=DeviceBulkCreate,
     response=BulkRegistered, status=201, tag="devices")
@require(Role.OPERATOR)
def bulk_view() -> tuple[dict[str, Any], int]:
    """Register many devices in one transaction; 413 above 10,000."""
    data = json_body()
    rows = data.get("devices") if isinstance(data, dict) else None
    if isinstance(rows, list) and len(rows) > MAX_BULK_DEVICES:
        message = f"{len(rows)} devices in one request; the limit is {MAX_BULK_DEVICES}"
        raise ApiError(413, message, [FieldError("devices", message)])
    # The envelope first (a list of objects), then each row on its own, so that errors
    # carry the row index and every row's problems are reported together.
    spec = parse(DeviceBulkEnvelope, data)
    if not spec.devices:
        raise ApiError(422, "devices: the list is empty", [FieldError("devices", "is empty")])
    rows = parse_rows(spec.devices)
    result = register_devices(request_session(), rows, registry_context(),
                              create_fleets=spec.create_fleets)
    host, port = mqtt_endpoint()
    return {
        "count": len(result.devices), "mqtt_host": host, "mqtt_port": port,
        "fleet_signing_public_keys": {n: f.signing_public_key for n, f in result.fleets.items()},
        "devices": [{"id": r.device_id, "name": r.name, "fleet": r.fleet,
                     "mqtt_password": r.mqtt_password} for r in result.devices],
    }, 201


@bp.get("")
@doc("List devices with filters, by pages", query=DeviceQuery, response=DeviceList,
     tag="devices")
@require(Role.VIEWER)
def list_view() -> Response:
    """A page of devices; `next_cursor` (and a Link header) lead to the next one."""
    query = parse_query(DeviceQuery, multi=("tag",))
    devices, next_cursor = list_devices(request_session(), query)
    response = jsonify({"items": [device_json(d) for d in devices],
                        "next_cursor": next_cursor})
    if next_cursor is not None:
        args = request.args.to_dict(flat=False)
        args["cursor"] = [next_cursor]
        link = url_for("devices.list_view", _external=False, **args)  # type: ignore[arg-type]
        response.headers["Link"] = f'<{link}>; rel="next"'
    return response


@bp.get("/<key>")
@doc("Get a device by id or name", response=DeviceOut, tag="devices")
@require(Role.VIEWER)
def get_view(key: str) -> dict[str, Any]:
    """One device."""
    return device_json(find_device(request_session(), key))


@bp.patch("/<key>")
@doc("Replace a device's tags", body=DeviceUpdate, response=DeviceOut, tag="devices")
@require(Role.OPERATOR)
def update_view(key: str) -> dict[str, Any]:
    """Set the tags of a device."""
    spec = parse_body(DeviceUpdate)
    return device_json(set_tags(request_session(), key, spec.tags))


@bp.delete("/<key>")
@doc("Decommission a device: its MQTT access is revoked", response=DeviceOut,
     tag="devices")
@require(Role.ADMIN)
def delete_view(key: str) -> dict[str, Any]:
    """Decommission a device (the row stays, with state decommissioned)."""
    return device_json(decommission(request_session(), key, registry_context()))
