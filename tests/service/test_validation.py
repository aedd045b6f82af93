"""The dataclass schemas: parsing names every bad field; JSON Schema mirrors the limits."""

from __future__ import annotations

import pytest

from firmware.targets import MAX_SRAM_BYTES, MIN_SRAM_BYTES, Cpu, OtaLayout
from service.problems import ApiError
from service.schemas import DeviceCreate, DeviceQuery
from service.validation import object_schema, parse

pytestmark = pytest.mark.unit


def test_parse_fills_defaults_and_converts() -> None:
    row = parse(DeviceCreate, {"name": "a", "fleet": "f", "sram_bytes": "256KiB",
                               "flash_bytes": 1 << 20, "cpu": "cortex-m4"})
    assert row.sram_bytes == 256 * 1024 and row.cpu is Cpu.CORTEX_M4
    assert row.ota_layout is OtaLayout.AB and row.tags == [] and row.mcu is None


def test_parse_reports_every_field() -> None:
    with pytest.raises(ApiError) as info:
        parse(DeviceCreate, {"name": "", "sram_bytes": True, "tags": ["ok", 3], "x": 1,
                             "ota_layout": None})
    fields = {e.field for e in info.value.errors}
    assert fields == {"name", "fleet", "sram_bytes", "tags[1]", "x", "ota_layout"}
    assert info.value.status == 422


def test_query_strings_are_converted_from_text() -> None:
    q = parse(DeviceQuery, {"limit": "20", "tag": ["a", "b"], "state": "active"},
              from_text=True)
    assert q.limit == 20 and q.tag == ["a", "b"] and q.state is not None
    with pytest.raises(ApiError) as info:
        parse(DeviceQuery, {"limit": "0"}, from_text=True)
    assert "below the minimum 1" in info.value.errors[0].message


def test_json_schema_carries_the_limits() -> None:
    schema = object_schema(DeviceCreate)
    assert schema["required"] == ["name", "fleet"]
    assert schema["additionalProperties"] is False
    sram = schema["properties"]["sram_bytes"]
    assert sram["anyOf"][1] == {"type": "null"}
    assert schema["properties"]["ota_layout"]["default"] == "ab"
    assert "stm32f746" in schema["properties"]["mcu"]["anyOf"][0]["enum"]
    assert sram["anyOf"][0]["oneOf"][0] == {"type": "integer", "minimum": MIN_SRAM_BYTES,
                                            "maximum": MAX_SRAM_BYTES}


def test_config_layers_defaults_environment_and_overrides() -> None:
    from service.config import load_config

    env = {"TINYFLEET_VAR_DIR": "/srv/tf", "TINYFLEET_MQTT_URL": "mqtt://broker.lan:1884",
           "TINYFLEET_SYNC_BROKER_FILES": "false"}
    cfg = load_config(environ=env)
    assert cfg["DATABASE_URL"] == "sqlite:////srv/tf/tinyfleet.db"
    assert cfg["BROKER_DIR"] == "/srv/tf/broker"
    assert (cfg["MQTT_HOST"], cfg["MQTT_PORT"]) == ("broker.lan", 1884)
    assert cfg["SYNC_BROKER_FILES"] is False
    cfg = load_config({"MQTT_PORT": 9000, "VAR_DIR": "/x"}, environ=env)
    assert (cfg["MQTT_HOST"], cfg["MQTT_PORT"], cfg["VAR_DIR"]) == ("broker.lan", 9000, "/x")
    with pytest.raises(ValueError, match="TINYFLEET_MQTT_PORT"):
        load_config(environ={"TINYFLEET_MQTT_PORT": "many"})
