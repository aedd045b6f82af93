"""The dashboard through Flask's test client: login and logout, roles, CSRF, security
headers on every page, no external origin anywhere, paging and search, ETags, the fit report."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from flask import Flask

from firmware.frontend.builtin import build_graph, builtin_config
from firmware.plan.account import fit_schedule
from firmware.targets import CATALOG
from service.app import create_app
from service.auth import create_token
from service.dashboard.blueprint import CSP
from service.dashboard.session import COOKIE_NAME
from service.models import ApiToken, Role, utcnow
from tests.service.dashboard_client import Browser, csrf_token

pytestmark = pytest.mark.integration

MCUS = ("stm32f746", "rp2040", "nrf52840")


@dataclass
class Dash:
    """The app, a token of each role, and an API header per role."""

    app: Flask
    tokens: dict[Role, str]

    def browser(self, role: Role | None = None) -> Browser:
        """A new browser, logged in as `role` (None: not logged in)."""
        browser = Browser(self.app.test_client())
        if role is not None:
            assert browser.login(self.tokens[role]).status_code == 303
        return browser

    def api(self, method: str, path: str, role: Role = Role.ADMIN, **kw: Any) -> Any:
        """An API call with a bearer token."""
        response = self.app.test_client().open(
            path, method=method, headers={"Authorization": f"Bearer {self.tokens[role]}"}, **kw)
        assert response.status_code < 300, response.json
        return response


def make_dash(url: str, var: Path) -> Dash:
    """The app on `url` with one token of each role."""
    app = create_app({"DATABASE_URL": url, "VAR_DIR": str(var), "AUTO_MIGRATE": False,
                      "SYNC_BROKER_FILES": False})
    app.testing = True
    session = app.extensions["tinyfleet.sessionmaker"]()
    tokens = {role: create_token(session, role, f"{role.value}-token")[1] for role in Role}
    session.commit()
    session.close()
    return Dash(app, tokens)


def register(dash: Dash, count: int, prefix: str = "gh", fleet: str = "greenhouse") -> None:
    """`count` devices named prefix-000..., MCUs in turn, tagged even/odd."""
    if fleet not in {f["name"] for f in dash.api("GET", "/api/v1/fleets").json["items"]}:
        dash.api("POST", "/api/v1/fleets", json={"name": fleet})
    rows = [{"name": f"{prefix}-{i:03d}", "fleet": fleet, "mcu": MCUS[i % len(MCUS)],
             "tags": ["even" if i % 2 == 0 else "odd"]} for i in range(count)]
    dash.api("POST", "/api/v1/devices/bulk", json={"devices": rows})


@pytest.fixture
def dash(tmp_path: Path, sqlite_template: Path) -> Iterator[Dash]:
    """The app on a fresh SQLite database."""
    path = tmp_path / "tinyfleet.db"
    shutil.copy(sqlite_template, path)
    made = make_dash(f"sqlite:///{path}", tmp_path / "var")
    yield made
    made.app.extensions["tinyfleet.engine"].dispose()


@pytest.fixture
def dash_both(db_url: str, tmp_path: Path) -> Iterator[Dash]:
    """The app on SQLite and on PostgreSQL."""
    made = make_dash(db_url, tmp_path / "var")
    yield made
    made.app.extensions["tinyfleet.engine"].dispose()


# ---- login, logout, the session cookie ------------------------------------------------------

def test_pages_need_a_login_and_keep_where_they_were_going(dash: Dash) -> None:
    browser = dash.browser()
    response = browser.get("/fleet?mcu=rp2040")
    assert response.status_code == 302
    assert response.headers["Location"] == "/login?next=/fleet?mcu%3Drp2040"
    # Scripts' data endpoints answer 401 problem+json instead of a redirect.
    data = browser.get("/fleet/data")
    assert (data.status_code, data.mimetype) == (401, "application/problem+json")
    form = browser.get("/login?next=/fleet?mcu%3Drp2040")
    done = browser.post("/login?next=/fleet?mcu%3Drp2040",
                        data={"token": dash.tokens[Role.VIEWER],
                              "csrf_token": csrf_token(form.text)})
    assert (done.status_code, done.headers["Location"]) == (303, "/fleet?mcu=rp2040")


@pytest.mark.parametrize("target", ["https://evil.example/x", "//evil.example/x",
                                    "/\\evil.example", "javascript:alert(1)"])
def test_login_never_redirects_to_another_origin(dash: Dash, target: str) -> None:
    browser = dash.browser()
    form = browser.get("/login")
    done = browser.post("/login", query_string={"next": target},
                        data={"token": dash.tokens[Role.VIEWER],
                              "csrf_token": csrf_token(form.text)})
    assert (done.status_code, done.headers["Location"]) == (303, "/fleet")


def test_login_sets_a_safe_cookie_and_logout_ends_the_session(dash: Dash) -> None:
    browser = dash.browser()
    response = browser.login(dash.tokens[Role.VIEWER])
    assert response.status_code == 303
    cookie = next(c for c in response.headers.getlist("Set-Cookie")
                  if c.startswith(COOKIE_NAME + "="))
    attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
    assert {"httponly", "path", "samesite"} <= attributes and "secure" not in attributes
    assert "SameSite=Lax" in cookie
    assert dash.tokens[Role.VIEWER] not in cookie  # the secret is never in the cookie
    page = browser.get("/fleet")
    assert page.status_code == 200 and "viewer-token (viewer)" in page.text
    out = browser.submit("/fleet", "/logout", {})
    assert (out.status_code, out.headers["Location"]) == (303, "/login")
    assert browser.get("/fleet").status_code == 302


def test_the_cookie_is_secure_over_tls(dash: Dash) -> None:
    client = dash.app.test_client()
    form = client.get("/login", base_url="https://localhost")
    response = client.post("/login", base_url="https://localhost",
                           headers={"Referer": "https://localhost/login"},
                           data={"token": dash.tokens[Role.VIEWER],
                                 "csrf_token": csrf_token(form.text)})
    assert response.status_code == 303, response.text
    cookie = next(c for c in response.headers.getlist("Set-Cookie")
                  if c.startswith(COOKIE_NAME + "="))
    assert "Secure" in cookie and "HttpOnly" in cookie


@pytest.mark.parametrize("token", ["", "tf_not-a-token", "x" * 300])
def test_a_bad_token_is_refused_with_the_reason(dash: Dash, token: str) -> None:
    browser = dash.browser()
    response = browser.login(token)
    assert response.status_code == 401
    assert ("unknown API token" in response.text or "token:" in response.text)
    assert browser.get("/fleet").status_code == 302


def test_revoking_or_expiring_the_token_ends_its_sessions(dash: Dash) -> None:
    browser = dash.browser(Role.OPERATOR)
    assert browser.get("/fleet").status_code == 200
    session = dash.app.extensions["tinyfleet.sessionmaker"]()
    token = session.query(ApiToken).filter_by(name="operator-token").one()
    token.revoked_at = utcnow()
    session.commit()
    assert browser.get("/fleet").status_code == 302
    assert browser.login(dash.tokens[Role.OPERATOR]).status_code == 401
    # An expired token: the same.
    viewer = dash.browser(Role.VIEWER)
    token = session.query(ApiToken).filter_by(name="viewer-token").one()
    token.expires_at = utcnow()
    session.commit()
    session.close()
    assert viewer.get("/fleet").status_code == 302


# ---- roles and CSRF ------------------------------------------------------------------------

def test_a_viewer_cannot_act_an_operator_can(dash: Dash) -> None:
    register(dash, 3)
    viewer, operator = dash.browser(Role.VIEWER), dash.browser(Role.OPERATOR)
    page = viewer.get("/devices/gh-001")
    assert page.status_code == 200 and "Save tags" not in page.text
    refused = viewer.submit("/devices/gh-001", "/devices/gh-001/tags", {"tags": "roof"})
    assert refused.status_code == 403 and "operator" in refused.text
    assert dash.api("GET", "/api/v1/devices/gh-001").json["tags"] == ["odd"]
    assert "Save tags" in operator.get("/devices/gh-001").text
    done = operator.submit("/devices/gh-001", "/devices/gh-001/tags", {"tags": "roof, door"})
    assert done.status_code == 303
    assert dash.api("GET", "/api/v1/devices/gh-001").json["tags"] == ["door", "roof"]
    assert "Tags of gh-001 saved." in operator.get(done.headers["Location"]).text


def test_bad_tags_are_refused_naming_the_field(dash: Dash) -> None:
    register(dash, 2)
    operator = dash.browser(Role.OPERATOR)
    response = operator.submit("/devices/gh-001", "/devices/gh-001/tags", {"tags": "b@d"})
    assert response.status_code == 422 and "tags" in response.text
    assert dash.api("GET", "/api/v1/devices/gh-001").json["tags"] == ["odd"]


@pytest.mark.parametrize("csrf", [None, "", "forged-token"])
def test_forms_without_a_valid_csrf_token_are_refused(dash: Dash, csrf: str | None) -> None:
    register(dash, 2)
    operator = dash.browser(Role.OPERATOR)
    extra = {} if csrf is None else {"csrf_token": csrf}
    tags = operator.post("/devices/gh-001/tags", data={"tags": "roof", **extra})
    assert tags.status_code == 400 and "CSRF" in tags.text
    assert dash.api("GET", "/api/v1/devices/gh-001").json["tags"] == ["odd"]
    out = operator.post("/logout", data=extra)
    assert out.status_code == 400
    assert operator.get("/fleet").status_code == 200  # still logged in
    login = dash.browser().post("/login", data={"token": dash.tokens[Role.VIEWER], **extra})
    assert login.status_code == 400


def test_a_token_from_another_session_is_refused(dash: Dash) -> None:
    register(dash, 2)
    mine, theirs = dash.browser(Role.OPERATOR), dash.browser(Role.OPERATOR)
    their_token = csrf_token(theirs.get("/devices/gh-001").text)
    response = mine.post("/devices/gh-001/tags", data={"tags": "roof",
                                                       "csrf_token": their_token})
    assert response.status_code == 400


def test_the_api_needs_no_csrf_token(dash: Dash) -> None:
    response = dash.api("POST", "/api/v1/fleets", Role.OPERATOR, json={"name": "north"})
    assert response.status_code == 201


# ---- headers and origins on every page ------------------------------------------------------

def _pages(dash: Dash) -> list[str]:
    device_id = dash.api("GET", "/api/v1/devices/gh-001").json["id"]
    return ["/login", "/fleet", "/fleet?q=gh-00&limit=25", "/fleet?mcu=nope",
            f"/devices/{device_id}", "/devices/gh-002?model=mobilenetv2&width=1.4",
            "/devices/gh-002?width=9", "/devices/no-such-device", "/fleet/data",
            f"/devices/{device_id}/data", f"/devices/{device_id}/fit",
            f"/devices/{device_id}/history", "/campaigns", "/campaigns/data",
            "/campaigns/999", "/personalization", "/personalization/data",
            "/dashboard/static/dashboard.css", "/dashboard/static/fleet.js",
            "/dashboard/plotly-0.min.js", "/metrics", "/api/v1/mcus", "/no-such-page"]


def test_every_response_carries_the_csp_and_security_headers(dash: Dash) -> None:
    register(dash, 3)
    browser = dash.browser(Role.VIEWER)
    for path in _pages(dash):
        response = browser.get(path)
        csp = response.headers.get("Content-Security-Policy", "")
        assert csp == CSP, path
        assert "script-src 'self'" in csp and "unsafe-eval" not in csp
        script_src = next(d for d in csp.split("; ") if d.startswith("script-src"))
        assert script_src == "script-src 'self'", path
        assert response.headers["X-Content-Type-Options"] == "nosniff", path
    assert "frame-ancestors 'none'" in CSP and "object-src 'none'" in CSP


class _References(HTMLParser):
    """Every URL a page refers to: src, href, action, srcset, CSS url(); inline scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0
        self.inline_handlers: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for name in ("src", "href", "action", "formaction", "poster", "data", "background"):
            if values.get(name) is not None:
                self.urls.append(str(values[name]))
        for part in (values.get("srcset") or "").split(","):
            if part.strip():
                self.urls.append(part.split()[0])
        self.urls += re.findall(r"url\(\s*['\"]?([^'\")]+)", values.get("style") or "")
        self.inline_handlers += [n for n in values if n.startswith("on")]
        if tag == "script":
            self._in_script = "src" not in values
        if tag == "style":
            self.inline_scripts += 1  # a <style> element is inline too: CSP would drop it

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False


def test_no_page_refers_to_another_origin_or_inlines_script(dash: Dash) -> None:
    register(dash, 3)
    browser = dash.browser(Role.OPERATOR)
    checked = 0
    for path in _pages(dash):
        response = browser.get(path)
        if response.mimetype == "text/html":
            refs = _References()
            refs.feed(response.text)
            external = [u for u in refs.urls if urlsplit(u).scheme or urlsplit(u).netloc]
            assert not external, (path, external)
            assert refs.inline_scripts == 0 and not refs.inline_handlers, path
            checked += 1
            for url in refs.urls:  # our own scripts and styles: no other origin either
                if url.startswith("/dashboard/static/") and url.endswith((".js", ".css")):
                    text = browser.get(url).text
                    assert not re.search(r"https?://|url\(\s*['\"]?//", text), url
    assert checked >= 8


def test_plotly_is_served_from_the_installed_package(dash: Dash) -> None:
    from importlib import resources

    installed = resources.files("plotly").joinpath("package_data/plotly.min.js").read_bytes()
    browser = dash.browser(Role.VIEWER)
    register(dash, 1)
    page = browser.get("/devices/gh-000").text
    (script,) = re.findall(r'src="(/dashboard/plotly-[^"]+)"', page)
    plain = browser.get(script)
    assert plain.status_code == 200 and plain.data == installed
    assert plain.mimetype == "text/javascript" and "immutable" in plain.headers["Cache-Control"]
    zipped = browser.get(script, headers={"Accept-Encoding": "gzip"})
    import gzip

    assert zipped.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(zipped.data) == installed
    again = browser.get(script, headers={"Accept-Encoding": "gzip",
                                         "If-None-Match": zipped.headers["ETag"]})
    assert again.status_code == 304 and again.data == b""
    assert not list(Path("service/dashboard/static").glob("*plotly*"))  # never a copied bundle


# ---- fleet: paging, search, counts, ETags -------------------------------------------------

def _walk(browser: Browser, query: str) -> list[str]:
    names: list[str] = []
    cursor = None
    for _ in range(20):
        response = browser.get(f"/fleet/data?{query}" + (f"&cursor={cursor}" if cursor else ""))
        assert response.status_code == 200, response.json
        names += [item["name"] for item in response.json["items"]]
        cursor = response.json["next_cursor"]
        if cursor is None:
            return names
    raise AssertionError("the walk did not end")


def test_fleet_pages_walk_every_device_once(dash_both: Dash) -> None:
    register(dash_both, 60)
    register(dash_both, 5, prefix="barn", fleet="barn")
    browser = dash_both.browser(Role.VIEWER)
    everything = dash_both.api("GET", "/api/v1/devices?limit=1000").json["items"]
    by_id = [d["name"] for d in sorted(everything, key=lambda d: d["id"])]
    assert _walk(browser, "limit=25") == by_id
    # Filters: the API's, the same devices in the same order.
    assert _walk(browser, "limit=25&mcu=rp2040&fleet=greenhouse&tag=even") == [
        d["name"] for d in sorted(everything, key=lambda d: d["id"])
        if d["mcu"] == "rp2040" and d["fleet"] == "greenhouse" and "even" in d["tags"]]
    # Search: names by prefix, in name order, paged by name.
    assert _walk(browser, "q=gh-0&limit=25") == [f"gh-{i:03d}" for i in range(60)]
    assert _walk(browser, "q=gh-01&limit=25&tag=odd") == [f"gh-{i:03d}" for i in range(11, 20, 2)]
    assert _walk(browser, "q=barn&limit=25&mcu=stm32f746") == ["barn-000", "barn-003"]
    assert _walk(browser, "q=gh-1") == []
    device_id = everything[0]["id"]
    assert _walk(browser, f"q={device_id}") == [everything[0]["name"]]


def test_fleet_page_shows_counts_by_mcu_and_state(dash: Dash) -> None:
    register(dash, 9)
    dash.api("DELETE", "/api/v1/devices/gh-000")
    browser = dash.browser(Role.VIEWER)
    doc = browser.get("/fleet/data").json
    assert doc["counts"] == [
        {"mcu": "nrf52840", "by_state": {"active": 3, "decommissioned": 0}, "total": 3},
        {"mcu": "rp2040", "by_state": {"active": 3, "decommissioned": 0}, "total": 3},
        {"mcu": "stm32f746", "by_state": {"active": 2, "decommissioned": 1}, "total": 3}]
    assert [c["key"] for c in doc["columns"]][:4] == ["name", "id", "fleet", "mcu"]
    page = browser.get("/fleet").text
    assert re.search(r"<td>stm32f746</td><td class=\"num\">2</td><td class=\"num\">1</td>"
                     r"<td class=\"num\">3</td>", page)
    # No column shows data that does not exist yet (presence, installed model).
    assert "online" not in page.lower() and "model version" not in page.lower()


@pytest.mark.parametrize(("query", "field"), [
    ("q=a%20b", "q"), ("limit=7", "limit"), ("mcu=z80", "mcu"), ("state=gone", "state"),
    ("tag=b@d", "tag"), ("cursor=nope", "cursor"), ("fleet=nowhere", "fleet")])
def test_bad_filters_are_refused_naming_the_field(dash: Dash, query: str, field: str) -> None:
    browser = dash.browser(Role.VIEWER)
    data = browser.get(f"/fleet/data?{query}")
    assert data.status_code == 422 and data.mimetype == "application/problem+json"
    assert field in {e["field"] for e in data.json["errors"]}
    page = browser.get(f"/fleet?{query}")
    assert page.status_code == 422 and f"{field}:" in page.text


def test_polling_gets_304_until_something_changes(dash: Dash) -> None:
    register(dash, 3)
    browser = dash.browser(Role.VIEWER)
    for path in ("/fleet/data?limit=25", "/devices/gh-001/data"):
        first = browser.get(path)
        etag = first.headers["ETag"]
        assert first.status_code == 200 and first.headers["Cache-Control"] == "private, no-cache"
        same = browser.get(path, headers={"If-None-Match": etag})
        assert same.status_code == 304 and same.data == b""
        dash.api("PATCH", "/api/v1/devices/gh-001", json={"tags": [f"t{len(etag)}", path[1:3]]})
        changed = browser.get(path, headers={"If-None-Match": etag})
        assert changed.status_code == 200 and changed.headers["ETag"] != etag


# ---- device page: facts and the fit ---------------------------------------------------------

def test_device_page_shows_facts_and_the_fit_of_the_one_account(dash: Dash) -> None:
    register(dash, 2)
    browser = dash.browser(Role.VIEWER)
    device = dash.api("GET", "/api/v1/devices/gh-001").json  # an RP2040
    choice = "model=mcunet-5fps&classes=10"
    page = browser.get(f"/devices/{device['id']}?{choice}")
    assert page.status_code == 200
    for fact in (device["id"], "greenhouse", "rp2040", "cortex-m0plus", "264.0 kB"):
        assert fact in page.text
    report = browser.get(f"/devices/{device['id']}/fit?{choice}").json
    target = CATALOG["rp2040"]
    config = builtin_config("mcunet-5fps", num_classes=10)
    fit = fit_schedule(build_graph(config, with_weights=False),
                       target.sram_bytes, target.cpu)
    assert report["sram"] == fit.account.to_dict()
    assert report["sram_bytes"] == target.sram_bytes == device["sram_bytes"]
    assert report["slot_bytes"] == device["slot_bytes"]
    assert report["flash_bytes"] == report["weights_bytes"] + report["code_bytes"]
    assert report["fits"] == {"sram": True, "flash": True} and report["why_not"] == []
    assert f'<td class="num">{fit.account.arena_bytes}</td>' in page.text
    assert "It fits." in page.text


def test_a_model_too_big_says_why_with_the_numbers(dash: Dash) -> None:
    dash.api("POST", "/api/v1/fleets", json={"name": "tiny"})
    dash.api("POST", "/api/v1/devices", json={"name": "small-1", "fleet": "tiny",
                                              "sram_bytes": "64KiB", "flash_bytes": "256KiB",
                                              "cpu": "cortex-m4"})
    browser = dash.browser(Role.VIEWER)
    report = browser.get("/devices/small-1/fit?model=mobilenetv2&width=1.0").json
    assert report["fits"] == {"sram": False, "flash": False}
    sram_why, flash_why = report["why_not"]
    assert "64.0 kB" in sram_why and "needs" in sram_why
    assert "firmware slot has 112.0 kB" in flash_why
    assert report["sram"]["total_bytes"] > 64 * 1024
    assert "It does not fit." in browser.get("/devices/small-1?model=mobilenetv2").text


@pytest.mark.parametrize(("query", "field"), [
    ("model=resnet", "model"), ("width=0.6", "width"), ("width=abc", "width"),
    ("resolution=8", "resolution"), ("classes=1", "classes"),
    ("model=mcunet-5fps&width=0.5", "model")])
def test_bad_model_choices_are_refused_naming_the_field(dash: Dash, query: str,
                                                        field: str) -> None:
    register(dash, 1)
    browser = dash.browser(Role.VIEWER)
    data = browser.get(f"/devices/gh-000/fit?{query}")
    assert data.status_code == 422 and field in {e["field"] for e in data.json["errors"]}
    assert browser.get(f"/devices/gh-000?{query}").status_code == 422


def test_an_unknown_device_is_a_404_page(dash: Dash) -> None:
    browser = dash.browser(Role.VIEWER)
    page = browser.get("/devices/nope")
    assert page.status_code == 404 and "no device" in page.text.lower()
    assert page.mimetype == "text/html"
    data = browser.get("/devices/nope/data")
    assert (data.status_code, data.mimetype) == (404, "application/problem+json")


@pytest.fixture
def dash_pg(postgres_url: str, tmp_path: Path) -> Iterator[Dash]:
    """The app on PostgreSQL alone (emptied afterwards)."""
    from sqlalchemy import text

    from tests.service.conftest import TABLES

    made = make_dash(postgres_url, tmp_path / "var")
    yield made
    with made.app.extensions["tinyfleet.engine"].begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    made.app.extensions["tinyfleet.engine"].dispose()


def test_search_under_a_linguistic_collation_walks_in_name_order(dash_pg: Dash) -> None:
    # PostgreSQL in a non-C locale orders names by more than bytes: the search then checks
    # each name exactly instead of trusting a range. The test server runs in the C locale
    # (detected as byte-wise); the other branch is forced here and must find the same.
    from service.dashboard import fleet as fleet_module

    engine = dash_pg.app.extensions["tinyfleet.engine"]
    register(dash_pg, 30)
    browser = dash_pg.browser(Role.VIEWER)
    key = str(engine.url)
    assert _walk(browser, "q=gh-01&limit=25") == [f"gh-{i:03d}" for i in range(10, 20)]
    assert fleet_module._COLLATION[key] is True
    fleet_module._COLLATION[key] = False
    try:
        assert _walk(browser, "q=gh-01&limit=25") == [f"gh-{i:03d}" for i in range(10, 20)]
        assert _walk(browser, "q=gh-0&limit=25&tag=even") == [
            f"gh-{i:03d}" for i in range(0, 30, 2)]
    finally:
        del fleet_module._COLLATION[key]


def test_sqlite_search_walks_the_name_index(dash: Dash) -> None:
    # SQLite has no statistics here: its plan is the same at 10 devices as at 100,000.
    from sqlalchemy import text

    from service.dashboard.fleet import FleetQuery, _name_walk
    from service.device_list import device_filters
    from service.models import DeviceState

    session = dash.app.extensions["tinyfleet.sessionmaker"]()
    captured: list[str] = []
    original = session.execute

    def capture(statement: Any, *args: Any, **kwargs: Any) -> Any:
        if hasattr(statement, "compile") and "ORDER BY devices.name" in str(statement):
            captured.append(str(statement.compile(dialect=session.get_bind().dialect,
                                                  compile_kwargs={"literal_binds": True})))
        return original(statement, *args, **kwargs)

    session.execute = capture  # type: ignore[method-assign]
    for query in (FleetQuery(q="d-12"), FleetQuery(q="d-5", mcu="rp2040", tags=("even",)),
                  FleetQuery(q="d-5", state=DeviceState.ACTIVE, cursor="d-5123")):
        _name_walk(session, query, device_filters(session, query.fleet, query.mcu,
                                                  query.state))
    session.execute = original  # type: ignore[method-assign]
    for sql in captured:
        plan = " | ".join(str(row[-1]) for row in session.execute(
            text("EXPLAIN QUERY PLAN " + sql)))
        # The unique index on name (SQLite names it sqlite_autoindex_devices_<n>).
        assert re.search(r"SEARCH devices USING INDEX sqlite_autoindex_devices_\d "
                         r"\(name>\? AND name<\?\)", plan), plan
        assert "TEMP B-TREE" not in plan, plan
    assert len(captured) == 3
    session.close()


def test_counts_are_shared_for_two_seconds_then_fresh(dash: Dash) -> None:
    from service.dashboard.fleet import counts_by_mcu

    register(dash, 3)
    session = dash.app.extensions["tinyfleet.sessionmaker"]()
    first = counts_by_mcu(session, None)
    register(dash, 3, prefix="more")
    assert counts_by_mcu(session, None) is first  # within the poll interval: shared
    fresh = counts_by_mcu(session, None, max_age_s=0.0)
    assert sum(c.total for c in fresh) == 6 and sum(c.total for c in first) == 3
    assert counts_by_mcu(session, "greenhouse", max_age_s=0.0) == fresh  # one fleet: its own
    session.close()
