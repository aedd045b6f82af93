"""The dashboard's campaign and personalization pages through Flask's test client: starting
a campaign from the form (tasks wait in a Redis of their own: no worker), progress and each
device's outcome with its reason, operator actions and their refusals, viewers refused;
the fleet's gain per round from stored metrics; the fleet list's model and presence."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select, update

from device_agent import protocol as p
from service.app import create_app
from service.auth import create_token
from service.dashboard.personalization import gain_by_round
from service.models import (
    AnalysisState,
    DeploymentJob,
    Device,
    JobState,
    ModelKind,
    ModelVersion,
    Role,
)
from service.personalization import record_metrics
from tests.servers import RedisServer
from tests.service.test_dashboard import Dash, register

pytestmark = pytest.mark.integration

MODEL = "0123456789abcdef"


@pytest.fixture
def dash(tmp_path: Path, sqlite_template: Path, redis_server: RedisServer) -> Iterator[Dash]:
    """The app on a fresh SQLite database, a queue nobody consumes, one fixed model version."""
    path = tmp_path / "tinyfleet.db"
    shutil.copy(sqlite_template, path)
    app = create_app({"DATABASE_URL": f"sqlite:///{path}", "VAR_DIR": str(tmp_path / "var"),
                      "AUTO_MIGRATE": False, "SYNC_BROKER_FILES": False,
                      "REDIS_URL": redis_server.url.rsplit("/", 1)[0] + "/8"})
    app.testing = True
    session = app.extensions["tinyfleet.sessionmaker"]()
    tokens = {role: create_token(session, role, f"{role.value}-token")[1] for role in Role}
    session.add(ModelVersion(id=MODEL, name="kws", kind=ModelKind.ONNX, path="unused",
                             size_bytes=1, analysis_state=AnalysisState.NONE, info="{}"))
    session.commit()
    session.close()
    made = Dash(app, tokens)
    yield made
    app.extensions["tinyfleet.engine"].dispose()


def start_form(**fields: str) -> dict[str, str]:
    """The start form's fields (the page's defaults, then `fields`)."""
    return {"model_version": MODEL, "canary_percent": "0", "batch_size": "100",
            "max_failure_percent": "50", **fields}


def test_an_operator_starts_a_campaign_from_the_form_and_watches_it(dash: Dash) -> None:
    register(dash, 6)
    operator = dash.browser(Role.OPERATOR)
    page = operator.get("/campaigns")
    assert page.status_code == 200 and 'id="start-form"' in page.text and MODEL in page.text
    started = operator.submit("/campaigns", "/campaigns", start_form(tags="even"))
    assert started.status_code == 303, started.text
    campaign_id = int(started.headers["Location"].rsplit("/", 1)[1])
    shown = operator.get(f"/campaigns/{campaign_id}")
    assert shown.status_code == 200 and "Campaign 1 started." in shown.text
    assert shown.text.count('<tr data-state="queued">') == 3  # the even devices, batch 0
    assert "0 of 3 jobs finished" in shown.text
    # The devices report: one installed, one failed with its reason.
    session = dash.app.extensions["tinyfleet.sessionmaker"]()
    jobs = list(session.scalars(select(DeploymentJob).order_by(DeploymentJob.id)))
    session.execute(update(DeploymentJob).where(DeploymentJob.id == jobs[0].id)
                    .values(state=JobState.INSTALLED))
    session.execute(update(DeploymentJob).where(DeploymentJob.id == jobs[1].id)
                    .values(state=JobState.FAILED, reason="needs 301 kB SRAM, has 256 kB"))
    session.commit()
    session.close()
    polled = operator.get(f"/campaigns/{campaign_id}/data").json
    assert polled["campaign"]["finished"] == 2 and polled["campaign"]["percent"] == 66.7
    assert [o["state"] for o in polled["outcomes"]] == ["installed", "failed", "queued"]
    assert polled["outcomes"][1]["reason"] == "needs 301 kB SRAM, has 256 kB"
    assert {o["name"] for o in polled["outcomes"]} == {"gh-000", "gh-002", "gh-004"}
    assert polled["campaign"]["actions"] == ["pause", "abort", "rollback"]
    listed = operator.get("/campaigns/data").json["items"]
    assert [(c["id"], c["finished"], c["jobs"]) for c in listed] == [(campaign_id, 2, 3)]
    page = operator.get(f"/campaigns/{campaign_id}").text
    assert "needs 301 kB SRAM, has 256 kB" in page and "2 of 3 jobs finished (66.7 %)" in page
    # pause, a refused resume-twice, resume, abort
    for action, state in (("pause", "paused"), ("resume", "running"), ("abort", "aborted")):
        done = operator.submit(f"/campaigns/{campaign_id}",
                               f"/campaigns/{campaign_id}/{action}", {})
        assert done.status_code == 303
        assert operator.get(f"/campaigns/{campaign_id}/data").json["campaign"]["state"] == state
    refused = operator.submit(f"/campaigns/{campaign_id}", f"/campaigns/{campaign_id}/pause", {})
    assert refused.status_code == 303
    again = operator.get(f"/campaigns/{campaign_id}").text
    assert "Pause refused: campaign 1 is aborted: pause needs it running, scheduled" in again
    assert operator.get(f"/campaigns/{campaign_id}/data").json["campaign"]["actions"] == [
        "rollback"]


def test_bad_start_forms_are_refused_naming_the_field_and_start_nothing(dash: Dash) -> None:
    register(dash, 2)
    operator = dash.browser(Role.OPERATOR)
    for fields, says in (({}, "selector"), ({"tags": "even", "canary_percent": "150"},
                                           "policy.canary_percent"),
                         ({"tags": "even", "model_version": "fedcba9876543210"},
                          "no model version"), ({"fleet": "nowhere"}, "no fleet")):
        answer = operator.submit("/campaigns", "/campaigns", start_form(**fields))
        assert answer.status_code in (400, 422), (fields, answer.status_code)
        assert says in answer.text, (fields, answer.text[:2000])
    assert operator.get("/campaigns/data").json["items"] == []
    missing = operator.submit("/campaigns", "/campaigns/1/pause", {})
    assert missing.status_code == 404 and "no campaign 1" in missing.text
    assert operator.get("/campaigns/999").status_code == 404
    assert operator.submit("/campaigns", "/campaigns/1/explode", {}).status_code == 404


def test_a_viewer_reads_campaigns_but_cannot_start_or_act(dash: Dash) -> None:
    register(dash, 2)
    operator = dash.browser(Role.OPERATOR)
    operator.submit("/campaigns", "/campaigns", start_form(tags="even"))
    viewer = dash.browser(Role.VIEWER)
    page = viewer.get("/campaigns")
    assert page.status_code == 200 and 'id="start-form"' not in page.text
    assert 'data-action="pause"' not in viewer.get("/campaigns/1").text
    html = viewer.get("/campaigns/1").text
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html)
    assert token  # the logout form's
    for path in ("/campaigns", "/campaigns/1/abort"):
        refused = viewer.post(path, data={**start_form(tags="odd"), "csrf_token": token[1]})
        assert refused.status_code == 403 and "needs an operator token" in refused.text
    assert viewer.get("/campaigns/1/data").json["campaign"]["state"] == "running"
    assert len(viewer.get("/campaigns/data").json["items"]) == 1
    assert dash.browser().get("/campaigns/1/data").status_code == 401


def _report(round_: int, before: float, after: float) -> p.MetricsReport:
    return p.MetricsReport(round=round_, samples_used=40, accuracy_before=before,
                           accuracy_after=after, loss_before=1.5, loss_after=1.1,
                           loss_curve=(1.5, 1.3, 1.1), training_memory_bytes=60_000,
                           duration_s=2.0)


def test_personalization_shows_the_gain_per_round_by_class_and_no_raw_data(dash: Dash) -> None:
    register(dash, 4)
    session = dash.app.extensions["tinyfleet.sessionmaker"]()
    devices = {d.name: d for d in session.scalars(select(Device))}
    for name, gains in (("gh-000", [(0.5, 0.6), (0.6, 0.65)]), ("gh-003", [(0.5, 0.56)]),
                        ("gh-001", [(0.7, 0.66)])):
        for number, (before, after) in enumerate(gains, start=1):
            record_metrics(session, devices[name].id, _report(number, before, after), "v1")
    rounds = gain_by_round(session)
    session.close()
    by = {(r["mcu"], r["round"]): r for r in rounds}
    # gh-000 and gh-003 are stm32f746 (MCUs in turn over 3), gh-001 an rp2040
    first = by[("stm32f746", 1)]
    assert first["devices"] == 2 and first["mean_gain"] == pytest.approx(0.08)
    assert first["bins"] == {"0.06": 1, "0.10": 1}
    assert by[("rp2040", 1)]["bins"] == {"-0.04": 1}  # a loss lands below zero
    assert by[("stm32f746", 2)]["devices"] == 1
    viewer = dash.browser(Role.VIEWER)
    page = viewer.get("/personalization")
    assert page.status_code == 200 and 'id="gain-chart"' in page.text
    assert ">7.0 %<" in page.text  # stm32f746: mean gain of (10, 5, 6) points
    data = viewer.get("/personalization/data").json
    assert {g["mcu"] for g in data["groups"]} == {"stm32f746", "rp2040"}
    device = devices["gh-000"].id
    history = viewer.get(f"/devices/{device}/history").json
    assert [r["round"] for r in history["personalization"]] == [1, 2]
    allowed = {"round", "model_version", "samples_used", "accuracy_before", "accuracy_after",
               "accuracy_gain", "loss_before", "loss_after", "loss_curve",
               "training_memory_bytes", "duration_s", "kept", "received_at"}
    assert set(history["personalization"][0]) <= allowed  # numbers only
    assert history["jobs"] == []


def test_the_fleet_list_shows_the_installed_model_and_presence(dash: Dash) -> None:
    register(dash, 3)
    session = dash.app.extensions["tinyfleet.sessionmaker"]()
    names = {d.name: d.id for d in session.scalars(select(Device))}
    seen = datetime(2026, 5, 4, 3, 2, tzinfo=UTC)
    session.execute(update(Device).where(Device.name == "gh-000")
                    .values(online=True, installed_model_version=MODEL, last_seen_at=seen))
    session.execute(update(Device).where(Device.name == "gh-001")
                    .values(online=False, last_seen_at=seen))
    session.commit()
    session.close()
    viewer = dash.browser(Role.VIEWER)
    rows = {r["name"]: r for r in viewer.get("/fleet/data").json["items"]}
    assert (rows["gh-000"]["model"], rows["gh-000"]["presence"]) == (MODEL, "online")
    assert rows["gh-001"]["presence"] == "offline, last seen 2026-05-04 03:02 UTC"
    assert (rows["gh-002"]["model"], rows["gh-002"]["presence"]) == ("none", "never seen")
    page = viewer.get("/fleet").text
    assert "Installed model" in page and "offline, last seen 2026-05-04 03:02 UTC" in page
    device = viewer.get(f"/devices/{names['gh-000']}").text
    assert MODEL in device and ">online<" in device
    assert viewer.get(f"/devices/{names['gh-000']}/data").json["presence"] == "online"
    api = dash.app.test_client().get(
        "/api/v1/devices", headers={"Authorization": f"Bearer {dash.tokens[Role.VIEWER]}"})
    assert "presence" not in api.json["items"][0]  # the API's schema is unchanged


def test_metrics_show_jobs_campaign_progress_online_devices_and_the_bridge(dash: Dash) -> None:
    from prometheus_client import CollectorRegistry, start_http_server

    from service.stack.config import free_port
    from tests.service.test_metrics_logs import samples
    from workers.bridge import BridgeMetrics

    register(dash, 4)
    operator = dash.browser(Role.OPERATOR)
    operator.submit("/campaigns", "/campaigns", start_form(tags="even"))
    session = dash.app.extensions["tinyfleet.sessionmaker"]()
    first = session.scalars(select(DeploymentJob).order_by(DeploymentJob.id)).first()
    assert first is not None
    session.execute(update(DeploymentJob).where(DeploymentJob.id == first.id)
                    .values(state=JobState.INSTALLED))
    session.execute(update(Device).where(Device.name == "gh-000").values(online=True))
    session.commit()
    session.close()
    # The bridge's own registry, exported as workers.bridge's main does.
    bridge = BridgeMetrics(CollectorRegistry())
    bridge.rejected.labels("metrics", "schema").inc(3)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=bridge.registry)
    viewer = {"Authorization": f"Bearer {dash.tokens[Role.VIEWER]}"}
    client = dash.app.test_client()
    try:
        dash.app.config["BRIDGE_METRICS_PORT"] = port
        got = samples(client.get("/metrics", headers=viewer).text)
        server.shutdown()
        server.server_close()
        thread.join(5)
        down = samples(client.get("/metrics", headers=viewer).text)
    finally:
        dash.app.config["BRIDGE_METRICS_PORT"] = 0
    assert got[("tinyfleet_jobs", (("state", "installed"),))] == 1
    assert got[("tinyfleet_jobs", (("state", "queued"),))] == 1
    assert got[("tinyfleet_campaign_progress_ratio", (("campaign", "1"),))] == 0.5
    assert got[("tinyfleet_campaign_jobs", (("campaign", "1"), ("state", "queued")))] == 1
    assert got[("tinyfleet_devices_online", (("mcu", "stm32f746"),))] == 1
    assert got[("tinyfleet_bridge_rejected_total",
                (("channel", "metrics"), ("kind", "schema")))] == 3
    assert got[("tinyfleet_bridge_up", ())] == 1
    assert down[("tinyfleet_bridge_up", ())] == 0  # the scrape still answers
    assert ("tinyfleet_jobs", (("state", "installed"),)) in down


def test_a_device_page_shows_its_installed_build_with_the_search_picks_numbers(
        dash: Dash) -> None:
    import html
    import json

    from firmware.targets import Cpu
    from service.dashboard.fit import ModelChoice, fit_report
    from service.models import ClassBuild, ClassPlan, WorkState

    register(dash, 1)
    operator = dash.browser(Role.OPERATOR)
    operator.submit("/campaigns", "/campaigns", start_form(tags="even"))
    session = dash.app.extensions["tinyfleet.sessionmaker"]()
    job = session.scalars(select(DeploymentJob)).one()
    device = session.get(Device, job.device_id)
    assert device is not None
    # A search pick's memory report has the fit report's keys (service.dashboard.fit).
    report = fit_report(ModelChoice("mcunet-5fps"), device.sram_bytes, device.slot_bytes,
                        Cpu(device.cpu))
    session.add(ClassPlan(model_version_id=MODEL, hw_class=job.hw_class, state=WorkState.DONE,
                          result=json.dumps({"config": {"name": "kws-r48-w0.5"},
                                             "memory": report})))
    session.add(ClassBuild(model_version_id=MODEL, hw_class=job.hw_class, state=WorkState.DONE,
                           emulated=True, manifest=json.dumps({"memory": {
                               "predicted": {"sram_bytes": 10_240, "flash_bytes": 204_800},
                               "measured": {"sram_bytes": 10_035, "flash_bytes": 204_000}}})))
    job.state, job.emulated = JobState.INSTALLED, True
    session.commit()
    device_id = device.id
    session.close()
    page = operator.get(f"/devices/{device_id}").text
    assert "<h2>Installed model</h2>" in page and "kws-r48-w0.5" in page
    assert "SRAM 10.0 kB predicted, 9.8 kB measured in QEMU" in page
    drawn = re.search(r"data-report='([^']+)'", page)
    assert drawn and json.loads(html.unescape(drawn[1]))["sram"] == report["sram"]
    # A device nothing was installed on has no such section.
    register(dash, 2, prefix="other")
    with dash.app.extensions["tinyfleet.sessionmaker"]() as s:
        other = s.scalars(select(Device.id).where(Device.name == "other-001")).one()
    assert "<h2>Installed model</h2>" not in operator.get(f"/devices/{other}").text
