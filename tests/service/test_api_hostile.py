"""Hostile input gets a 4xx problem+json naming the field, the same answer on SQLite and on
PostgreSQL, and writes nothing (each case once answered 500: issue 9)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from service.limits import body_limit, route_body_limit
from tests.service.conftest import Api, count_rows, fleet

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"
DEEP = 100_000


def problem(response: Any, status: int, field: str) -> dict[str, Any]:
    """The response is problem+json with `status` and names `field`."""
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    assert response.mimetype == PROBLEM
    body = dict(response.json)
    assert body["status"] == status
    assert field in [e["field"] for e in body["errors"]], body
    return body


def device(name: str = "gh-1", **kw: Any) -> dict[str, Any]:
    return {"name": name, "fleet": "greenhouse", "mcu": "stm32f746", **kw}


@pytest.mark.parametrize("where", ["top", "devices", "row"])
def test_deep_nesting_is_400(api: Api, app: Flask, where: str) -> None:
    fleet(api)
    nested = "[" * DEEP + "]" * DEEP
    raw = {"top": nested, "devices": f'{{"devices": {nested}}}',
           "row": f'{{"devices": [{{"name": "a", "tags": {nested}}}]}}'}[where]
    response = api.post("/api/v1/devices/bulk", data=raw, content_type="application/json")
    assert "nested too deeply" in problem(response, 400, "body")["detail"]
    # Nested but parseable: a clean 422 at the field.
    tags = "[" * 200 + "]" * 200
    response = api.post("/api/v1/devices/bulk", content_type="application/json",
                        data=f'{{"devices": [{{"name": "a", "fleet": "greenhouse", '
                             f'"mcu": "rp2040", "tags": {tags}}}]}}')
    assert problem(response, 422, "tags[0]")["errors"][0]["index"] == 0
    assert count_rows(app, "devices") == 0


@pytest.mark.parametrize(("value", "field"), [
    ("1e400", "sram_bytes"), ("1e400KiB", "sram_bytes"), ("1e3KiB", "sram_bytes"),
    ("2048.7", "sram_bytes"), (" 64 KiB ", "sram_bytes"), ("64 KiB", "sram_bytes"),
    ("0x400", "sram_bytes"), ("-64KiB", "sram_bytes"), ("64KiBB", "sram_bytes"),
    ("9" * 13, "sram_bytes"), (True, "sram_bytes"), (2048.5, "sram_bytes"),
    (10**30, "sram_bytes"), ("1KiB", "sram_bytes"), ("4096MiB", "flash_bytes"),
])
def test_bad_sizes_are_422(api: Api, app: Flask, value: Any, field: str) -> None:
    fleet(api)
    body = device(mcu=None, sram_bytes="256KiB", flash_bytes="1MiB", cpu="cortex-m4")
    body[field] = value
    problem(api.post("/api/v1/devices", json=body), 422, field)
    # 1e400 as a JSON number is float infinity to Python's parser: still a clean 422.
    raw = json.dumps(body).replace('"1e400"', "1e400")
    problem(api.post("/api/v1/devices", data=raw, content_type="application/json"), 422, field)
    assert count_rows(app, "devices") == 0


def test_good_sizes_still_register(api: Api) -> None:
    fleet(api)
    for i, (sram, flash) in enumerate([("256KiB", "1MiB"), ("256kB", "1MB"), ("256K", "1M"),
                                       (262144, 1048576), ("262144", "1024KiB")]):
        body = device(f"ok-{i}", mcu=None, sram_bytes=sram, flash_bytes=flash,
                      cpu="cortex-m4")
        response = api.post("/api/v1/devices", json=body)
        assert response.status_code == 201, response.json
        assert response.json["device"]["sram_bytes"] == 262144


def test_lone_surrogates_are_422(api: Api, app: Flask) -> None:
    raw = '{"name": "greenhouse", "description": "caf\\ud800"}'
    problem(api.post("/api/v1/fleets", data=raw, content_type="application/json"), 422,
            "description")
    fleet(api)
    raw = '{"name": "gh-\\udfff", "fleet": "greenhouse", "mcu": "rp2040"}'
    problem(api.post("/api/v1/devices", data=raw, content_type="application/json"), 422, "name")
    raw = ('{"devices": [{"name": "a", "fleet": "greenhouse", "mcu": "rp2040", '
           '"tags": ["\\ud83d"]}]}')
    body = problem(api.post("/api/v1/devices/bulk", data=raw, content_type="application/json"),
                   422, "tags[0]")
    assert body["errors"][0]["index"] == 0
    assert count_rows(app, "fleets") == 1 and count_rows(app, "devices") == 0


@pytest.mark.parametrize("token_id", ["99999999999999999999", "2147483648", "0"])
def test_huge_token_ids_are_404(api: Api, token_id: str) -> None:
    problem(api.call("DELETE", f"/api/v1/tokens/{token_id}"), 404, "id")


def test_nul_bytes_get_the_same_answer_everywhere(api: Api, app: Flask) -> None:
    fleet(api)
    assert api.post("/api/v1/devices", json=device()).status_code == 201
    problem(api.get("/api/v1/devices?fleet=green%00house"), 422, "fleet")
    problem(api.get("/api/v1/devices?tag=a%00b"), 422, "tag[0]")
    problem(api.get("/api/v1/devices?mcu=rp2040%00"), 422, "mcu")
    problem(api.get("/api/v1/devices?cursor=dev-00000000000000%00"), 422, "cursor")
    problem(api.get("/api/v1/devices/gh-1%00"), 404, "id")
    problem(api.call("PATCH", "/api/v1/devices/gh%00", json={"tags": []}), 404, "id")
    problem(api.call("DELETE", "/api/v1/devices/gh%001"), 404, "id")
    problem(api.post("/api/v1/devices/gh%00/credentials"), 404, "id")
    problem(api.get("/api/v1/fleets/green%00house"), 404, "name")
    problem(api.get("/api/v1/mcus/rp2040%00"), 404, "name")
    problem(api.post("/api/v1/fleets", json={"name": "north", "description": "a\x00b"}), 422,
            "description")
    problem(api.post("/api/v1/devices", json=device("gh-2", tags=["x\x00"])), 422, "tags[0]")
    problem(api.post("/api/v1/tokens", json={"role": "viewer", "name": "a\x00"}), 422, "name")
    assert count_rows(app, "fleets") == 1 and count_rows(app, "devices") == 1


def test_names_may_not_look_like_ids_and_ids_win(api: Api, app: Flask) -> None:
    fleet(api)
    first = api.post("/api/v1/devices", json=device("first")).json["device"]["id"]
    body = problem(api.post("/api/v1/devices", json=device(first)), 422, "name")
    assert "form of a device id" in body["detail"]
    problem(api.post("/api/v1/devices", json=device("DEV-0123456789ABCDEF")), 422, "name")
    rows = [device("ok-a"), device("dev-00000000000000aa")]
    body = problem(api.post("/api/v1/devices/bulk", json={"devices": rows}), 422, "name")
    assert body["errors"][0]["index"] == 1
    # A key of an id's form is an id, never a name: the 404 says so.
    missing = api.get("/api/v1/devices/dev-00000000000000ff")
    assert "are ids" in problem(missing, 404, "id")["detail"]
    assert api.get(f"/api/v1/devices/{first}").json["name"] == "first"
    assert count_rows(app, "devices") == 1


def test_concurrent_duplicate_creates_are_409(api: Api, app: Flask) -> None:
    def race(send: Any) -> list[Any]:
        barrier = threading.Barrier(8)
        answers: list[Any] = [None] * 8

        def one(i: int) -> None:
            barrier.wait()
            answers[i] = send()

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return answers

    def create_fleet() -> Any:
        client = Api(app.test_client(), api.tokens)
        return client.post("/api/v1/fleets", json={"name": "raced"})

    answers = race(create_fleet)
    assert sorted(a.status_code for a in answers) == [201] + [409] * 7
    for a in answers:
        if a.status_code == 409:
            problem(a, 409, "name")
    assert count_rows(app, "fleets") == 1
    assert len(list((Path(app.config["VAR_DIR"]) / "keys").iterdir())) == 1  # no orphan key

    def create_device() -> Any:
        client = Api(app.test_client(), api.tokens)
        return client.post("/api/v1/devices", json=device("twin", fleet="raced"))

    answers = race(create_device)
    assert sorted(a.status_code for a in answers) == [201] + [409] * 7
    assert count_rows(app, "devices") == 1


def test_long_uris_are_414(api: Api) -> None:
    response = api.get("/api/v1/devices?tag=" + "a" * 4100)
    problem(response, 414, "uri")
    assert api.get("/api/v1/devices?tag=" + "a" * 60).status_code == 200


def test_bodies_over_the_route_limit_are_413(api: Api, app: Flask) -> None:
    @body_limit(64)
    def small() -> str:
        return "ok"

    @body_limit("BIG_UPLOAD_BYTES")
    def big() -> str:
        return "ok"

    app.config["BIG_UPLOAD_BYTES"] = 10_000
    app.add_url_rule("/test/small", "small", small, methods=["POST"])
    app.add_url_rule("/test/big", "big", big, methods=["POST"])
    assert route_body_limit(app, "small") == 64
    assert route_body_limit(app, "big") == 10_000
    assert route_body_limit(app, "devices.bulk_view") == app.config["MAX_CONTENT_LENGTH"]
    assert "64 bytes" in problem(app.test_client().post("/test/small", data=b"x" * 65), 413,
                                 "body")["detail"]
    assert app.test_client().post("/test/big", data=b"x" * 9000).status_code == 200
    problem(app.test_client().post("/test/big", data=b"x" * 10_001), 413, "body")
    app.config["MAX_CONTENT_LENGTH"] = 1000
    problem(api.post("/api/v1/devices/bulk", data="x" * 2000, content_type="application/json"),
            413, "body")
