"""What every API view shares: the JSON body, the query string, the registry context and
the JSON shape of each resource."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, TypeVar

from flask import current_app, request
from pydantic import BaseModel

from device_agent.protocol import DEFAULT_BACKEND
from firmware.targets import OtaLayout, TargetSpec
from service.device_list import DeviceRow
from service.limits import read_body
from service.models import ApiToken, Device, Fleet
from service.parsing import validate
from service.problems import ApiError, FieldError
from service.registry import RegistryContext

API_PREFIX = "/api/v1"
M = TypeVar("M", bound=BaseModel)


def json_body() -> Any:
    """The request's JSON document: 415 unless it is JSON, 400 when malformed."""
    if not request.is_json:
        raise ApiError(415, f"the body must be application/json, got "
                            f"{request.mimetype or 'no Content-Type'}",
                       [FieldError("Content-Type", "must be application/json")])
    raw = read_body()
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as err:
        message = f"the body is not UTF-8: {err.reason} at byte {err.start}"
        raise ApiError(400, message, [FieldError("body", message)]) from None
    except RecursionError:
        message = "the JSON document is nested too deeply"
        raise ApiError(400, message, [FieldError("body", message)]) from None
    except ValueError as err:
        message = f"malformed JSON: {err}" if raw.strip() else "the body is empty"
        raise ApiError(400, message, [FieldError("body", message)]) from None
    return data


def parse_body(model: type[M]) -> M:
    """The JSON body validated as `model` (422 naming every bad field)."""
    return validate(model, json_body())


def parse_query(model: type[M], multi: tuple[str, ...] = ()) -> M:
    """The query string validated as `model`; `multi` names repeatable parameters."""
    data: dict[str, Any] = {}
    for key in request.args:
        values = request.args.getlist(key)
        data[key] = values if key in multi else values[-1]
    return validate(model, data)


def registry_context() -> RegistryContext:
    """Key, broker and pid-file locations from the app's settings."""
    return RegistryContext.from_config(current_app.config)


def iso(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC (SQLite returns naive datetimes, which are UTC here)."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def device_json(device: Device | DeviceRow) -> dict[str, Any]:
    """A device as the API shows it (schema DeviceOut)."""
    return {
        "id": device.id, "name": device.name, "fleet": device.fleet_name, "mcu": device.mcu,
        "cpu": device.cpu, "sram_bytes": device.sram_bytes, "flash_bytes": device.flash_bytes,
        "slot_bytes": device.slot_bytes, "ota_layout": device.ota_layout, "tags": device.tags,
        "state": device.state.value, "mqtt_username": device.mqtt_username,
        "created_at": iso(device.created_at),
        "reported": {"installed_model_version": device.installed_model_version,
                     "online": bool(device.online), "last_seen_at": iso(device.last_seen_at),
                     "backend": device.backend or DEFAULT_BACKEND},
    }


def fleet_json(fleet: Fleet, device_count: int) -> dict[str, Any]:
    """A fleet as the API shows it (schema FleetOut)."""
    return {"name": fleet.name, "description": fleet.description,
            "signing_public_key": fleet.signing_public_key, "device_count": device_count,
            "created_at": iso(fleet.created_at)}


def mcu_json(target: TargetSpec) -> dict[str, Any]:
    """A catalog MCU as the API shows it (schema McuOut)."""
    return {"name": target.name, "vendor": target.vendor, "cpu": target.cpu.value,
            "sram_bytes": target.sram_bytes, "flash_bytes": target.flash_bytes,
            "clock_hz": target.clock_hz, "fpu": target.fpu, "dsp": target.dsp,
            "qemu_board": target.qemu_board, "slot_bytes_ab": target.slot_bytes(OtaLayout.AB),
            "slot_bytes_single": target.slot_bytes(OtaLayout.SINGLE), "note": target.note}


def token_json(token: ApiToken) -> dict[str, Any]:
    """A token without its secret (schema TokenOut)."""
    return {"id": token.id, "name": token.name, "role": token.role.value,
            "prefix": token.prefix, "created_at": iso(token.created_at),
            "expires_at": iso(token.expires_at), "revoked_at": iso(token.revoked_at)}


def mqtt_endpoint() -> tuple[str, int]:
    """The broker's host and port devices connect to."""
    return str(current_app.config["MQTT_HOST"]), int(current_app.config["MQTT_PORT"])
