"""The campaign and personalization pages in headless Chromium (Debian's, through
Playwright): an operator starts a campaign from the form and watches its progress bar reach
the end without reloading; the personalization page and a device's curve are drawn with the
stored numbers; a viewer gets no form. Screenshots go to var/test-artifacts/browser/.

No worker runs here (tasks wait in a Redis of their own): a thread plays the worker's and the
devices' part with the state machine's own functions (service.jobs). The whole system, with
the real worker, bridge and agents, is `tinyfleet demo --once` (test_stack_demo.py).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from werkzeug.serving import make_server

from device_agent import protocol as p
from firmware.targets import Cpu
from service.app import create_app
from service.auth import create_token
from service.dashboard.fit import ModelChoice, fit_report
from service.jobs import advance, set_state
from service.models import (
    AnalysisState,
    ClassPlan,
    DeploymentJob,
    Device,
    JobState,
    ModelKind,
    ModelVersion,
    Role,
    WorkState,
)
from service.personalization import record_metrics
from service.queue import celery_client
from tests.servers import RedisServer, wait_for
from tests.service.test_dashboard import Dash, register
from tests.service.test_dashboard_browser import ARTIFACTS, Watch, browser, login  # noqa: F401

pytestmark = [pytest.mark.integration, pytest.mark.browser]

MODEL = "0123456789abcdef"
LOADED_MACHINE_MS = 30_000  # generous waits: the suite runs on 2 shared cores


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path,
           redis_server: RedisServer) -> Iterator[tuple[str, Dash]]:
    """The app (a queue nobody consumes, one model version, 6 devices) behind a threaded
    WSGI server on a free loopback port."""
    root = tmp_path_factory.mktemp("campaign-browser")
    shutil.copy(sqlite_template, root / "tinyfleet.db")
    app = create_app({"DATABASE_URL": f"sqlite:///{root / 'tinyfleet.db'}",
                      "VAR_DIR": str(root / "var"), "AUTO_MIGRATE": False,
                      "SYNC_BROKER_FILES": False,
                      "REDIS_URL": redis_server.url.rsplit("/", 1)[0] + "/9"})
    session = app.extensions["tinyfleet.sessionmaker"]()
    tokens = {role: create_token(session, role, f"{role.value}-token")[1] for role in Role}
    session.add(ModelVersion(id=MODEL, name="kws", kind=ModelKind.ONNX, path="unused",
                             size_bytes=1, analysis_state=AnalysisState.NONE, info="{}"))
    session.commit()
    session.close()
    dash = Dash(app, tokens)
    register(dash, 6)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", dash
    finally:
        server.shutdown()
        app.extensions["tinyfleet.engine"].dispose()


def _finish_jobs(dash: Dash, stop: threading.Event) -> None:
    """Play the worker and the devices: each queued job installs (one failure with its
    reason), a batch at a time, through service.jobs' functions."""
    queue = celery_client(dash.app)

    def enqueue(name: str, args: list[Any]) -> None:
        queue.send_task(name, args=args)

    sessions = dash.app.extensions["tinyfleet.sessionmaker"]
    while not stop.is_set():
        with sessions() as session:
            jobs = list(session.scalars(select(DeploymentJob).where(
                DeploymentJob.state == JobState.QUEUED).order_by(DeploymentJob.id)))
            for number, job in enumerate(jobs):
                failed = job.id == 1
                set_state(session, job, JobState.FAILED if failed else JobState.INSTALLED,
                          "device", "self-test failed: output differs" if failed else None)
                if number == 0:
                    session.commit()
                    time.sleep(0.5)  # the page sees the bar move
            session.commit()
            for campaign in {j.campaign_id for j in jobs}:
                advance(session, campaign, enqueue)
        time.sleep(0.3)


def test_an_operator_starts_a_campaign_and_watches_it_finish(served: tuple[str, Dash],
                                                            browser: Any) -> None:  # noqa: F811
    base, dash = served
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context, page, watch = login(browser, base, dash.tokens[Role.OPERATOR])
    page.click("header nav >> text=Campaigns")
    page.wait_for_url(f"{base}/campaigns")
    page.select_option("select[name=model_version]", MODEL)
    page.fill("input[name=fleet]", "greenhouse")
    page.fill("input[name=canary_percent]", "34")
    page.fill("input[name=batch_size]", "2")
    page.fill("input[name=max_failure_percent]", "50")
    page.screenshot(path=str(ARTIFACTS / "campaigns.png"), full_page=True)
    stop = threading.Event()
    worker = threading.Thread(target=_finish_jobs, args=(dash, stop), daemon=True)
    page.click("#start-form button[type=submit]")
    page.wait_for_url(f"{base}/campaigns/1")
    assert page.is_visible("text=Campaign 1 started.")
    worker.start()
    try:
        page.wait_for_function(
            "() => document.getElementById('campaign-state').textContent === 'completed'",
            timeout=LOADED_MACHINE_MS)
    finally:
        stop.set()
        worker.join(10)
    assert page.get_attribute("#progress", "value") == "100"
    assert "6 of 6 jobs finished (100 %)" in page.inner_text("#progress-text")  # redrawn
    failed = page.locator("#outcomes tr[data-state=failed]")
    assert failed.count() == 1 and "self-test failed: output differs" in failed.inner_text()
    assert page.locator("#outcomes tr[data-state=installed]").count() == 5
    assert page.is_hidden("form[data-action=pause]") and page.is_visible(
        "form[data-action=rollback]")
    page.screenshot(path=str(ARTIFACTS / "campaign.png"), full_page=True)
    assert watch.problems == [], "\n".join(watch.problems)
    context.close()


def _report(round_: int, before: float, after: float) -> p.MetricsReport:
    return p.MetricsReport(round=round_, samples_used=40, accuracy_before=before,
                           accuracy_after=after, loss_before=1.4, loss_after=0.9,
                           loss_curve=(1.4, 1.1, 0.9), training_memory_bytes=61_440,
                           duration_s=3.0)


def test_personalization_charts_hold_the_reported_numbers(served: tuple[str, Dash],
                                                          browser: Any) -> None:  # noqa: F811
    base, dash = served
    sessions = dash.app.extensions["tinyfleet.sessionmaker"]
    with sessions() as session:
        devices = {d.name: d.id for d in session.scalars(select(Device))}
        for name, rounds in (("gh-000", [(0.40, 0.55), (0.55, 0.62)]),
                             ("gh-003", [(0.42, 0.50)]), ("gh-001", [(0.60, 0.58)])):
            for number, (before, after) in enumerate(rounds, start=1):
                record_metrics(session, devices[name], _report(number, before, after), MODEL)
    started = dash.api("POST", "/api/v1/campaigns", json={
        "model_version": MODEL, "selector": {"ids": ["gh-000"]}}).json
    with sessions() as session:  # what the worker and the device would record
        job = session.scalars(select(DeploymentJob).where(
            DeploymentJob.campaign_id == started["id"])).one()
        device = session.get(Device, job.device_id)
        assert device is not None
        report = fit_report(ModelChoice("mcunet-5fps"), device.sram_bytes, device.slot_bytes,
                            Cpu(device.cpu))
        session.add(ClassPlan(model_version_id=MODEL, hw_class=job.hw_class,
                              state=WorkState.DONE, result=json.dumps(
                                  {"config": {"name": "kws-r48"}, "memory": report})))
        set_state(session, job, JobState.INSTALLED, "device")
        session.commit()
    context, page, watch = login(browser, base, dash.tokens[Role.VIEWER])
    page.click("header nav >> text=Personalization")
    page.wait_for_selector("#gain-chart .main-svg", timeout=LOADED_MACHINE_MS)
    page.wait_for_selector("#distribution-chart .main-svg", timeout=LOADED_MACHINE_MS)
    gains = page.evaluate("""() => document.getElementById('gain-chart').data.map(
        t => [t.name, t.x, t.y.map(v => Math.round(v * 10) / 10)])""")
    assert gains == [[f"rp2040 / {MODEL}", [1], [-2.0]],
                     [f"stm32f746 / {MODEL}", [1, 2], [11.5, 7.0]]]
    bars = page.evaluate("""() => document.getElementById('distribution-chart').data.map(
        t => [t.name, t.y.reduce((a, b) => a + b, 0)])""")
    assert bars == [[f"rp2040 / {MODEL} (round 1)", 1], [f"stm32f746 / {MODEL} (round 2)", 1]]
    assert page.locator("#groups tbody tr").count() == 2
    page.screenshot(path=str(ARTIFACTS / "personalization.png"), full_page=True)
    # A device's curve: accuracy before and after each round, in percent.
    page.goto(f"{base}/devices/gh-000")
    page.wait_for_selector("#personalization-chart .main-svg", timeout=LOADED_MACHINE_MS)
    curve = page.evaluate("""() => document.getElementById('personalization-chart').data.map(
        t => [t.name, t.y.map(v => Math.round(v * 100) / 100)])""")
    assert curve == [["accuracy before", [40.0, 55.0]], ["accuracy after", [55.0, 62.0]],
                     ["loss after", [0.9, 0.9]]]
    assert wait_for(lambda: page.locator("#rounds tbody tr").count() == 2,
                    LOADED_MACHINE_MS / 1000)
    assert f"campaign {started['id']}" in page.inner_text("#jobs")  # its update history
    page.wait_for_selector("#installed-sram-chart .main-svg", timeout=LOADED_MACHINE_MS)
    installed = page.evaluate("""() => document.getElementById('installed-sram-chart').data.map(
        t => t.customdata[0])""")
    assert installed == [report["sram"][f"{part}_bytes"]
                         for part in ("arena", "scratch", "static", "stack", "training")]
    page.screenshot(path=str(ARTIFACTS / "device-personalization.png"), full_page=True)
    # A viewer gets no start form and no action buttons.
    page.goto(f"{base}/campaigns")
    assert page.locator("#start-form").count() == 0
    page.goto(f"{base}/campaigns/1")
    assert page.locator("#actions").count() == 0
    assert watch.problems == [], "\n".join(watch.problems)
    context.close()
