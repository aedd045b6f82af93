"""Credential rotation and Idempotency-Key, on SQLite and PostgreSQL, against a real
Mosquitto: a new password works, the old one is refused, a lost bulk answer is recovered
by retrying with its key (the devices once, their passwords rotated)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select, text, update

from service.app import create_app
from service.broker_sync import full_sync
from service.models import ApiToken, Device, Role
from service.mqtt_passwords import verify_password
from tests.mqtt_probe import connack
from tests.servers import MosquittoServer
from tests.service.conftest import Api, count_rows, fleet, make_tokens

pytestmark = pytest.mark.integration

@pytest.fixture
def app(db_url: str, tmp_path: Path, mosquitto_server: MosquittoServer) -> Iterator[Flask]:
    """The app on `db_url`, writing the broker files of a real Mosquitto."""
    files = mosquitto_server.files
    application = create_app({
        "DATABASE_URL": db_url, "VAR_DIR": str(tmp_path / "var"), "AUTO_MIGRATE": False,
        "BROKER_DIR": str(files.broker_dir), "MOSQUITTO_PID_FILE": str(files.pid_file),
        "MQTT_HOST": mosquitto_server.host, "MQTT_PORT": mosquitto_server.port})
    application.testing = True
    # As `tinyfleet up` does: the broker's base from this registry.
    full_sync(application.extensions["tinyfleet.engine"], mosquitto_server.target)
    yield application
    application.extensions["tinyfleet.engine"].dispose()


@pytest.fixture
def api(app: Flask) -> Api:
    return Api(app.test_client(), make_tokens(app))


def accepted(broker: MosquittoServer, username: str, password: str) -> bool:
    code = connack(broker.host, broker.port, username, password)
    return code is not None and not code.is_failure


def stored_hash(app: Flask, device_id: str) -> str | None:
    with app.extensions["tinyfleet.engine"].connect() as conn:
        return conn.execute(select(Device.mqtt_password_hash)
                            .where(Device.id == device_id)).scalar_one()


def rows(n: int, prefix: str = "b") -> list[dict[str, Any]]:
    return [{"name": f"{prefix}-{i}", "fleet": "greenhouse", "mcu": "rp2040",
             "tags": ["even" if i % 2 == 0 else "odd"]} for i in range(n)]


def test_rotate_one_device(api: Api, app: Flask, mosquitto_server: MosquittoServer) -> None:
    fleet(api)
    registered = api.post("/api/v1/devices", json=rows(1)[0]).json
    device_id, old = registered["mqtt"]["username"], registered["mqtt"]["password"]
    assert accepted(mosquitto_server, device_id, old)
    rotated = api.post(f"/api/v1/devices/{device_id}/credentials", role=Role.OPERATOR)
    assert rotated.status_code == 200, rotated.json
    new = rotated.json["mqtt"]["password"]
    assert new != old and rotated.json["device"]["id"] == device_id
    stored = stored_hash(app, device_id)
    assert stored and verify_password(new, stored) and not verify_password(old, stored)
    # At once: the broker has taken the change when the answer comes (no waiting).
    assert not accepted(mosquitto_server, device_id, old)
    assert accepted(mosquitto_server, device_id, new)
    # By name too; a viewer may not; a decommissioned device gets none.
    assert api.post("/api/v1/devices/b-0/credentials").status_code == 200
    assert api.post("/api/v1/devices/b-0/credentials", role=Role.VIEWER).status_code == 403
    assert api.call("DELETE", f"/api/v1/devices/{device_id}").status_code == 200
    gone = api.post(f"/api/v1/devices/{device_id}/credentials")
    assert gone.status_code == 409 and "decommissioned" in gone.json["detail"]
    assert stored_hash(app, device_id) is None


def test_rotate_a_selection(api: Api, app: Flask, mosquitto_server: MosquittoServer) -> None:
    fleet(api)
    bulk = api.post("/api/v1/devices/bulk", json={"devices": rows(6)}).json
    old = {d["id"]: d["mqtt_password"] for d in bulk["devices"]}
    answer = api.post("/api/v1/devices/credentials", json={"tag": ["even"]})
    assert answer.status_code == 200, answer.json
    body = answer.json
    assert body["count"] == 3 and body["replayed"] is False
    assert {d["name"] for d in body["devices"]} == {"b-0", "b-2", "b-4"}
    changed = {d["id"]: d["mqtt_password"] for d in body["devices"]}
    for device_id, password in old.items():
        stored = stored_hash(app, device_id) or ""
        assert verify_password(changed.get(device_id, password), stored)
        assert verify_password(password, stored) == (device_id not in changed)
    some = next(iter(changed))
    assert not accepted(mosquitto_server, some, old[some])
    assert accepted(mosquitto_server, some, changed[some])
    # By ids and names, in request order; unknown keys are 422 naming the row.
    answer = api.post("/api/v1/devices/credentials", json={"devices": ["b-5", some]}).json
    assert answer["devices"][0]["name"] == "b-5" and answer["count"] == 2
    bad = api.post("/api/v1/devices/credentials", json={"devices": ["b-1", "nope"]})
    assert bad.status_code == 422 and bad.json["errors"][0]["index"] == 1
    both = api.post("/api/v1/devices/credentials", json={"devices": ["b-1"], "fleet": "x"})
    assert both.status_code == 422
    none = api.post("/api/v1/devices/credentials", json={"fleet": "greenhouse", "mcu": "esp32s3"})
    assert none.status_code == 422 and "no active device" in none.json["detail"]


def test_a_lost_bulk_answer_is_recovered_with_its_key(api: Api, app: Flask,
                                                      mosquitto_server: MosquittoServer) -> None:
    fleet(api)
    body = {"devices": rows(5)}
    key = {"Idempotency-Key": "0f9c2a6e-bulk-1"}
    lost = api.post("/api/v1/devices/bulk", json=body, headers=key)
    assert lost.status_code == 201 and lost.json["replayed"] is False
    first = {d["id"]: d["mqtt_password"] for d in lost.json["devices"]}
    assert accepted(mosquitto_server, *next(iter(first.items())))
    # The answer never reached the client: it retries with the same key and body.
    retry = api.post("/api/v1/devices/bulk", json=body, headers=key)
    assert retry.status_code == 201, retry.json
    assert retry.json["replayed"] is True
    again = {d["id"]: d["mqtt_password"] for d in retry.json["devices"]}
    assert list(again) == list(first)  # the same devices, in the same order
    assert [d["name"] for d in retry.json["devices"]] == [r["name"] for r in body["devices"]]
    assert count_rows(app, "devices") == 5  # registered once
    for device_id, password in again.items():
        stored = stored_hash(app, device_id) or ""
        assert verify_password(password, stored) and not verify_password(first[device_id],
                                                                         stored)
    device_id = next(iter(first))
    assert not accepted(mosquitto_server, device_id, first[device_id])
    assert accepted(mosquitto_server, device_id, again[device_id])
    assert set(retry.json["fleet_signing_public_keys"]) == {"greenhouse"}
    # Passwords are never stored in clear: not in the key's row either.
    with app.extensions["tinyfleet.engine"].connect() as conn:
        kept = conn.execute(text("SELECT device_ids FROM idempotency_keys")).scalar_one()
    assert all(p not in kept for p in (*first.values(), *again.values()))
    # The same key with another body is 422; a failed request releases its key.
    other = api.post("/api/v1/devices/bulk", json={"devices": rows(1, "c")}, headers=key)
    assert other.status_code == 422 and other.json["errors"][0]["field"] == "Idempotency-Key"
    failing = {"devices": rows(1, "b")}  # b-0 is taken: 409, and the key is free again
    fresh = {"Idempotency-Key": "0f9c2a6e-bulk-2"}
    assert api.post("/api/v1/devices/bulk", json=failing, headers=fresh).status_code == 409
    assert api.post("/api/v1/devices/bulk", json={"devices": rows(1, "d")},
                    headers=fresh).status_code == 201
    bad_key = api.post("/api/v1/devices/bulk", json={"devices": rows(1, "e")},
                       headers={"Idempotency-Key": "x" * 300})
    assert bad_key.status_code == 422


def test_keys_expire_after_24_hours(api: Api, app: Flask) -> None:
    fleet(api)
    key = {"Idempotency-Key": "expiring"}
    assert api.post("/api/v1/devices/bulk", json={"devices": rows(1)},
                    headers=key).status_code == 201
    with app.extensions["tinyfleet.engine"].begin() as conn:
        conn.execute(text("UPDATE idempotency_keys SET created_at = :t"),
                     {"t": "2000-01-01 00:00:00"})
    # Forgotten: the same key now registers anew (and the name is taken: 409).
    again = api.post("/api/v1/devices/bulk", json={"devices": rows(1)}, headers=key)
    assert again.status_code == 409 and again.json["errors"][0]["field"] == "name"


def test_concurrent_duplicates_run_once(api: Api, app: Flask) -> None:
    fleet(api)
    body = {"devices": rows(200)}
    barrier = threading.Barrier(6)
    answers: list[Any] = [None] * 6

    def one(i: int) -> None:
        client = Api(app.test_client(), api.tokens)
        barrier.wait()
        answers[i] = client.post("/api/v1/devices/bulk", json=body,
                                 headers={"Idempotency-Key": "same-for-all"})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    statuses = sorted(a.status_code for a in answers)
    assert statuses.count(201) >= 1 and set(statuses) <= {201, 409}, statuses
    firsts = [a for a in answers if a.status_code == 201 and not a.json["replayed"]]
    assert len(firsts) == 1  # the work ran once; others waited (409) or got a replay
    for a in answers:
        if a.status_code == 409:
            assert a.json["errors"][0]["field"] == "Idempotency-Key"
            assert a.headers["Retry-After"]
    assert count_rows(app, "devices") == 200


def test_token_expiry(api: Api, app: Flask) -> None:
    created = api.post("/api/v1/tokens", json={"role": "viewer", "expires_in_s": 3600})
    assert created.status_code == 201, created.json
    token = created.json["token"]
    assert token["expires_at"] and token["expires_at"] > token["created_at"]
    headers = {"Authorization": f"Bearer {created.json['secret']}"}
    assert api.get("/api/v1/mcus", role=None, headers=headers).status_code == 200
    with app.extensions["tinyfleet.engine"].begin() as conn:
        conn.execute(update(ApiToken).where(ApiToken.id == token["id"]).values(
            expires_at=ApiToken.created_at))
    refused = api.get("/api/v1/mcus", role=None, headers=headers)
    assert refused.status_code == 401 and "expired" in refused.json["detail"]
    never = api.post("/api/v1/tokens", json={"role": "viewer"}).json["token"]
    assert never["expires_at"] is None
    for bad in (0, 59, 10**12, "3600", True):
        answer = api.post("/api/v1/tokens", json={"role": "viewer", "expires_in_s": bad})
        assert answer.status_code == 422 and answer.json["errors"][0]["field"] == "expires_in_s"
