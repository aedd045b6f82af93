"""/api/v1/devices: register (one or bulk), list, get, tag, rotate credentials of and
decommission devices."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, jsonify, request, url_for
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import idempotency
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
from service.device_list import list_devices
from service.models import Device, Fleet, Role
from service.parsing import field_errors, summary, validate
from service.problems import ApiError, FieldError
from service.registry import (
    Registered,
    decommission,
    find_device,
    register_devices,
    replay_devices,
    rotate_credentials,
    rotate_one,
    rows_failed,
    select_for_rotation,
    set_tags,
)
from service.schemas import (
    MAX_BULK_DEVICES,
    BulkRegistered,
    CredentialRotation,
    CredentialsRotated,
    DeviceBulkCreate,
    DeviceCreate,
    DeviceList,
    DeviceOut,
    DeviceQuery,
    DeviceRegistered,
    DeviceUpdate,
)

bp = Blueprint("devices", __name__, url_prefix=f"{API_PREFIX}/devices")

Complete = Callable[[list[Registered]], None]


def _credentials_json(device: Device, password: str) -> dict[str, Any]:
    host, port = mqtt_endpoint()
    return {"device": device_json(device),
            "mqtt": {"host": host, "port": port, "username": device.mqtt_username,
                     "password": password},
            "fleet_signing_public_key": device.fleet.signing_public_key}


@bp.post("")
@doc("Register a device; the response holds its MQTT password, once", body=DeviceCreate,
     response=DeviceRegistered, status=201, tag="devices")
@require(Role.OPERATOR)
def create_view() -> tuple[dict[str, Any], int]:
    """Register one device."""
    spec = parse_body(DeviceCreate)
    result = register_devices(request_session(), [spec], registry_context(), indexed=False)
    (registered,) = result.devices
    assert registered.mqtt_password is not None
    device = find_device(request_session(), registered.device_id)
    return _credentials_json(device, registered.mqtt_password), 201


def _bulk_rows(devices: list[Registered]) -> list[dict[str, Any]]:
    return [{"id": r.device_id, "name": r.name, "fleet": r.fleet,
             "mqtt_password": r.mqtt_password} for r in devices]


def _idempotent(scope: str, data: Any, work: Callable[[Complete | None], dict[str, Any]],
                replay: Callable[[list[str]], dict[str, Any]]) -> dict[str, Any]:
    """Run `work` once per Idempotency-Key (when one is sent); a retry gets `replay`."""
    key = request.headers.get(idempotency.HEADER)
    if key is None:
        return work(None)
    session = request_session()
    claim = idempotency.claim(session, scope, idempotency.check_key(key),
                              idempotency.fingerprint(data))
    if claim.replay_ids is not None:
        return replay(claim.replay_ids)
    row_id = claim.row_id
    assert row_id is not None

    def complete(done: list[Registered]) -> None:
        idempotency.complete(session, row_id, [r.device_id for r in done])

    try:
        return work(complete)
    except BaseException:
        idempotency.release(session, row_id)
        raise


def _parse_bulk(data: Any) -> DeviceBulkCreate:
    """The bulk body; 413 above 10,000 rows; 422 listing every row's problems."""
    rows = data.get("devices") if isinstance(data, dict) else None
    if isinstance(rows, list) and len(rows) > MAX_BULK_DEVICES:
        message = f"{len(rows)} devices in one request; the limit is {MAX_BULK_DEVICES}"
        raise ApiError(413, message, [FieldError("devices", message)])
    try:
        spec = DeviceBulkCreate.model_validate(data)
    except ValidationError as exc:
        errors = field_errors(exc, DeviceBulkCreate)
        if not isinstance(rows, list) or any(e.index is None for e in errors):
            raise ApiError(422, summary(errors), errors) from None
        # Every row's problems in one answer: schema errors, and the others' hardware.
        bad = {e.index for e in errors}
        parsed = [None if i in bad else DeviceCreate.model_validate(raw)
                  for i, raw in enumerate(rows)]
        raise rows_failed(parsed, errors) from None
    if not spec.devices:
        raise ApiError(422, "devices: the list is empty", [FieldError("devices", "is empty")])
    return spec


def _signing_keys(session: Session, fleet_names: set[str]) -> dict[str, str]:
    rows = session.execute(select(Fleet.name, Fleet.signing_public_key)
                           .where(Fleet.name.in_(fleet_names)))
    return {name: key for name, key in rows}


@bp.post("/bulk")
@doc("Register up to 10,000 devices, all or nothing", body=DeviceBulkCreate,
     response=BulkRegistered, status=201, tag="devices", idempotent=True)
@require(Role.OPERATOR)
def bulk_view() -> tuple[dict[str, Any], int]:
    """Register many devices in one transaction; 413 above 10,000."""
    data = json_body()
    spec = _parse_bulk(data)
    session, ctx = request_session(), registry_context()
    host, port = mqtt_endpoint()

    def answer(devices: list[Registered], keys: dict[str, str], replayed: bool
               ) -> dict[str, Any]:
        return {"count": len(devices), "mqtt_host": host, "mqtt_port": port,
                "fleet_signing_public_keys": keys, "devices": _bulk_rows(devices),
                "replayed": replayed}

    def work(complete: Complete | None) -> dict[str, Any]:
        result = register_devices(session, spec.devices, ctx,
                                  create_fleets=spec.create_fleets, before_commit=complete)
        return answer(result.devices, {n: f.signing_public_key
                                       for n, f in result.fleets.items()}, False)

    def replay(device_ids: list[str]) -> dict[str, Any]:
        devices = rotate_credentials(session, replay_devices(session, device_ids), ctx)
        return answer(devices, _signing_keys(session, {d.fleet for d in devices}), True)

    return _idempotent("devices.bulk", data, work, replay), 201


@bp.post("/credentials")
@doc("Replace the MQTT passwords of up to 10,000 devices; new ones are returned once",
     body=CredentialRotation, response=CredentialsRotated, tag="devices", idempotent=True)
@require(Role.OPERATOR)
def rotate_bulk_view() -> dict[str, Any]:
    """Rotate the credentials of listed or filtered devices in one transaction."""
    data = json_body()
    spec = validate(CredentialRotation, data)
    session, ctx = request_session(), registry_context()
    host, port = mqtt_endpoint()

    def answer(devices: list[Registered], replayed: bool) -> dict[str, Any]:
        return {"count": sum(d.mqtt_password is not None for d in devices),
                "mqtt_host": host, "mqtt_port": port, "devices": _bulk_rows(devices),
                "replayed": replayed}

    def work(complete: Complete | None) -> dict[str, Any]:
        selected = select_for_rotation(session, spec)
        return answer(rotate_credentials(session, selected, ctx, before_commit=complete),
                      False)

    def replay(device_ids: list[str]) -> dict[str, Any]:
        return answer(rotate_credentials(session, replay_devices(session, device_ids), ctx),
                      True)

    return _idempotent("devices.credentials", data, work, replay)


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
@doc("Get a device by id (dev-<16 hex>) or name", response=DeviceOut, tag="devices")
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


@bp.post("/<key>/credentials")
@doc("Replace a device's MQTT password: the new one is returned once, the old one is "
     "refused from now on", response=DeviceRegistered, tag="devices")
@require(Role.OPERATOR)
def rotate_view(key: str) -> dict[str, Any]:
    """Rotate one device's credentials; 409 when it is decommissioned."""
    device, password = rotate_one(request_session(), key, registry_context())
    return _credentials_json(device, password)


@bp.delete("/<key>")
@doc("Decommission a device: its MQTT access is revoked", response=DeviceOut,
     tag="devices")
@require(Role.ADMIN)
def delete_view(key: str) -> dict[str, Any]:
    """Decommission a device (the row stays, with state decommissioned)."""
    return device_json(decommission(request_session(), key, registry_context()))
