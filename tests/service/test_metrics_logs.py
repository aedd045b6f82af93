"""/metrics (prometheus-client: in process, and summed over gunicorn's workers in
multiprocess mode) and the JSON logs with their context ids."""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service import db
from service.auth import create_token
from service.logs import JsonFormatter, bind, configure_json_logging, current_ids
from service.models import Role
from service.stack.config import free_port
from service.stack.procs import tcp_open
from tests.servers import wait_for
from tests.service.test_dashboard import Dash, make_dash, register

pytestmark = pytest.mark.integration


@pytest.fixture
def dash(tmp_path: Path, sqlite_template: Path) -> Iterator[Dash]:
    """The app on a fresh SQLite database."""
    path = tmp_path / "tinyfleet.db"
    shutil.copy(sqlite_template, path)
    made = make_dash(f"sqlite:///{path}", tmp_path / "var")
    yield made
    made.app.extensions["tinyfleet.engine"].dispose()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_need_a_token(dash: Dash) -> None:
    client = dash.app.test_client()
    response = client.get("/metrics")
    assert response.status_code == 401 and response.mimetype == "application/problem+json"


def test_metrics_count_devices_by_state_and_requests_by_route(dash: Dash) -> None:
    register(dash, 6)
    dash.api("DELETE", "/api/v1/devices/gh-000")
    client = dash.app.test_client()
    viewer = {"Authorization": f"Bearer {dash.tokens[Role.VIEWER]}"}
    before = samples(client.get("/metrics", headers=viewer).text)
    for _ in range(3):
        client.get("/api/v1/devices/gh-001", headers=viewer)
    response = client.get("/metrics", headers=viewer)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    after = samples(response.text)
    assert after[("tinyfleet_devices", (("mcu", "stm32f746"), ("state", "active")))] == 1
    assert after[("tinyfleet_devices", (("mcu", "stm32f746"), ("state", "decommissioned")))] \
        == 1
    assert after[("tinyfleet_devices", (("mcu", "rp2040"), ("state", "active")))] == 2
    key = ("tinyfleet_http_requests_total",
           (("endpoint", "devices.get_view"), ("method", "GET"), ("status", "200")))
    assert after[key] - before.get(key, 0) == 3
    count = ("tinyfleet_http_request_duration_seconds_count",
             (("endpoint", "devices.get_view"), ("method", "GET")))
    assert after[count] - before.get(count, 0) == 3
    families = {f.name: f.type for f in text_string_to_metric_families(response.text)}
    assert families["tinyfleet_http_request_duration_seconds"] == "histogram"


def test_the_hooks_for_the_bridge_and_workers_reach_the_scrape(dash: Dash) -> None:
    from service.metrics import BUILD_SECONDS, MQTT_MESSAGES, SEARCH_SECONDS

    client = dash.app.test_client()
    viewer = {"Authorization": f"Bearer {dash.tokens[Role.VIEWER]}"}
    rejected = ("tinyfleet_mqtt_messages_total",
                (("direction", "in"), ("kind", "metrics"), ("outcome", "rejected")))
    builds = ("tinyfleet_build_duration_seconds_count", (("outcome", "ok"),))
    searches = ("tinyfleet_search_duration_seconds_sum", (("outcome", "failed"),))
    before = samples(client.get("/metrics", headers=viewer).text)
    MQTT_MESSAGES.labels("in", "metrics", "rejected").inc(2)
    BUILD_SECONDS.labels("ok").observe(12.5)
    SEARCH_SECONDS.labels("failed").observe(3.0)
    after = samples(client.get("/metrics", headers=viewer).text)
    assert after[rejected] - before.get(rejected, 0) == 2
    assert after[builds] - before.get(builds, 0) == 1
    assert after[searches] - before.get(searches, 0) == 3.0


def test_refused_requests_are_counted_too(dash: Dash) -> None:
    client = dash.app.test_client()
    viewer = {"Authorization": f"Bearer {dash.tokens[Role.VIEWER]}"}
    client.get("/api/v1/devices", headers={"Authorization": "Bearer nope"})
    after = samples(client.get("/metrics", headers=viewer).text)
    assert after[("tinyfleet_http_requests_total",
                  (("endpoint", "devices.list_view"), ("method", "GET"), ("status", "401")))] >= 1


def test_json_lines_carry_the_bound_ids() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    log = logging.getLogger("tinyfleet.test.json")
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    try:
        with bind(campaign_id=7, job_id="j-1"):
            with bind(device_id="dev-0123456789abcdef", task_id=None):
                log.info("installing %s", "v2", extra={"progress": 0.5})
                assert current_ids() == {"campaign_id": "7", "job_id": "j-1",
                                         "device_id": "dev-0123456789abcdef"}
            log.warning("batch done")
        log.error("outside")
    finally:
        log.removeHandler(handler)
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "installing v2" and first["level"] == "info"
    assert (first["campaign_id"], first["job_id"], first["device_id"], first["progress"]) == (
        "7", "j-1", "dev-0123456789abcdef", 0.5)
    assert "task_id" not in first and "device_id" not in second
    assert second["campaign_id"] == "7" and "campaign_id" not in third
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    with pytest.raises(ValueError, match="unknown log context ids"), \
            bind(user="x"):  # type: ignore[arg-type]
        pass


def test_each_request_is_logged_with_its_request_and_device_ids(dash: Dash) -> None:
    register(dash, 1)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("tinyfleet.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        client = dash.app.test_client()
        viewer = {"Authorization": f"Bearer {dash.tokens[Role.VIEWER]}"}
        given = client.get("/api/v1/devices/gh-000",
                           headers={**viewer, "X-Request-ID": "req-12345678"})
        fresh = client.get("/api/v1/devices/gh-000", headers={**viewer, "X-Request-ID": "<x>"})
    finally:
        access.removeHandler(handler)
    assert given.headers["X-Request-ID"] == "req-12345678"
    assert re.fullmatch(r"[0-9a-f]{32}", fresh.headers["X-Request-ID"])  # an insane one: new
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(x["request_id"], x["device_id"], x["status"], x["endpoint"]) for x in lines] == [
        ("req-12345678", "gh-000", 200, "devices.get_view"),
        (fresh.headers["X-Request-ID"], "gh-000", 200, "devices.get_view")]
    assert all(x["duration_ms"] >= 0 and x["path"] == "/api/v1/devices/gh-000" for x in lines)


def test_configure_json_logging_is_idempotent() -> None:
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        stream = io.StringIO()
        configure_json_logging(stream)
        configure_json_logging(stream)
        assert sum(isinstance(h.formatter, JsonFormatter) for h in root.handlers) == 1
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


# ---- through gunicorn: several workers, one sum ---------------------------------------------

@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str, Path]]:
    """gunicorn with the stack's config and 2 workers; (port, viewer token, var dir)."""
    var = tmp_path_factory.mktemp("metrics-web") / "var"
    url = f"sqlite:///{var / 'tinyfleet.db'}"
    db.upgrade(url)
    engine = db.make_engine(url)
    with db.make_sessionmaker(engine)() as session:
        _, token = create_token(session, Role.VIEWER, "scraper")
        session.commit()
    engine.dispose()
    stale = var / "metrics" / "web"
    stale.mkdir(parents=True)
    (stale / "counter_999999.db").write_bytes(b"stale")  # an earlier run's: must go
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TINYFLEET_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(TINYFLEET_VAR_DIR=str(var), TINYFLEET_SYNC_BROKER_FILES="0")
    log = var / "web.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--config", "python:service.gunicorn_conf",
         "--bind", f"127.0.0.1:{port}", "--workers", "2", "service.app:create_app()"],
        env=env, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))  # noqa: SIM115
    try:
        assert wait_for(lambda: tcp_open("127.0.0.1", port), 60), log.read_text()
        yield port, token, var
    finally:
        proc.terminate()
        proc.wait(20)


def get(port: int, path: str, token: str) -> tuple[int, bytes]:
    """One request on a new connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_gunicorn_workers_counts_add_up_in_one_scrape(web: tuple[int, str, Path]) -> None:
    port, token, var = web
    key = ("tinyfleet_http_requests_total",
           (("endpoint", "mcus.list_mcus"), ("method", "GET"), ("status", "200")))
    before = samples(get(port, "/metrics", token)[1].decode()).get(key, 0.0)
    results: list[int] = []

    def hammer() -> None:
        for _ in range(10):
            results.append(get(port, "/api/v1/mcus", token)[0])

    def counter_files() -> set[str]:
        return {p.name for p in (var / "metrics" / "web").glob("counter_*.db")}

    # Which worker accepts a connection is the kernel's choice: one may take a whole
    # burst. Send bursts until both have answered some (one counter file per worker).
    deadline = time.monotonic() + 60
    while True:
        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if len(counter_files() - {"counter_999999.db"}) >= 2 or time.monotonic() > deadline:
            break
    assert results == [200] * len(results)
    after = samples(get(port, "/metrics", token)[1].decode())
    assert after[key] - before == len(results)
    files = counter_files()
    assert len(files) >= 2 and "counter_999999.db" not in files


def test_gunicorn_logs_are_json_lines(web: tuple[int, str, Path]) -> None:
    port, token, var = web
    get(port, "/api/v1/devices/nope", token)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [line for line in (var / "web.log").read_text().splitlines() if line.strip()]
        if any('"status": 404' in line for line in lines):
            break
        time.sleep(0.1)
    docs = [json.loads(line) for line in lines]  # every line, gunicorn's own included
    access = [d for d in docs if d.get("logger") == "tinyfleet.access" and d["status"] == 404]
    assert access and access[0]["device_id"] == "nope" and len(access[0]["request_id"]) == 32
    assert any(d["logger"] == "gunicorn.error" for d in docs)


def test_a_given_metrics_directory_is_made_when_missing(tmp_path: Path) -> None:
    # The Celery worker or a bridge started with the stack's variable before `up` made it.
    target = tmp_path / "var" / "metrics"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(target)}
    subprocess.run([sys.executable, "-c", "import service.metrics as m; "
                    "m.HTTP_REQUESTS.labels('GET', 'x', '200').inc()"],
                   env=env, check=True, timeout=60)
    assert target.is_dir() and list(target.glob("counter_*.db"))
