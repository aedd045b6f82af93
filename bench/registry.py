"""Fleet registry benchmark: bulk registration, filtered listing through gunicorn, and the
broker keeping up with the registry, at 10,000 devices; and the broker alone at 100,000.

    .venv/bin/python -m bench.registry [--devices 10000] [--requests 200] [--json]
        [--database-url postgresql://...]
    .venv/bin/python -m bench.registry --broker-scale 100000 [--postgres] [--json]

Everything runs for real: gunicorn (2 workers, the stack's command line) serving the app on
a fresh SQLite file (or the given database), and a Mosquitto of our own with the generated
config. Peers measured in the same run: single-device POSTs (per device), GET /api/v1/mcus
(the WSGI floor: auth, no registry query), and `mosquitto_passwd -U` hashing the same number
of passwords (what an operator would run without a registry).
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
from service.models import Role
from service.registry import RegistryContext, register_devices
from service.schemas import DeviceCreate
from service.stack.config import LOOPBACK, StackPlan, free_port, plan_stack
from service.stack.mosquitto import MosquittoFiles
from service.stack.procs import Started, spawn, stop_group, tcp_open, wait_until
from service.stack.table import mosquitto_spec, web_spec

MCUS = ("stm32f412", "stm32f746", "stm32h743", "nrf52840", "rp2040", "esp32s3")
FLEETS = 5
LIST_QUERY = "/api/v1/devices?fleet=fleet-2&tag=batch-3&mcu=stm32f746&limit=100"


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


def latencies_ms(port: int, path: str, token: str, n: int) -> dict[str, float]:
    """p50 / p99 / mean of `n` GETs of `path`, in ms (each checked for 200)."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        status, _body = request(port, "GET", path, token)
        times.append((time.perf_counter() - start) * 1000)
        if status != 200:
            raise RuntimeError(f"GET {path} -> {status}")
    times.sort()
    return {"p50_ms": statistics.median(times), "p99_ms": times[int(0.99 * (n - 1))],
            "mean_ms": statistics.fmean(times)}


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
    """Bulk vs single registration, then filtered and unfiltered lists vs GET /mcus."""
    out: dict[str, Any] = {}
    for f in range(FLEETS):
        status, body = request(port, "POST", "/api/v1/fleets", token, {"name": f"fleet-{f}"})
        assert status == 201, body
    start = time.perf_counter()
    status, body = request(port, "POST", "/api/v1/devices/bulk", token,
                           {"devices": bulk_rows(devices, "bulk")})
    out["bulk_s"] = time.perf_counter() - start
    assert status == 201, body[:500]
    out["bulk_ms_per_device"] = out["bulk_s"] * 1000 / devices
    singles = 100
    start = time.perf_counter()
    for row in bulk_rows(singles, "single"):
        status, body = request(port, "POST", "/api/v1/devices", token, row)
        assert status == 201, body
    out["single_post_ms_per_device"] = (time.perf_counter() - start) * 1000 / singles
    out["list_items"] = len(json.loads(request(port, "GET", LIST_QUERY, token)[1])["items"])
    out["list"] = latencies_ms(port, LIST_QUERY, token, requests)
    out["list_unfiltered"] = latencies_ms(port, "/api/v1/devices?limit=100", token, requests)
    out["peer_mcus"] = latencies_ms(port, "/api/v1/mcus", token, requests)
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
        f"bulk register {r['devices']} devices (one POST, gunicorn, {r['database']}): "
        f"{r['bulk_s']:.2f} s ({r['bulk_ms_per_device']:.3f} ms/device; single POSTs "
        f"{r['single_post_ms_per_device']:.1f} ms/device, "
        f"{r['single_post_ms_per_device'] / r['bulk_ms_per_device']:.0f}x)",
        f"list {LIST_QUERY} ({r['list_items']} items) x{r['requests']}: "
        f"p50 {r['list']['p50_ms']:.1f} ms, p99 {r['list']['p99_ms']:.1f} ms",
        f"list unfiltered limit=100: p50 {r['list_unfiltered']['p50_ms']:.1f} ms, "
        f"p99 {r['list_unfiltered']['p99_ms']:.1f} ms",
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


def main() -> None:
    """Command-line entry point."""
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
