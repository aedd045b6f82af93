"""Bearer tokens and roles on every /api/v1 route; the token API; the OpenAPI document."""

from __future__ import annotations

import re

import pytest
from flask import Flask

from service.auth import hash_token
from service.models import Role
from service.schemas import DeviceBulkCreate, DeviceCreate, DeviceQuery, FleetCreate
from tests.service.conftest import Api, count_rows, fleet

pytestmark = pytest.mark.integration

# (method, path, the lowest role allowed). Every /api/v1 route must be listed here
# (test_every_route_is_in_the_matrix checks it against the app's URL map).
MATRIX: list[tuple[str, str, Role]] = [
    ("GET", "/api/v1/mcus", Role.VIEWER),
    ("GET", "/api/v1/mcus/stm32f412", Role.VIEWER),
    ("GET", "/api/v1/fleets", Role.VIEWER),
    ("POST", "/api/v1/fleets", Role.OPERATOR),
    ("GET", "/api/v1/fleets/greenhouse", Role.VIEWER),
    ("GET", "/api/v1/devices", Role.VIEWER),
    ("POST", "/api/v1/devices", Role.OPERATOR),
    ("POST", "/api/v1/devices/bulk", Role.OPERATOR),
    ("GET", "/api/v1/devices/gh-1", Role.VIEWER),
    ("PATCH", "/api/v1/devices/gh-1", Role.OPERATOR),
    ("POST", "/api/v1/devices/gh-1/credentials", Role.OPERATOR),
    ("POST", "/api/v1/devices/credentials", Role.OPERATOR),
    ("DELETE", "/api/v1/devices/gh-1", Role.ADMIN),
    ("GET", "/api/v1/devices/gh-1/metrics", Role.VIEWER),
    ("POST", "/api/v1/devices/gh-1/personalize", Role.OPERATOR),
    ("GET", "/api/v1/personalization", Role.VIEWER),
    ("GET", "/api/v1/tokens", Role.ADMIN),
    ("POST", "/api/v1/tokens", Role.ADMIN),
    ("DELETE", "/api/v1/tokens/1", Role.ADMIN),
    ("GET", "/api/v1/openapi.json", Role.VIEWER),
]
# OTA routes: their success needs a model, devices and a queue (tests/service/
# test_api_campaigns.py); here, who may reach them.
OTA_MATRIX: list[tuple[str, str, Role]] = [
    ("GET", "/api/v1/models", Role.VIEWER),
    ("POST", "/api/v1/models", Role.OPERATOR),
    ("GET", "/api/v1/models/1", Role.VIEWER),
    ("GET", "/api/v1/campaigns", Role.VIEWER),
    ("POST", "/api/v1/campaigns", Role.OPERATOR),
    ("GET", "/api/v1/campaigns/1", Role.VIEWER),
    *[("POST", f"/api/v1/campaigns/1/{action}", Role.OPERATOR)
      for action in ("pause", "resume", "abort", "close", "rollback")],
    ("GET", "/api/v1/jobs", Role.VIEWER),
    ("GET", "/api/v1/jobs/1", Role.VIEWER),
]

BODIES = {
    ("POST", "/api/v1/fleets"): {"name": "north"},
    ("POST", "/api/v1/devices"): {"name": "gh-2", "fleet": "greenhouse", "mcu": "rp2040"},
    ("POST", "/api/v1/devices/bulk"): {"devices": [{"name": "gh-3", "fleet": "greenhouse",
                                                    "mcu": "rp2040"}]},
    ("PATCH", "/api/v1/devices/gh-1"): {"tags": ["x"]},
    ("POST", "/api/v1/devices/credentials"): {"devices": ["gh-1"]},
    ("POST", "/api/v1/devices/gh-1/personalize"): {},
    ("POST", "/api/v1/tokens"): {"role": "viewer"},
}


def test_every_route_is_in_the_matrix(app: Flask) -> None:
    listed = {(m, re.sub(r"/(stm32f412|greenhouse|gh-1|1)"
                         r"(/credentials|/metrics|/personalize|/pause|/resume|/abort|/close"
                         r"|/rollback)?$", r"/<>\2", p))
              for m, p, _ in MATRIX + OTA_MATRIX}
    routes = {(m, re.sub(r"<[^>]+>", "<>", rule.rule)) for rule in app.url_map.iter_rules()
              if rule.rule.startswith("/api/v1") for m in rule.methods or ()
              if m not in ("HEAD", "OPTIONS")}
    assert routes == listed


@pytest.mark.parametrize(("method", "path", "needed"), MATRIX,
                         ids=[f"{m} {p}" for m, p, _ in MATRIX])
def test_role_matrix(api: Api, app: Flask, method: str, path: str, needed: Role) -> None:
    fleet(api)
    assert api.post("/api/v1/devices", json={"name": "gh-1", "fleet": "greenhouse",
                                             "mcu": "stm32f412"}).status_code == 201
    body = BODIES.get((method, path))
    rows_before = count_rows(app, "devices"), count_rows(app, "fleets")
    response = api.call(method, path, role=None, json=body)
    assert response.status_code == 401 and response.mimetype == "application/problem+json"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    for role in Role:
        if role.allows(needed):
            continue
        response = api.call(method, path, role=role, json=body)
        assert response.status_code == 403, (role, response.json)
        assert needed.value in response.json["detail"]
    assert (count_rows(app, "devices"), count_rows(app, "fleets")) == rows_before
    response = api.call(method, path, role=needed, json=body)
    if path.endswith("/personalize"):  # enqueues a task: no queue in this app (503)
        assert response.status_code == 503, response.json
        return
    assert response.status_code in (200, 201), response.json


@pytest.mark.parametrize(("method", "path", "needed"), OTA_MATRIX,
                         ids=[f"{m} {p}" for m, p, _ in OTA_MATRIX])
def test_ota_role_matrix(api: Api, method: str, path: str, needed: Role) -> None:
    assert api.call(method, path, role=None).status_code == 401
    for role in Role:
        status = api.call(method, path, role=role).status_code
        if role.allows(needed):
            assert status not in (401, 403), (role, status)
        else:
            assert status == 403, (role, status)


@pytest.mark.parametrize("header", ["", "Bearer", "Basic abc", "Bearer tf_not-a-token",
                                    "token tf_x"])
def test_bad_authorization_headers(api: Api, header: str) -> None:
    response = api.get("/api/v1/mcus", role=None, headers={"Authorization": header})
    assert response.status_code == 401
    assert response.json["errors"][0]["field"] == "Authorization"


def test_token_api_and_revocation(api: Api, app: Flask) -> None:
    created = api.post("/api/v1/tokens", json={"role": "operator", "name": "ci"})
    assert created.status_code == 201
    secret, token = created.json["secret"], created.json["token"]
    assert token["role"] == "operator" and secret.startswith(token["prefix"])
    listing = api.get("/api/v1/tokens").json["items"]
    assert secret not in str(listing) and hash_token(secret) not in str(listing)
    headers = {"Authorization": f"Bearer {secret}"}
    assert api.get("/api/v1/devices", role=None, headers=headers).status_code == 200
    assert api.post("/api/v1/tokens", role=None, headers=headers,
                    json={"role": "admin"}).status_code == 403
    revoked = api.call("DELETE", f"/api/v1/tokens/{token['id']}")
    assert revoked.status_code == 200 and revoked.json["revoked_at"]
    response = api.get("/api/v1/devices", role=None, headers=headers)
    assert response.status_code == 401 and "revoked" in response.json["detail"]
    assert api.call("DELETE", "/api/v1/tokens/999").status_code == 404
    bad = api.post("/api/v1/tokens", json={"role": "root"})
    assert bad.status_code == 422 and bad.json["errors"][0]["field"] == "role"
    assert count_rows(app, "api_tokens") == 4  # 3 fixtures + "ci"


def test_openapi_covers_every_route_from_the_validating_schemas(api: Api, app: Flask) -> None:
    doc = api.get("/api/v1/openapi.json").json
    assert doc["openapi"].startswith("3.1")
    for method, path, needed in MATRIX:
        templ = re.sub(r"/(stm32f412|greenhouse|gh-1)(/credentials|/metrics|/personalize)?$",
                       r"/{key}\2", path)
        templ = re.sub(r"/mcus/\{key\}$", "/mcus/{name}", templ)
        templ = re.sub(r"/fleets/\{key\}$", "/fleets/{name}", templ)
        templ = re.sub(r"/tokens/1$", "/tokens/{token_id}", templ)
        op = doc["paths"][templ][method.lower()]
        assert needed.value in op["description"]
        assert {"401", "403"} <= set(op["responses"])
    schemas = doc["components"]["schemas"]
    for cls in (DeviceCreate, DeviceBulkCreate, FleetCreate):
        assert set(schemas[cls.__name__]["properties"]) == set(cls.model_fields)
    assert set(schemas["DeviceCreate"]["required"]) == {"name", "fleet"}
    params = {p["name"] for p in doc["paths"]["/api/v1/devices"]["get"]["parameters"]}
    assert params == set(DeviceQuery.model_fields)
    refs = set(re.findall(r"#/components/schemas/(\w+)", str(doc)))
    assert refs <= set(schemas)
    post = doc["paths"]["/api/v1/devices"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/DeviceCreate")
    assert "application/problem+json" in post["responses"]["422"]["content"]
