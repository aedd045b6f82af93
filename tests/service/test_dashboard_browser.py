"""The dashboard in headless Chromium (Debian's `chromium`, driven by Playwright through its
`executable_path`; Playwright's own browser download is never used): log in, see the fleet
and its live update, open a device and see its charts drawn with the report's numbers, act
as an operator and not as a viewer; no Content-Security-Policy violation and no request to
another origin on the way. Screenshots of each page go to var/test-artifacts/browser/
(TINYFLEET_TEST_ARTIFACTS to change it)."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from werkzeug.serving import make_server

from service.models import Role
from tests.service.test_dashboard import Dash, make_dash, register

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("TINYFLEET_TEST_ARTIFACTS", "var/test-artifacts")) / "browser"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path
           ) -> Iterator[tuple[str, Dash]]:
    """The app behind a threaded WSGI server on a free loopback port; (base URL, dash)."""
    root = tmp_path_factory.mktemp("browser")
    shutil.copy(sqlite_template, root / "tinyfleet.db")
    dash = make_dash(f"sqlite:///{root / 'tinyfleet.db'}", root / "var")
    register(dash, 12)
    server = make_server("127.0.0.1", 0, dash.app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", dash
    finally:
        server.shutdown()
        dash.app.extensions["tinyfleet.engine"].dispose()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's chromium, headless."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (make setup installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM,
                                              args=["--no-sandbox", "--disable-gpu"])
        yield launched
        launched.close()


class Watch:
    """What a page did that it should not: console errors (CSP violations are reported
    there), uncaught exceptions, requests to another origin."""

    def __init__(self, page: Any, base: str) -> None:
        self.problems: list[str] = []
        page.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}")
                if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("request", lambda r: None if r.url.startswith((base, "data:"))
                else self.problems.append(f"request to {r.url}"))


def login(browser: Any, base: str, token: str) -> tuple[Any, Any, Watch]:
    """A new context and page, logged in through the form."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    watch = Watch(page, base)
    page.goto(f"{base}/fleet")
    assert page.url.startswith(f"{base}/login")
    page.fill("#token", token)
    page.click("form.login button[type=submit]")
    page.wait_for_url(f"{base}/fleet")
    return context, page, watch


def test_operator_sees_the_fleet_live_and_a_device_fit_drawn(served: tuple[str, Dash],
                                                            browser: Any) -> None:
    base, dash = served
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context, page, watch = login(browser, base, dash.tokens[Role.OPERATOR])
    rows = page.locator("#devices tbody tr")
    assert rows.count() == 12
    assert page.locator("#counts tbody tr").count() == 3
    page.screenshot(path=str(ARTIFACTS / "fleet.png"), full_page=True)
    # Live: a device registered elsewhere appears without a reload (polling with ETags).
    register(dash, 1, prefix="late", fleet="barn")
    page.wait_for_selector("#devices tbody >> text=late-000", timeout=10_000)
    assert "updated" in page.inner_text("#live-status") or \
        "up to date" in page.inner_text("#live-status")
    # A device: its charts drawn from its memory report.
    page.click("#devices tbody >> text=gh-001")  # an RP2040
    page.wait_for_url(f"{base}/devices/*")
    page.goto(page.url + "?model=mcunet-5fps&classes=10")
    page.wait_for_selector("#sram-chart .main-svg")
    page.wait_for_selector("#flash-chart .main-svg")
    drawn = page.evaluate("""() => ['sram-chart', 'flash-chart'].map(id =>
        document.getElementById(id).data.map(t => [t.name, t.customdata[0]]))""")
    report = page.evaluate("""url => fetch(url).then(r => r.json())""",
                           page.get_attribute("#fit-charts", "data-fit-url"))
    sram, flash = drawn
    assert sram == [[name, report["sram"][f"{name}_bytes"]]
                    for name in ("arena", "scratch", "static", "stack", "training")]
    assert flash == [["weights", report["weights_bytes"]], ["code", report["code_bytes"]]]
    assert page.locator("#sram-chart g.point").count() >= 4  # the bars exist in the SVG
    page.screenshot(path=str(ARTIFACTS / "device.png"), full_page=True)
    # An operator acts: the tags form.
    page.fill("#tags", "roof door")
    page.click("form.tags button[type=submit]")
    page.wait_for_selector("text=Tags of gh-001 saved.")
    assert page.inner_text("dd[data-key=tags]") == "door roof"
    # Log out.
    page.click("header form button[type=submit]")
    page.wait_for_url(f"{base}/login")
    assert watch.problems == [], "\n".join(watch.problems)
    context.close()


def test_a_viewer_reads_but_cannot_act(served: tuple[str, Dash], browser: Any) -> None:
    base, dash = served
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context, page, watch = login(browser, base, dash.tokens[Role.VIEWER])
    page.goto(f"{base}/devices/gh-002")
    assert page.locator("form.tags").count() == 0
    page.wait_for_selector("#sram-chart .main-svg")
    assert watch.problems == [], "\n".join(watch.problems)
    # Even a hand-made POST with a valid CSRF token is refused (the console says so).
    status = page.evaluate("""async () => {
        const body = new URLSearchParams({tags: 'x',
            csrf_token: document.querySelector('input[name=csrf_token]').value});
        const r = await fetch('/devices/gh-002/tags', {method: 'POST', body: body});
        return r.status; }""")
    assert status == 403
    assert [p for p in watch.problems if "403 (FORBIDDEN)" not in p] == []
    watch.problems.clear()
    page.screenshot(path=str(ARTIFACTS / "device-viewer.png"), full_page=True)
    page.goto(f"{base}/login")
    page.screenshot(path=str(ARTIFACTS / "login.png"))
    assert watch.problems == [], "\n".join(watch.problems)
    context.close()
