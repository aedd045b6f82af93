"""Models, campaigns and jobs over the API on SQLite and PostgreSQL: registration, the
selector snapshot, rollout batches, operator actions, and every bad input answered 4xx
problem+json with nothing written. (No worker here: tasks wait in a Redis of their own.)"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from service.app import create_app
from service.models import Role
from tests.servers import RedisServer
from tests.service.conftest import Api, count_rows, fleet, make_tokens

pytestmark = pytest.mark.integration

PROBLEM = "application/problem+json"
OTA_TABLES = ("model_versions", "campaigns", "deployment_jobs", "job_events")


@pytest.fixture
def ota_app(db_url: str, tmp_path: Path, redis_server: RedisServer) -> Iterator[Flask]:
    """The app with a task queue nobody consumes (Redis database 7)."""
    application = create_app({"DATABASE_URL": db_url, "VAR_DIR": str(tmp_path / "var"),
                              "AUTO_MIGRATE": False, "MQTT_PORT": 18883,
                              "REDIS_URL": redis_server.url.rsplit("/", 1)[0] + "/7",
                              "MODEL_UPLOAD_MAX_BYTES": 8 * 1024 * 1024})
    application.testing = True
    yield application
    application.extensions["tinyfleet.engine"].dispose()


@pytest.fixture
def ota(ota_app: Flask) -> Api:
    """A client with a token of every role."""
    return Api(ota_app.test_client(), make_tokens(ota_app))


def counts(app: Flask) -> dict[str, int]:
    """Rows of the OTA tables."""
    return {t: count_rows(app, t) for t in OTA_TABLES}


def problem(response: Any, status: int, field: str) -> dict[str, Any]:
    """A problem+json response with `status` whose errors name `field`."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == PROBLEM
    body = dict(response.json)
    assert field in [e["field"] for e in body["errors"]], body
    return body


def register_family(api: Api, family: Path) -> dict[str, Any]:
    """The family registered by server path, without queueing its analysis."""
    response = api.post("/api/v1/models", json={"name": "digits", "path": str(family),
                                                "analyze": False})
    assert response.status_code in (200, 201), response.json
    return dict(response.json["model"])


def tar_of(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    """A .tar.gz with these files (and symlinks)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buffer.getvalue()


def upload(api: Api, data: bytes, filename: str, name: str = "digits") -> Any:
    """POST a multipart upload."""
    return api.post("/api/v1/models", data={"name": name, "analyze": "false",
                                            "file": (io.BytesIO(data), filename)},
                    content_type="multipart/form-data")


def test_a_family_registers_once_by_path_or_archive_and_is_immutable(
        ota: Api, ota_app: Flask, digits_family: Path) -> None:
    first = ota.post("/api/v1/models", json={"name": "digits", "path": str(digits_family),
                                             "analyze": False})
    assert first.status_code == 201 and first.json["created"] is True
    model = first.json["model"]
    assert model["kind"] == "family" and len(model["id"]) == 16
    assert model["analysis"] == "none" and model["info"]["resolutions"] == [16, 24]
    again = ota.post("/api/v1/models", json={"name": "other", "path": str(digits_family)})
    assert again.status_code == 200 and again.json["created"] is False
    assert again.json["model"]["name"] == "digits"  # content-addressed: the first stays
    archive = tar_of({f"fam/{n}": (digits_family / n).read_bytes()
                      for n in ("family.json", "supernet.pt")})
    uploaded = upload(ota, archive, "fam.tar.gz")
    assert uploaded.status_code == 200 and uploaded.json["model"]["id"] == model["id"]
    assert [m["id"] for m in ota.get("/api/v1/models", role=Role.VIEWER).json["items"]] == [
        model["id"]]
    assert ota.get(f"/api/v1/models/{model['id']}").json["id"] == model["id"]
    problem(ota.get("/api/v1/models/0123456789abcdef"), 404, "id")
    stored = Path(ota_app.config["VAR_DIR"]) / "models" / model["id"] / "family"
    assert sorted(p.name for p in stored.iterdir()) == ["family.json", "supernet.pt"]


def test_bad_model_registrations_are_refused_and_write_nothing(
        ota: Api, ota_app: Flask, digits_family: Path, tmp_path: Path) -> None:
    before = counts(ota_app)
    family = {n: (digits_family / n).read_bytes() for n in ("family.json", "supernet.pt")}
    problem(upload(ota, tar_of({"../evil": b"x", **family}), "a.tgz"), 422, "file")
    problem(upload(ota, tar_of({"/etc/evil": b"x"}), "a.tgz"), 422, "file")
    problem(upload(ota, tar_of(family, links={"link": "/etc/passwd"}), "a.tgz"), 422, "file")
    problem(upload(ota, b"definitely not an archive" * 10, "a.tar.gz"), 422, "file")
    problem(upload(ota, b"not onnx", "m.onnx"), 422, "file")
    problem(upload(ota, tar_of({"readme.txt": b"hi"}), "a.tgz"), 422, "file")
    tampered = dict(family, **{"supernet.pt": family["supernet.pt"] + b"\0"})
    problem(upload(ota, tar_of(tampered), "a.tgz"), 422, "file")
    problem(upload(ota, b"x" * (9 * 1024 * 1024), "big.tgz"), 413, "body")
    problem(upload(ota, tar_of(family), "a.tgz", name="no spaces please"), 422, "name")
    response = ota.post("/api/v1/models", data={"name": "x"},
                        content_type="multipart/form-data")
    problem(response, 422, "file")
    problem(ota.post("/api/v1/models", json={"name": "x", "path": "relative/dir"}), 422,
            "path")
    problem(ota.post("/api/v1/models", json={"name": "x", "path": str(tmp_path / "nope")}),
            422, "path")
    problem(ota.post("/api/v1/models", json={"name": "x", "path": str(digits_family),
                                             "extra": 1}), 422, "extra")
    problem(ota.post("/api/v1/models", role=Role.OPERATOR,
                     json={"name": "x", "path": str(digits_family)}), 403, "path")
    problem(ota.post("/api/v1/models", role=Role.VIEWER,
                     json={"name": "x", "path": str(digits_family)}), 403, "Authorization")
    assert counts(ota_app) == before
    assert not (tmp_path / "evil").exists()
    models_dir = Path(ota_app.config["VAR_DIR"]) / "models"
    assert [p.name for p in models_dir.iterdir()] == []  # no staging left behind


def _devices(api: Api) -> dict[str, list[str]]:
    """Two fleets: 4 x stm32f746 + 2 x rp2040 in 'north', 2 x stm32f412 in 'south'."""
    fleet(api, "north")
    fleet(api, "south")
    rows = ([{"name": f"n-f746-{i}", "fleet": "north", "mcu": "stm32f746", "tags": ["lab"]}
             for i in range(4)]
            + [{"name": f"n-rp-{i}", "fleet": "north", "mcu": "rp2040"} for i in range(2)]
            + [{"name": f"s-f412-{i}", "fleet": "south", "mcu": "stm32f412", "tags": ["lab"]}
               for i in range(2)])
    response = api.post("/api/v1/devices/bulk", json={"devices": rows})
    assert response.status_code == 201, response.json
    ids: dict[str, list[str]] = {}
    for row in response.json["devices"]:
        ids.setdefault(row["fleet"], []).append(row["id"])
    return ids


def test_a_campaign_snapshots_its_selector_into_batches_and_skips_busy_devices(
        ota: Api, ota_app: Flask, digits_family: Path) -> None:
    ids = _devices(ota)
    model = register_family(ota, digits_family)
    body = {"model_version": model["id"], "selector": {"fleet": "north"},
            "policy": {"canary_percent": 20, "batch_size": 2, "max_failure_percent": 50}}
    created = ota.post("/api/v1/campaigns", json=body, role=Role.OPERATOR)
    assert created.status_code == 201, created.json
    c = created.json
    assert c["state"] == "running" and c["jobs"] == 6
    # 20 % of 6 rounds up to a canary of 2; then batches of 2; the canary is released.
    assert c["batch_count"] == 3 and c["current_batch"] == 0
    assert c["counts"] == {"pending": 4, "queued": 2}
    jobs = ota.get(f"/api/v1/jobs?campaign={c['id']}&limit=4").json
    assert len(jobs["items"]) == 4 and jobs["next_cursor"] == jobs["items"][-1]["id"]
    rest = ota.get(f"/api/v1/jobs?campaign={c['id']}&cursor={jobs['next_cursor']}").json
    assert rest["next_cursor"] is None and len(rest["items"]) == 2
    every = jobs["items"] + rest["items"]
    assert {j["device"] for j in every} == set(ids["north"])
    assert {j["hw_class"] for j in every} == {"cortex-m7-sram327680-slot507904-infer",
                                              "cortex-m0plus-sram270336-slot1032192-infer"}
    first = ota.get(f"/api/v1/jobs/{every[0]['id']}").json
    assert [e["state"] for e in first["events"]] == ["pending", "queued"]
    # A second campaign over the lab tag: the four north devices are busy, skipped.
    second = ota.post("/api/v1/campaigns", json={
        "model_version": model["id"], "selector": {"tags": ["lab"]}}).json
    assert second["jobs"] == 6 and second["counts"]["skipped"] == 4
    skipped = ota.get(f"/api/v1/jobs?campaign={second['id']}&state=skipped").json["items"]
    assert {j["reason"] for j in skipped} == {f"already in active campaign {c['id']}"}
    # Everything selected is busy now: 422, nothing written.
    before = counts(ota_app)
    problem(ota.post("/api/v1/campaigns", json={"model_version": model["id"],
                                                "selector": {"tags": ["lab"]}}), 422,
            "selector")
    assert counts(ota_app) == before


def test_operator_actions_follow_the_campaign_state(ota: Api, digits_family: Path) -> None:
    _devices(ota)
    model = register_family(ota, digits_family)
    c = ota.post("/api/v1/campaigns", json={"model_version": model["id"],
                                            "selector": {"fleet": "south"}}).json
    url = f"/api/v1/campaigns/{c['id']}"
    problem(ota.post(f"{url}/resume"), 409, "state")
    assert ota.post(f"{url}/pause").json["state"] == "paused"
    problem(ota.post(f"{url}/pause"), 409, "state")
    problem(ota.post(f"{url}/close"), 409, "state")
    assert ota.post(f"{url}/resume").json["state"] == "running"
    problem(ota.post(f"{url}/pause", role=Role.VIEWER), 403, "Authorization")
    aborted = ota.post(f"{url}/abort").json
    assert aborted["state"] == "aborted" and set(aborted["counts"]) == {"aborted"}
    problem(ota.post(f"{url}/abort"), 409, "state")
    rolled = ota.post(f"{url}/rollback").json  # nothing was installed: nothing to send
    assert rolled["state"] == "rolled-back"
    problem(ota.post(f"{url}/rollback"), 409, "state")
    problem(ota.get("/api/v1/campaigns/999"), 404, "id")
    listed = ota.get("/api/v1/campaigns?state=rolled-back", role=Role.VIEWER).json["items"]
    assert [x["id"] for x in listed] == [c["id"]]


@pytest.mark.parametrize(("body", "field"), [
    ({"selector": {"fleet": "north"}}, "model_version"),
    ({"model_version": "xyz", "selector": {"fleet": "north"}}, "model_version"),
    ({"model_version": "0123456789abcdef", "selector": {"fleet": "north"}}, "model_version"),
    ({"model_version": "MODEL", "selector": {}}, "selector"),
    ({"model_version": "MODEL", "selector": {"fleet": "nowhere"}}, "selector.fleet"),
    ({"model_version": "MODEL", "selector": {"mcu": "esp8266"}}, "selector.mcu"),
    ({"model_version": "MODEL", "selector": {"ids": ["dev-00000000000000ff"]}},
     "selector.ids[0]"),
    ({"model_version": "MODEL", "selector": {"fleet": "north", "mcu": "stm32h743"}},
     "selector"),
    ({"model_version": "MODEL", "selector": {"fleet": "north"},
      "policy": {"canary_percent": 150}}, "policy.canary_percent"),
    ({"model_version": "MODEL", "selector": {"fleet": "north"},
      "policy": {"batch_size": 0}}, "policy.batch_size"),
    ({"model_version": "MODEL", "selector": {"fleet": "north"},
      "policy": {"max_failure_percent": "ten"}}, "policy.max_failure_percent"),
    ({"model_version": "MODEL", "selector": {"fleet": "north"},
      "policy": {"offer_deadline_s": 0}}, "policy.offer_deadline_s"),
    ({"model_version": "MODEL", "selector": {"fleet": "north"},
      "policy": {"start_at": "tomorrow"}}, "policy.start_at"),
    ({"model_version": "MODEL", "selector": {"fleet": "north"},
      "policy": {"start_at": "2030-01-01T00:00:00"}}, "policy.start_at"),
    ({"model_version": "MODEL", "selector": {"fleet": "north"},
      "policy": {"personalize": True}}, "policy.personalize"),
    ({"model_version": "MODEL", "selector": {"fleet": "north"}, "rollout": {}}, "rollout"),
])
def test_bad_campaigns_are_422_and_write_nothing(ota: Api, ota_app: Flask,
                                                 digits_family: Path, body: dict[str, Any],
                                                 field: str) -> None:
    _devices(ota)
    model = register_family(ota, digits_family)
    if body.get("model_version") == "MODEL":
        body = dict(body, model_version=model["id"])
    before = counts(ota_app)
    problem(ota.post("/api/v1/campaigns", json=body), 422, field)
    assert counts(ota_app) == before


def test_bad_job_queries_and_bodies_are_problems(ota: Api) -> None:
    problem(ota.get("/api/v1/jobs?limit=0"), 422, "limit")
    problem(ota.get("/api/v1/jobs?state=exploded"), 422, "state")
    problem(ota.get("/api/v1/jobs?device=bob"), 422, "device")
    problem(ota.get("/api/v1/jobs/12345"), 404, "id")
    problem(ota.post("/api/v1/campaigns", data="{", content_type="application/json"), 400,
            "body")
    problem(ota.post("/api/v1/campaigns", data="x", content_type="text/plain"), 415,
            "Content-Type")
