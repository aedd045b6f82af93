"""Dashboard benchmark at 100,000 devices: every fleet page (filters, search, deep pages),
the JSON its script polls (200 and 304), the device page, /metrics; and the API's latency
with 10 dashboard pages open, each polling every 2 s with its ETag as the page's script does.

    .venv/bin/python -m bench.dashboard [--devices 100000] [--requests 200] [--open-pages 10]
        [--soak-s 30] [--json]

Real parts: gunicorn with 2 sync workers (the stack's command line, service.gunicorn_conf)
on a fresh SQLite file; a session cookie from the login form, as a browser holds it. The
devices are loaded with SQL (the registry's bulk API is measured by bench.registry; reading
does not care how rows arrived): 5 fleets, 6 MCUs, 2 % decommissioned, tags batch-0..7 and
`bench` on every device, `rare` on one in 1,000, names d-0 ... d-99999 in scattered id order.
Each figure is `requests` GETs on a new connection each (as the API benchmark), p50 / p99 in
ms; the anchor in the same run is GET /api/v1/mcus (auth, no registry query).
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import Engine, text

from bench.registry import summary_ms
from service import db
from service.auth import create_token
from service.models import Device, DeviceTag, Role
from service.stack.config import LOOPBACK, free_port, plan_stack
from service.stack.procs import Started, spawn, stop_group, tcp_open, wait_until
from service.stack.table import web_spec

MCUS = ("stm32f412", "stm32f746", "stm32h743", "nrf52840", "rp2040", "esp32s3")
# The fleet page's queries: (label, query string).
PAGES = [
    ("first page", ""),
    ("mcu", "mcu=stm32f746"),
    ("state", "state=decommissioned"),
    ("fleet", "fleet=fleet-2"),
    ("tag", "tag=batch-3"),
    ("rare tag", "tag=rare"),
    ("fleet+mcu+state", "fleet=fleet-2&mcu=stm32f746&state=active"),
    ("search d-12 (1,111 names)", "q=d-12"),
    ("search d-4242 (11 names)", "q=d-4242"),
    ("search d-5 + mcu", "q=d-5&mcu=rp2040"),
    ("100 per page", "limit=100"),
]


def load(engine: Engine, n: int) -> None:
    """`n` devices with SQL, the list indexes built after the rows (as test_list_plans)."""
    seq = (f"WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < {n - 1})"
           " SELECT i FROM s")
    did = "printf('dev-%016x', (i * 2654435761) % 4294967311)"
    mcu = "CASE i % 6 " + " ".join(f"WHEN {k} THEN '{m}'" for k, m in enumerate(MCUS)) + " END"
    indexes = [*Device.__table__.indexes, *DeviceTag.__table__.indexes]  # type: ignore[attr-defined]
    with engine.begin() as conn:
        for index in indexes:
            index.drop(conn)
        for f in range(5):
            conn.execute(text(
                "INSERT INTO fleets (id, name, description, signing_public_key, "
                "signing_key_path, created_at) VALUES (:i, :n, '', 'k', 'p', CURRENT_TIMESTAMP)"),
                {"i": f + 1, "n": f"fleet-{f}"})
        conn.execute(text(
            "INSERT INTO devices (id, name, fleet_id, mcu, cpu, sram_bytes, flash_bytes, "
            "slot_bytes, ota_layout, state, mqtt_password_hash, created_at) "
            f"SELECT {did}, 'd-' || i, i % 5 + 1, {mcu}, 'cortex-m4', 262144, 1048576, "
            "507904, 'ab', CASE WHEN i % 50 = 0 THEN 'decommissioned' ELSE 'active' END, "
            f"NULL, CURRENT_TIMESTAMP FROM ({seq}) AS q ORDER BY 1"))
        for tag, where in (("'batch-' || (i % 8)", ""), ("'bench'", ""),
                           ("'rare'", "WHERE i % 1000 = 7")):
            conn.execute(text(f"INSERT INTO device_tags (device_id, tag) SELECT {did}, {tag} "
                              f"FROM ({seq}) AS q {where} ORDER BY 1"))
        for index in indexes:
            index.create(conn)


class Client:
    """HTTP on a new connection per request, with a session cookie or a bearer token."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookie: str | None = None
        self.bearer: str | None = None

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body)."""
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=120)
        sent = dict(headers or {})
        if self.cookie:
            sent["Cookie"] = self.cookie
        if self.bearer:
            sent["Authorization"] = f"Bearer {self.bearer}"
        try:
            conn.request(method, path, body=body, headers=sent)
            response = conn.getresponse()
            got = {k.lower(): v for k, v in response.getheaders()}
            data = response.read()
        finally:
            conn.close()
        match = re.search(r"tinyfleet_session=([^;]+)", got.get("set-cookie", ""))
        if match:
            self.cookie = f"tinyfleet_session={match[1]}"
        return response.status, got, data

    def login(self, token: str) -> None:
        """Through the form, as a browser."""
        status, _, page = self.request("GET", "/login")
        csrf = re.search(rb'name="csrf_token" type="hidden" value="([^"]+)"', page)
        assert status == 200 and csrf, page[:300]
        body = urlencode({"token": token, "csrf_token": csrf[1].decode()}).encode()
        status, _, answer = self.request(
            "POST", "/login", body, {"Content-Type": "application/x-www-form-urlencoded"})
        assert status == 303, answer[:300]

    def timed(self, path: str, n: int, headers: dict[str, str] | None = None,
              expect: int = 200) -> dict[str, float]:
        """p50 / p99 of `n` GETs."""
        times = []
        for _ in range(n):
            start = time.perf_counter()
            status, _, body = self.request("GET", path, headers=headers)
            times.append((time.perf_counter() - start) * 1000)
            if status != expect:
                raise RuntimeError(f"GET {path} -> {status}, wanted {expect}: {body[:300]!r}")
        return summary_ms(times)


def deep_cursor(client: Client, query: str) -> str:
    """The cursor of a page near the end of a listing (walks the JSON, 200 a page)."""
    cursor, last = None, None
    while True:
        path = "/fleet/data?limit=200" + (f"&{query}" if query else "") + (
            f"&cursor={cursor}" if cursor else "")
        status, _, body = client.request("GET", path)
        assert status == 200, body[:300]
        doc = json.loads(body)
        if doc["next_cursor"] is None:
            return last or ""
        last, cursor = cursor, doc["next_cursor"]


def measure_pages(client: Client, api: Client, n: int) -> dict[str, Any]:
    """Every fleet page (HTML and its JSON), deep pages, 304s, device page, /metrics."""
    out: dict[str, Any] = {"floor /api/v1/mcus": api.timed("/api/v1/mcus", n)}
    for label, query in PAGES:
        out[f"page: {label}"] = client.timed(f"/fleet?{query}", n)
        out[f"data: {label}"] = client.timed(f"/fleet/data?{query}", n)
    for label, query in (("id order", ""), ("search d-1", "q=d-1")):
        cursor = deep_cursor(client, query)  # about 200-400 devices before the end
        out[f"page: deep page ({label})"] = client.timed(f"/fleet?{query}&cursor={cursor}", n)
        out[f"page: deep page, 200 per page ({label})"] = client.timed(
            f"/fleet?{query}&limit=200&cursor={cursor}", n)
    status, headers, _ = client.request("GET", "/fleet/data")
    assert status == 200
    out["data: 304 revalidation"] = client.timed("/fleet/data", n,
                                                 {"If-None-Match": headers["etag"]}, 304)
    out["device page (fit cached)"] = client.timed("/devices/d-4242?model=mcunet-5fps", n)
    out["device data"] = client.timed("/devices/d-4242/data", n)
    out["/metrics"] = api.timed("/metrics", max(20, n // 10))
    return out


def soak(port: int, token: str, api_token: str, pages: int, seconds: float,
         interval_s: float = 2.0) -> dict[str, Any]:
    """`pages` open pages polling every `interval_s` (with ETags) while the API is timed."""
    stop = threading.Event()
    polls: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def page(index: int) -> None:
        client = Client(port)
        client.login(token)
        path = "/fleet/data?limit=50" if index % 2 == 0 else "/devices/d-4242/data"
        etag = None
        while not stop.is_set():
            start = time.perf_counter()
            status, headers, _ = client.request(
                "GET", path, headers={"If-None-Match": etag} if etag else None)
            took = time.perf_counter() - start
            etag = headers.get("etag", etag)
            with lock:
                polls.append(took * 1000)
                statuses[status] = statuses.get(status, 0) + 1
            stop.wait(max(0.0, interval_s - took))

    threads = [threading.Thread(target=page, args=(i,)) for i in range(pages)]
    for thread in threads:
        thread.start()
    time.sleep(interval_s)  # every page open and polling
    api = Client(port)
    api.bearer = api_token
    times = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        start = time.perf_counter()
        status, _, body = api.request("GET", "/api/v1/devices?limit=100&mcu=stm32f746")
        times.append((time.perf_counter() - start) * 1000)
        assert status == 200, body[:300]
    stop.set()
    for thread in threads:
        thread.join()
    return {"api list p50/p99": summary_ms(times), "api requests": len(times),
            "polls": summary_ms(polls) if polls else None, "poll statuses": statuses}


def run(devices: int, requests: int, open_pages: int, soak_s: float) -> dict[str, Any]:
    """Load, serve, measure."""
    root = Path(tempfile.mkdtemp(prefix="bench-dashboard-"))
    plan = plan_stack(root / "var", mqtt_port=free_port(), http_port=free_port(),
                      redis_port=free_port(), environ={}, inherit_settings=False)
    db.upgrade(plan.database_url)
    engine = db.make_engine(plan.database_url)
    start = time.perf_counter()
    load(engine, devices)
    load_s = time.perf_counter() - start
    with db.make_sessionmaker(engine)() as session:
        viewer = create_token(session, Role.VIEWER, "bench-dashboard")[1]
        session.commit()
    engine.dispose()
    started: list[Started] = []
    env = plan.child_env({"PATH": "/usr/bin:/bin", "TINYFLEET_SYNC_BROKER_FILES": "0"})
    try:
        started.append(spawn(web_spec(plan, env)))
        wait_until(lambda: tcp_open(LOOPBACK, plan.http_port), "gunicorn", 60, started)
        client, api = Client(plan.http_port), Client(plan.http_port)
        client.login(viewer)
        api.bearer = viewer
        for _ in range(4):  # warm both workers (imports, plotly bytes, the fit cache)
            client.request("GET", "/devices/d-4242?model=mcunet-5fps")
            client.request("GET", "/fleet")
        out: dict[str, Any] = {"devices": devices, "load_s": load_s, "requests": requests}
        out["latency_ms"] = measure_pages(client, api, requests)
        out["idle"] = soak(plan.http_port, viewer, viewer, 0, soak_s)
        out[f"{open_pages} pages open"] = soak(plan.http_port, viewer, viewer, open_pages,
                                               soak_s)
        return out
    finally:
        for proc in reversed(started):
            stop_group(proc, 10)
        shutil.rmtree(root, ignore_errors=True)


def report(result: dict[str, Any]) -> str:
    """Markdown rows."""
    lines = [f"{result['devices']:,} devices (loaded in {result['load_s']:.1f} s), "
             f"{result['requests']} requests each", "",
             "| request | p50 ms | p99 ms |", "|---|---|---|"]
    for label, s in result["latency_ms"].items():
        lines.append(f"| {label} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} |")
    lines += ["", "| API `GET /api/v1/devices?limit=100&mcu=stm32f746` | p50 ms | p99 ms | "
              "requests | page polls p50 / p99 ms | poll answers |", "|---|---|---|---|---|---|"]
    for label in [k for k in result if k == "idle" or k.endswith("pages open")]:
        s = result[label]
        polls = s["polls"] if s["poll statuses"] else None
        lines.append(
            f"| {label} | {s['api list p50/p99']['p50_ms']:.1f} | "
            f"{s['api list p50/p99']['p99_ms']:.1f} | {s['api requests']} | "
            + (f"{polls['p50_ms']:.1f} / {polls['p99_ms']:.1f}" if polls else "-") + " | "
            + (", ".join(f"{k}: {v}" for k, v in sorted(s["poll statuses"].items())) or "-")
            + " |")
    return "\n".join(lines)


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--open-pages", type=int, default=10)
    parser.add_argument("--soak-s", type=float, default=30.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args.devices, args.requests, args.open_pages, args.soak_s)
    print(json.dumps(result, indent=2) if args.json else report(result))


if __name__ == "__main__":
    main()
