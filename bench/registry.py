"""Fleet registry benchmark: bulk registration, every list filter and a walk over all pages
through gunicorn, the broker keeping up with the registry; and the broker alone at 100,000.

    .venv/bin/python -m bench.registry [--devices 10000|100000] [--requests 200] [--json]
        [--postgres | --database-url postgresql://...]
    .venv/bin/python -m bench.registry --broker-scale 100000 [--postgres] [--json]
    .venv/bin/python -m bench.registry validation   # the 10k bulk body: pydantic vs main's

Everything runs for real: gunicorn (2 workers, the stack's command line) serving the app on
a fresh SQLite file (or the given database), and a Mosquitto of our own with the generated
config. More than 10,000 devices are registered by several bulk requests of 10,000 (the
API's limit). Peers measured in the same run: single-device POSTs (per device), GET
/api/v1/mcus (the WSGI floor: auth, no registry query), and `mosquitto_passwd -U` hashing
the same number of passwords (what an operator would run without a registry).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from bench.registry_broker import (
    accepted,
    measure_broker_at_scale,
    report_broker_at_scale,
    until,
)
from service import db
from service.auth import create_token
from service.broker_sync import BrokerTarget, full_sync, prepare_start
from service.device_list import list_devices
from service.models import Role
from service.registry import RegistryContext, register_devices
from service.schemas import DeviceCreate, DeviceQuery
from service.stack.config import LOOPBACK, StackPlan, free_port, plan_stack
from service.stack.mosquitto import MosquittoFiles
from service.stack.procs import Started, spawn, stop_group, tcp_open, wait_until
from service.stack.table import mosquitto_spec, web_spec

MCUS = ("stm32f412", "stm32f746", "stm32h743", "nrf52840", "rp2040", "esp32s3")
FLEETS = 5
BULK = 10_000  # rows per bulk request (the API's limit)
LIST_QUERY = "/api/v1/devices?fleet=fleet-2&tag=batch-3&mcu=stm32f746&limit=100"
# Every documented filter of GET /api/v1/devices, alone and combined (limit 100).
LIST_FILTERS = {
    "none": "",
    "fleet": "fleet=fleet-2",
    "mcu": "mcu=stm32f746",
    "state": "state=active",
    "tag": "tag=batch-3",
    "fleet+mcu+state": "fleet=fleet-2&mcu=stm32f746&state=active",
    "two tags+state": "tag=batch-3&tag=bench&state=active",
    "fleet+tag+mcu": "fleet=fleet-2&tag=batch-3&mcu=stm32f746",
    "tag+decommissioned": "tag=bench&state=decommissioned",
}


def request(port: int, method: str, path: str, token: str,
            body: Any = None) -> tuple[int, bytes]:
    """One HTTP request on a new connection (gunicorn's sync workers close each one)."""
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=120)
    headers = {"Authorization": f"Bearer {token}"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def summary_ms(times: list[float]) -> dict[str, float]:
    """p50 / p99 / mean / max of latencies in ms."""
    times = sorted(times)
    return {"p50_ms": statistics.median(times), "p99_ms": times[int(0.99 * (len(times) - 1))],
            "mean_ms": statistics.fmean(times), "max_ms": times[-1]}


def latencies_ms(port: int, path: str, token: str, n: int) -> dict[str, float]:
    """p50 / p99 / mean of `n` GETs of `path`, in ms (each checked for 200)."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        status, _body = request(port, "GET", path, token)
        times.append((time.perf_counter() - start) * 1000)
        if status != 200:
            raise RuntimeError(f"GET {path} -> {status}")
    return summary_ms(times)


def walk_pages(port: int, query: str, limit: int, token: str) -> dict[str, Any]:
    """Follow next_cursor from the first page to the last: per-page latency and total."""
    times, items, cursor = [], 0, None
    start = time.perf_counter()
    while True:
        path = f"/api/v1/devices?limit={limit}" + (f"&{query}" if query else "") + (
            f"&cursor={cursor}" if cursor else "")
        t = time.perf_counter()
        status, body = request(port, "GET", path, token)
        times.append((time.perf_counter() - t) * 1000)
        if status != 200:
            raise RuntimeError(f"GET {path} -> {status}: {body[:300]!r}")
        page = json.loads(body)
        items += len(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    return {"pages": len(times), "items": items, "total_s": time.perf_counter() - start,
            **summary_ms(times)}


def bulk_rows(n: int, prefix: str) -> list[dict[str, Any]]:
    """`n` registration rows over 5 fleets, 6 MCUs and 8 tag batches."""
    return [{"name": f"{prefix}-{i:05}", "fleet": f"fleet-{i % FLEETS}",
             "mcu": MCUS[i % len(MCUS)], "tags": [f"batch-{i % 8}", "bench"]}
            for i in range(n)]


def peer_mosquitto_passwd(n: int, root: Path) -> float | None:
    """Seconds `mosquitto_passwd -U` takes to hash `n` plaintext passwords."""
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        return None
    path = root / "plain-passwords"
    path.write_text("".join(f"dev-{i:016x}:password-{i:08}-abcdefgh\n" for i in range(n)))
    start = time.perf_counter()
    subprocess.run([tool, "-U", str(path)], check=True, capture_output=True)
    return time.perf_counter() - start


def start_servers(plan: StackPlan, env: dict[str, str],
                  started: list[Started]) -> tuple[sessionmaker[Session], str, MosquittoFiles]:
    """Migrate, write the broker files, start Mosquitto and gunicorn; an admin token."""
    db.upgrade(plan.database_url)
    engine = db.make_engine(plan.database_url)
    maker = db.make_sessionmaker(engine)
    with maker() as session:
        token = create_token(session, Role.ADMIN, "bench")[1]
        session.commit()
    prepare_start(engine, plan.broker_dir)
    files = MosquittoFiles.in_dir(plan.broker_dir)
    started.append(spawn(mosquitto_spec(plan, files)))
    wait_until(lambda: tcp_open(LOOPBACK, plan.mqtt_port) and files.pid_file.exists(),
               "mosquitto", 30, started)
    started.append(spawn(web_spec(plan, plan.child_env(env))))
    wait_until(lambda: tcp_open(LOOPBACK, plan.http_port), "gunicorn", 60, started)
    return maker, token, files


def measure_http(port: int, token: str, devices: int, requests: int) -> dict[str, Any]:
    """Bulk vs single registration, then every list filter and page walks vs GET /mcus."""
    out: dict[str, Any] = {}
    for f in range(FLEETS):
        status, body = request(port, "POST", "/api/v1/fleets", token, {"name": f"fleet-{f}"})
        assert status == 201, body
    rows = bulk_rows(devices, "bulk")
    bulk_times = []
    for first in range(0, devices, BULK):
        start = time.perf_counter()
        status, body = request(port, "POST", "/api/v1/devices/bulk", token,
                               {"devices": rows[first:first + BULK]})
        bulk_times.append(time.perf_counter() - start)
        assert status == 201, body[:500]
    out["bulk_s"] = sum(bulk_times)
    out["bulk_requests_s"] = bulk_times
    out["bulk_ms_per_device"] = out["bulk_s"] * 1000 / devices
    singles = 100 if devices <= BULK else 10  # each reloads the broker: ~1 s at 100k
    start = time.perf_counter()
    for row in bulk_rows(singles, "single"):
        status, body = request(port, "POST", "/api/v1/devices", token, row)
        assert status == 201, body
    out["single_post_ms_per_device"] = (time.perf_counter() - start) * 1000 / singles
    out["list_items"] = len(json.loads(request(port, "GET", LIST_QUERY, token)[1])["items"])
    out["list"] = latencies_ms(port, LIST_QUERY, token, requests)
    out["list_unfiltered"] = latencies_ms(port, "/api/v1/devices?limit=100", token, requests)
    out["filters"] = {}
    for name, query in LIST_FILTERS.items():
        path = "/api/v1/devices?limit=100" + (f"&{query}" if query else "")
        items = len(json.loads(request(port, "GET", path, token)[1])["items"])
        out["filters"][name] = {"query": query, "items": items,
                                **latencies_ms(port, path, token, requests)}
    out["walk_all_limit_1000"] = walk_pages(port, "", 1000, token)
    out["walk_two_tags_state_limit_100"] = walk_pages(
        port, LIST_FILTERS["two tags+state"], 100, token)
    out["peer_mcus"] = latencies_ms(port, "/api/v1/mcus", token, requests)
    return out


def measure_queries(session: Session, requests: int) -> dict[str, Any]:
    """The registry's own share of each list: `list_devices` in this process (no HTTP, no
    JSON), each filter `requests` times, and a walk over every page of 100."""
    from urllib.parse import parse_qs

    out: dict[str, Any] = {}
    for name, query in LIST_FILTERS.items():
        args: dict[str, Any] = {k: v if k == "tag" else v[-1]
                                for k, v in parse_qs(query).items()}
        spec = DeviceQuery.model_validate({**args, "limit": 100})
        times = []
        for _ in range(requests):
            start = time.perf_counter()
            list_devices(session, spec)
            times.append((time.perf_counter() - start) * 1000)
        out[name] = summary_ms(times)
    times, cursor = [], None
    while True:
        start = time.perf_counter()
        _page, cursor = list_devices(session, DeviceQuery.model_validate(
            {"limit": 100, **({"cursor": cursor} if cursor else {})}))
        times.append((time.perf_counter() - start) * 1000)
        if cursor is None:
            break
    out["walk_all_limit_100"] = {"pages": len(times), "total_s": sum(times) / 1000,
                                 **summary_ms(times)}
    return out


def measure_broker(engine: Engine, session: Session, plan: StackPlan,
                   files: MosquittoFiles) -> dict[str, Any]:
    """A full sync (base rewrite + SIGHUP, reload confirmed), and registration -> connect."""
    target = BrokerTarget(plan.broker_dir, files.pid_file, LOOPBACK, plan.mqtt_port)
    regen = [full_sync(engine, target) for _ in range(5)]
    out: dict[str, Any] = {"broker_regen_s": statistics.median(r.seconds for r in regen),
                           "broker_password_lines": regen[0].devices + 3}
    ctx = RegistryContext(key_dir=plan.var_dir / "keys", broker_dir=plan.broker_dir,
                          pid_file=files.pid_file, mqtt_port=plan.mqtt_port)
    times = []
    for i in range(5):
        start = time.perf_counter()
        new = register_devices(session, [DeviceCreate(name=f"late-{i}", fleet="fleet-0",
                                                      mcu="stm32f412")], ctx).devices[0]
        until(lambda: accepted(plan.mqtt_port, new.device_id, new.mqtt_password))  # noqa: B023
        times.append(time.perf_counter() - start)
    out["register_to_connect_s"] = statistics.median(times)
    return out


def run(devices: int, requests: int, database_url: str | None) -> dict[str, Any]:
    """The whole benchmark; returns its numbers."""
    root = Path(tempfile.mkdtemp(prefix="tinyfleet-bench-"))
    root.chmod(0o755)  # Mosquitto (user mosquitto) must reach var/broker
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINYFLEET_")}
    if database_url:
        env["TINYFLEET_DATABASE_URL"] = database_url
    plan = plan_stack(root / "var", mqtt_port=free_port(), http_port=free_port(), environ=env)
    started: list[Started] = []
    try:
        maker, token, files = start_servers(plan, env, started)
        out: dict[str, Any] = {"devices": devices, "requests": requests,
                               "database": plan.database_url.split(":")[0]}
        out.update(measure_http(plan.http_port, token, devices, requests))
        with maker() as session:
            out["in_process"] = measure_queries(session, requests)
        with maker() as session:
            engine = session.get_bind()
            assert isinstance(engine, Engine)
            out.update(measure_broker(engine, session, plan, files))
        out["peer_mosquitto_passwd_s"] = peer_mosquitto_passwd(devices, root)
        return out
    finally:
        for proc in reversed(started):
            stop_group(proc, 10.0)
        shutil.rmtree(root, ignore_errors=True)


def report(r: dict[str, Any]) -> str:
    """The numbers as text."""
    peer = r["peer_mosquitto_passwd_s"]
    lines = [
        f"bulk register {r['devices']} devices ({len(r['bulk_requests_s'])} POST(s) of up to "
        f"{BULK}, gunicorn, {r['database']}): "
        f"{r['bulk_s']:.2f} s ({r['bulk_ms_per_device']:.3f} ms/device; single POSTs "
        f"{r['single_post_ms_per_device']:.1f} ms/device, "
        f"{r['single_post_ms_per_device'] / r['bulk_ms_per_device']:.0f}x)",
        f"list {LIST_QUERY} ({r['list_items']} items) x{r['requests']}: "
        f"p50 {r['list']['p50_ms']:.1f} ms, p99 {r['list']['p99_ms']:.1f} ms",
        f"list unfiltered limit=100: p50 {r['list_unfiltered']['p50_ms']:.1f} ms, "
        f"p99 {r['list_unfiltered']['p99_ms']:.1f} ms",
        *(f"  filter {name:<20} ({f['items']:>3} items): p50 {f['p50_ms']:.1f} ms, "
          f"p99 {f['p99_ms']:.1f} ms, max {f['max_ms']:.1f} ms"
          for name, f in r["filters"].items()),
        *(f"walk {name}: {w['pages']} pages, {w['items']} devices in {w['total_s']:.1f} s; "
          f"per page p50 {w['p50_ms']:.1f} ms, p99 {w['p99_ms']:.1f} ms"
          for name, w in (("all, limit 1000", r["walk_all_limit_1000"]),
                          ("two tags+state, limit 100", r["walk_two_tags_state_limit_100"]))),
        *(f"  in process {name:<20}: p50 {q['p50_ms']:.2f} ms, p99 {q['p99_ms']:.2f} ms"
          for name, q in r["in_process"].items()),
        f"peer GET /api/v1/mcus: p50 {r['peer_mcus']['p50_ms']:.1f} ms, "
        f"p99 {r['peer_mcus']['p99_ms']:.1f} ms",
        f"broker base rewritten ({r['broker_password_lines']} lines) + SIGHUP, reload "
        f"confirmed: {r['broker_regen_s'] * 1000:.0f} ms; register -> device connects (live): "
        f"{r['register_to_connect_s'] * 1000:.0f} ms",
    ]
    if peer is not None:
        lines.append(f"peer mosquitto_passwd -U on {r['devices']} passwords: {peer:.2f} s "
                     f"({peer / r['broker_regen_s']:.1f}x the regeneration)")
    return "\n".join(lines)


OLD_VALIDATION_REV = "f0b9652"  # main before pydantic: service/validation.py, hand-rolled


def _old_validation() -> tuple[Any, Any] | None:
    """main's hand-rolled validator and its schemas, loaded from git (None without git)."""
    import sys
    import types

    try:
        sources = [subprocess.run(["git", "show", f"{OLD_VALIDATION_REV}:service/{name}.py"],
                                  check=True, capture_output=True).stdout
                   for name in ("validation", "schemas")]
    except (OSError, subprocess.CalledProcessError):
        return None
    modules = []
    saved = sys.modules.get("service.validation")
    for name, source in zip(("service.validation", "old_schemas"), sources, strict=True):
        module = types.ModuleType(name)
        sys.modules[name] = module  # dataclasses and type hints look their module up
        exec(compile(source, f"{OLD_VALIDATION_REV}:{name}", "exec"), module.__dict__)
        modules.append(module)
    sys.modules["old_validation"] = sys.modules.pop("service.validation")
    if saved is not None:
        sys.modules["service.validation"] = saved
    return modules[0], modules[1]


def measure_validation(repeats: int = 7) -> dict[str, Any]:
    """Parse + validate the body of a 10,000-row bulk request: pydantic (now) vs main's
    hand-rolled validator, same body, same process, best and median of `repeats`."""
    from service.schemas import DeviceBulkCreate

    rows = bulk_rows(BULK, "bulk")
    for row in rows[::7]:  # some rows with explicit sizes: the size parser runs too
        del row["mcu"]
        row.update(sram_bytes="256KiB", flash_bytes=1048576, cpu="cortex-m4")
    raw = json.dumps({"devices": rows}).encode()

    def timed(parse: Any) -> dict[str, float]:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            parse()
            times.append((time.perf_counter() - start) * 1000)
        return {"best_ms": min(times), "median_ms": statistics.median(times)}

    out: dict[str, Any] = {"rows": BULK, "body_bytes": len(raw),
                           "pydantic": timed(lambda: DeviceBulkCreate.model_validate(
                               json.loads(raw)))}
    old = _old_validation()
    if old is not None:
        validation, schemas = old

        def parse_old() -> None:
            data = json.loads(raw)
            spec = validation.parse(schemas.DeviceBulkEnvelope, data)
            errors: list[Any] = []
            for i, row in enumerate(spec.devices):
                validation.parse_into(schemas.DeviceCreate, row, errors, index=i)
            assert not errors

        out["hand_rolled"] = timed(parse_old)
    return out


def main() -> None:
    """Command-line entry point."""
    import sys

    if sys.argv[1:2] == ["validation"]:
        result = measure_validation()
        print(json.dumps(result, indent=2))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--postgres", action="store_true",
                        help="start a throwaway PostgreSQL (as the tests do) and use it")
    parser.add_argument("--broker-scale", type=int, default=None, metavar="DEVICES",
                        help="measure only the broker keeping up with a registry of DEVICES "
                             "(loaded with SQL): one change, a burst of 100, the old full path")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.broker_scale:
        scale = _with_database(args, lambda url: measure_broker_at_scale(args.broker_scale, url))
        print(json.dumps(scale, indent=2) if args.json else report_broker_at_scale(scale))
        return
    if args.postgres:
        from tests.service.postgres import start_postgres

        server = start_postgres()
        try:
            result = run(args.devices, args.requests, server.create_database("bench"))
        finally:
            server.stop()
    else:
        result = run(args.devices, args.requests, args.database_url)
    print(json.dumps(result, indent=2) if args.json else report(result))


def _with_database(args: argparse.Namespace, work: Any) -> Any:
    """Run `work(database_url)` on --database-url, a throwaway PostgreSQL, or SQLite (None)."""
    if not args.postgres:
        return work(args.database_url)
    from tests.service.postgres import start_postgres

    server = start_postgres()
    try:
        return work(server.create_database("bench_broker"))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
