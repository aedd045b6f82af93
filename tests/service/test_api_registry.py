"""The registry API on SQLite and on a real PostgreSQL: fleets, devices, bulk, bad input."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from flask import Flask
from sqlalchemy import select

from firmware.targets import CATALOG, KIB, MIB, OtaLayout
from service.broker_files import PASSWORD_FILE, SYSTEM_USERNAMES
from service.models import Device
from service.mqtt_passwords import verify_password
from tests.service.conftest import Api, count_rows, fleet

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"


def device(name: str = "gh-001", fleet_name: str = "greenhouse", **kw: Any) -> dict[str, Any]:
    """A valid registration body."""
    body: dict[str, Any] = {"name": name, "fleet": fleet_name, "mcu": "stm32f746"}
    body.update(kw)
    return {k: v for k, v in body.items() if v is not None}


def stored_device(app: Flask, device_id: str) -> Device:
    """The device row as stored."""
    session = app.extensions["tinyfleet.sessionmaker"]()
    try:
        found = session.scalar(select(Device).where(Device.id == device_id))
        assert found is not None
        return found
    finally:
        session.close()


def assert_problem(response: Any, status: int, field: str) -> dict[str, Any]:
    """A problem+json response with `status` naming `field`."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == PROBLEM
    body = response.json
    assert body["status"] == status and body["title"] and body["type"].startswith("https://")
    assert field in [e["field"] for e in body["errors"]], body
    if status in (409, 422):  # the summary names the (first) field at fault
        assert field in body["detail"] or len(body["errors"]) > 1
    return dict(body)


def test_mcu_catalog(api: Api) -> None:
    items = api.get("/api/v1/mcus").json["items"]
    assert [m["name"] for m in items] == sorted(CATALOG)
    f746 = api.get("/api/v1/mcus/STM32F746").json
    assert (f746["cpu"], f746["sram_bytes"], f746["flash_bytes"]) == ("cortex-m7", 320 * KIB,
                                                                      1 * MIB)
    assert f746["slot_bytes_ab"] == CATALOG["stm32f746"].slot_bytes(OtaLayout.AB)
    body = assert_problem(api.get("/api/v1/mcus/stm32f999"), 404, "name")
    assert "stm32f412" in body["detail"]


def test_fleet_gets_a_signing_key(api: Api, app: Flask) -> None:
    created = fleet(api, "greenhouse")
    assert created["device_count"] == 0
    public = serialization.load_pem_public_key(created["signing_public_key"].encode())
    key_files = list((Path(app.config["VAR_DIR"]) / "keys").iterdir())
    assert len(key_files) == 1
    assert stat.S_IMODE(os.stat(key_files[0]).st_mode) == 0o600
    private = serialization.load_pem_private_key(key_files[0].read_bytes(), password=None)
    assert private.public_key().public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.Raw, serialization.PublicFormat.Raw) == public.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert "PRIVATE" not in str(api.get("/api/v1/fleets").json)
    assert api.get("/api/v1/fleets/greenhouse").json["name"] == "greenhouse"
    assert_problem(api.post("/api/v1/fleets", json={"name": "greenhouse"}), 409, "name")
    assert_problem(api.post("/api/v1/fleets", json={"name": "Bad Name"}), 422, "name")
    assert_problem(api.get("/api/v1/fleets/nope"), 404, "name")
    assert count_rows(app, "fleets") == 1
    assert len(list((Path(app.config["VAR_DIR"]) / "keys").iterdir())) == 1


def test_register_catalog_device(api: Api, app: Flask) -> None:
    key = fleet(api)["signing_public_key"]
    response = api.post("/api/v1/devices", json=device(tags=["roof", "lab"]))
    assert response.status_code == 201, response.json
    body = response.json
    dev = body["device"]
    assert dev["mcu"] == "stm32f746" and dev["cpu"] == "cortex-m7"
    assert dev["sram_bytes"] == 320 * KIB and dev["ota_layout"] == "ab"
    assert dev["slot_bytes"] == (1 * MIB - 32 * KIB) // 2  # A/B halves Flash after the boot
    assert dev["tags"] == ["lab", "roof"] and dev["state"] == "active"
    assert body["mqtt"]["username"] == dev["id"] == dev["mqtt_username"]
    assert body["mqtt"]["port"] == 18883
    assert body["fleet_signing_public_key"] == key
    stored = stored_device(app, dev["id"])
    assert stored.mqtt_password_hash is not None
    assert stored.mqtt_password_hash.startswith("$7$101$")
    assert verify_password(body["mqtt"]["password"], stored.mqtt_password_hash)
    assert body["mqtt"]["password"] not in str(api.get(f"/api/v1/devices/{dev['id']}").json)
    # The broker's password file follows the registry.
    pw_file = Path(app.config["BROKER_DIR"]) / PASSWORD_FILE
    assert f"{dev['id']}:{stored.mqtt_password_hash}" in pw_file.read_text().splitlines()
    assert api.get("/api/v1/devices/gh-001").json["id"] == dev["id"]  # by name too


def test_register_explicit_device(api: Api) -> None:
    fleet(api)
    response = api.post("/api/v1/devices", json=device(
        mcu=None, sram_bytes="192KiB", flash_bytes=512 * KIB, cpu="cortex-m4",
        ota_layout="single"))
    assert response.status_code == 201, response.json
    dev = response.json["device"]
    assert (dev["mcu"], dev["sram_bytes"], dev["flash_bytes"]) == ("custom", 192 * KIB,
                                                                   512 * KIB)
    assert dev["slot_bytes"] > 400 * KIB and dev["ota_layout"] == "single"


BAD_DEVICES: list[tuple[str, dict[str, Any], int, str]] = [
    ("unknown mcu", {"mcu": "stm32f999"}, 422, "mcu"),
    ("sram too small", {"mcu": None, "sram_bytes": 1024, "flash_bytes": MIB,
                        "cpu": "cortex-m4"}, 422, "sram_bytes"),
    ("sram too large", {"mcu": None, "sram_bytes": "128MiB", "flash_bytes": MIB,
                        "cpu": "cortex-m4"}, 422, "sram_bytes"),
    ("flash too small", {"mcu": None, "sram_bytes": 64 * KIB, "flash_bytes": 8 * KIB,
                         "cpu": "cortex-m4"}, 422, "flash_bytes"),
    ("flash too large", {"mcu": None, "sram_bytes": 64 * KIB, "flash_bytes": "2048MiB",
                         "cpu": "cortex-m4"}, 422, "flash_bytes"),
    ("slot too small (A/B)", {"mcu": "stm32f103"}, 422, "mcu"),
    ("explicit slot too small", {"mcu": None, "sram_bytes": 64 * KIB,
                                 "flash_bytes": 96 * KIB, "cpu": "cortex-m3"}, 422,
     "flash_bytes"),
    ("not a size", {"mcu": None, "sram_bytes": "lots", "flash_bytes": MIB,
                    "cpu": "cortex-m4"}, 422, "sram_bytes"),
    ("unknown cpu", {"mcu": None, "sram_bytes": 64 * KIB, "flash_bytes": MIB,
                     "cpu": "cortex-m9"}, 422, "cpu"),
    ("partial explicit", {"mcu": None, "sram_bytes": 64 * KIB}, 422, "flash_bytes"),
    ("neither", {"mcu": None}, 422, "mcu"),
    ("both", {"sram_bytes": 64 * KIB}, 422, "sram_bytes"),
    ("unknown fleet", {"fleet": "nowhere"}, 422, "fleet"),
    ("bad name", {"name": "has space"}, 422, "name"),
    ("missing name", {"name": None}, 422, "name"),
    ("bad tag", {"tags": ["ok", "no/slash"]}, 422, "tags[1]"),
    ("tags not a list", {"tags": "lab"}, 422, "tags"),
    ("bad layout", {"ota_layout": "abc"}, 422, "ota_layout"),
    ("unknown field", {"colour": "red"}, 422, "colour"),
    ("wrong type", {"name": 12}, 422, "name"),
]


@pytest.mark.parametrize(("case", "change", "status", "field"), BAD_DEVICES,
                         ids=[c[0] for c in BAD_DEVICES])
def test_bad_device_writes_nothing(api: Api, app: Flask, case: str, change: dict[str, Any],
                                   status: int, field: str) -> None:
    fleet(api)
    body = device(**{k: v for k, v in change.items() if v is not None})
    for key in (k for k, v in change.items() if v is None):
        body.pop(key, None)
    assert_problem(api.post("/api/v1/devices", json=body), status, field)
    assert count_rows(app, "devices") == 0
    assert count_rows(app, "device_tags") == 0


def test_bad_device_messages_name_value_and_limit(api: Api) -> None:
    fleet(api)
    unknown = api.post("/api/v1/devices", json=device(mcu="stm32f999")).json
    assert "stm32f999" in unknown["detail"] and "nrf52840" in unknown["detail"]
    small = api.post("/api/v1/devices", json=device(mcu="stm32f103")).json
    assert "49152" in small["detail"] and "65536" in small["detail"]
    assert api.post("/api/v1/devices", json=device(mcu="stm32f103",
                                                   ota_layout="single")).status_code == 201
    sram = api.post("/api/v1/devices", json=device(
        mcu=None, sram_bytes=1024, flash_bytes=MIB, cpu="cortex-m4")).json
    assert "1024" in sram["detail"] and "2048" in sram["detail"]


def test_duplicate_name_is_409(api: Api, app: Flask) -> None:
    fleet(api)
    assert api.post("/api/v1/devices", json=device()).status_code == 201
    assert_problem(api.post("/api/v1/devices", json=device()), 409, "name")
    assert count_rows(app, "devices") == 1


@pytest.mark.parametrize(("data", "content_type", "status", "field"), [
    ("{bad json", "application/json", 400, "body"),
    ("", "application/json", 400, "body"),
    (b"\xff\xfe", "application/json", 400, "body"),
    ("name=x", "application/x-www-form-urlencoded", 415, "Content-Type"),
    ("[1, 2]", "application/json", 422, "body"),
])
def test_malformed_bodies(api: Api, app: Flask, data: Any, content_type: str, status: int,
                          field: str) -> None:
    fleet(api)
    response = api.post("/api/v1/devices", data=data, content_type=content_type)
    assert_problem(response, status, field)
    assert count_rows(app, "devices") == 0


def test_bulk_all_or_nothing(api: Api, app: Flask) -> None:
    fleet(api, "north")
    rows = [device(f"n-{i:03}", "north", mcu=["stm32f412", "nrf52840", "rp2040"][i % 3],
                   tags=[f"batch{i % 2}"]) for i in range(60)]
    rows[17]["mcu"] = "stm32f999"
    rows[41]["cpu"] = "cortex-m4"  # and mcu: both given
    rows[50]["name"] = rows[3]["name"]
    response = api.post("/api/v1/devices/bulk", json={"devices": rows})
    body = assert_problem(response, 422, "mcu")
    by_index = {(e["index"], e["field"]) for e in body["errors"]}
    assert by_index == {(17, "mcu"), (41, "cpu"), (50, "name")}
    assert count_rows(app, "devices") == 0 and count_rows(app, "device_tags") == 0
    rows[41]["sram_bytes"] = 1  # a schema error: every row's problems still come together
    body = assert_problem(api.post("/api/v1/devices/bulk", json={"devices": rows}), 422,
                          "sram_bytes")
    assert {(e["index"], e["field"]) for e in body["errors"]} == {
        (17, "mcu"), (41, "sram_bytes"), (50, "name")}
    rows[17]["mcu"], rows[50]["name"] = "stm32f412", "n-unique"
    del rows[41]["sram_bytes"], rows[41]["cpu"]
    response = api.post("/api/v1/devices/bulk", json={"devices": rows})
    assert response.status_code == 201, response.json
    out = response.json
    assert out["count"] == 60 and [d["name"] for d in out["devices"]] == [r["name"]
                                                                           for r in rows]
    assert set(out["fleet_signing_public_keys"]) == {"north"}
    assert count_rows(app, "devices") == 60 and count_rows(app, "device_tags") == 60
    first = out["devices"][0]
    assert verify_password(first["mqtt_password"],
                           stored_device(app, first["id"]).mqtt_password_hash or "")
    pw_lines = (Path(app.config["BROKER_DIR"]) / PASSWORD_FILE).read_text().splitlines()
    assert len(pw_lines) == 60 + len(SYSTEM_USERNAMES)  # + the service's own accounts


def test_bulk_conflicts_and_fleets(api: Api, app: Flask) -> None:
    fleet(api, "north")
    assert api.post("/api/v1/devices", json=device("taken", "north")).status_code == 201
    rows = [device("a", "north"), device("taken", "north"), device("b", "north")]
    body = assert_problem(api.post("/api/v1/devices/bulk", json={"devices": rows}), 409,
                          "name")
    assert body["errors"][0]["index"] == 1
    rows = [device("a", "south"), device("b", "north")]
    body = assert_problem(api.post("/api/v1/devices/bulk", json={"devices": rows}), 422,
                          "fleet")
    assert body["errors"][0]["index"] == 0
    assert count_rows(app, "fleets") == 1
    response = api.post("/api/v1/devices/bulk", json={"devices": rows, "create_fleets": True})
    assert response.status_code == 201, response.json
    assert set(response.json["fleet_signing_public_keys"]) == {"north", "south"}
    assert count_rows(app, "fleets") == 2 and count_rows(app, "devices") == 3


def test_bulk_limits(api: Api, app: Flask) -> None:
    fleet(api)
    too_many = {"devices": [{"name": f"d{i}"} for i in range(10_001)]}
    assert_problem(api.post("/api/v1/devices/bulk", json=too_many), 413, "devices")
    assert_problem(api.post("/api/v1/devices/bulk", json={"devices": []}), 422, "devices")
    assert_problem(api.post("/api/v1/devices/bulk", json={"devices": [1]}), 422, "devices[0]")
    assert count_rows(app, "devices") == 0


def test_body_over_content_limit_is_413(api: Api, app: Flask) -> None:
    app.config["MAX_CONTENT_LENGTH"] = 1000
    response = api.post("/api/v1/devices/bulk", data="x" * 2000,
                        content_type="application/json")
    assert_problem(response, 413, "body")


def _register_mix(api: Api) -> None:
    fleet(api, "north")
    fleet(api, "south")
    rows = [device(f"d-{i:02}", "north" if i % 2 else "south",
                   mcu="stm32f412" if i % 3 else "nrf52840",
                   tags=["even"] if i % 2 == 0 else ["odd", *(["five"] if i % 5 == 0 else [])])
            for i in range(25)]
    assert api.post("/api/v1/devices/bulk", json={"devices": rows}).status_code == 201


def test_pagination_walks_every_device_once(api: Api) -> None:
    _register_mix(api)
    seen: list[str] = []
    url: str | None = "/api/v1/devices?limit=10"
    pages = 0
    while url:
        response = api.get(url)
        assert response.status_code == 200
        body = response.json
        seen.extend(d["id"] for d in body["items"])
        pages += 1
        link = response.headers.get("Link")
        if body["next_cursor"]:
            assert link and 'rel="next"' in link and body["next_cursor"] in link
            url = link.split(">")[0].lstrip("<")
        else:
            assert link is None
            url = None
    assert pages == 3 and len(seen) == 25 and seen == sorted(set(seen))
    assert_problem(api.get("/api/v1/devices?limit=0"), 422, "limit")
    assert_problem(api.get("/api/v1/devices?limit=1001"), 422, "limit")
    assert_problem(api.get("/api/v1/devices?limit=ten"), 422, "limit")
    assert_problem(api.get("/api/v1/devices?cursor=garbage"), 422, "cursor")


def test_filters(api: Api) -> None:
    _register_mix(api)

    def names(query: str) -> set[str]:
        response = api.get(f"/api/v1/devices?limit=100&{query}")
        assert response.status_code == 200, response.json
        return {d["name"] for d in response.json["items"]}

    assert names("fleet=north") == {f"d-{i:02}" for i in range(25) if i % 2}
    assert names("mcu=nrf52840") == {f"d-{i:02}" for i in range(25) if i % 3 == 0}
    assert names("tag=odd&tag=five") == {"d-05", "d-15"}
    assert names("fleet=south&mcu=nrf52840&tag=even") == {
        f"d-{i:02}" for i in range(25) if i % 2 == 0 and i % 3 == 0}
    assert names("state=decommissioned") == set()
    assert_problem(api.get("/api/v1/devices?fleet=nowhere"), 422, "fleet")
    assert_problem(api.get("/api/v1/devices?mcu=z80"), 422, "mcu")
    assert_problem(api.get("/api/v1/devices?state=lost"), 422, "state")
    assert_problem(api.get("/api/v1/devices?color=red"), 422, "color")


def test_tags_and_decommission(api: Api, app: Flask) -> None:
    fleet(api)
    dev = api.post("/api/v1/devices", json=device(tags=["a", "b"])).json["device"]
    patched = api.call("PATCH", f"/api/v1/devices/{dev['id']}", json={"tags": ["b", "c"]})
    assert patched.status_code == 200 and patched.json["tags"] == ["b", "c"]
    assert api.get(f"/api/v1/devices/{dev['id']}").json["tags"] == ["b", "c"]
    assert_problem(api.call("PATCH", f"/api/v1/devices/{dev['id']}", json={"tags": "x"}),
                   422, "tags")
    assert_problem(api.call("PATCH", "/api/v1/devices/nope", json={"tags": []}), 404, "id")
    pw_file = Path(app.config["BROKER_DIR"]) / PASSWORD_FILE
    assert any(line.startswith(dev["id"] + ":") for line in pw_file.read_text().splitlines())
    gone = api.call("DELETE", f"/api/v1/devices/{dev['id']}")
    assert gone.status_code == 200 and gone.json["state"] == "decommissioned"
    assert stored_device(app, dev["id"]).mqtt_password_hash is None
    assert not any(line.startswith(dev["id"] + ":")
                   for line in pw_file.read_text().splitlines())
    assert api.call("DELETE", f"/api/v1/devices/{dev['id']}").status_code == 200
    listed = api.get("/api/v1/devices?state=decommissioned").json["items"]
    assert [d["id"] for d in listed] == [dev["id"]]
    assert api.get("/api/v1/fleets/greenhouse").json["device_count"] == 0


def test_unknown_route_and_method(api: Api) -> None:
    response = api.get("/api/v1/gadgets")
    assert response.status_code == 404 and response.mimetype == PROBLEM
    assert "/api/v1/gadgets" in response.json["detail"]
    response = api.call("PUT", "/api/v1/mcus")
    assert response.status_code == 405 and response.mimetype == PROBLEM
