"""`tinyfleet up` / `tinyfleet down` as a user runs them: real processes on free ports."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from service.demo.api import ApiClient
from service.queue import celery_settings
from service.stack.config import free_port
from service.stack.procs import group_alive
from service.stack.state import read_state
from tests.mqtt_probe import connack
from tests.servers import RedisServer, run_cli, wait_for
from tests.service.postgres import PostgresServer

pytestmark = pytest.mark.integration


@pytest.fixture()
def var_dir() -> Iterator[Path]:
    """A var/ directory Mosquitto's user can reach (pytest's own tmp dirs are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="tinyfleet-stack-"))
    root.chmod(0o755)
    yield root / "var"
    shutil.rmtree(root, ignore_errors=True)


def clean_env() -> dict[str, str]:
    """Our environment without TINYFLEET_* settings, so the stack starts its own servers."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TINYFLEET_")}


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    """GET a JSON document; (status, body) for error statuses too."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def stack_pids(var: Path) -> dict[str, int]:
    """name -> pid of each process in the stack's state file."""
    return {r.name: r.pid for r in read_state(var / "stack.json")}


def ports() -> list[str]:
    """Free ports for all three servers."""
    return ["--redis-port", str(free_port()), "--mqtt-port", str(free_port()),
            "--http-port", str(free_port())]


def test_up_detach_is_green_runs_a_task_and_down_leaves_nothing(var_dir: Path) -> None:
    args = ports()
    http_port, redis_port = args[5], args[1]
    up = run_cli(["up", "--detach", "--var", str(var_dir), *args], env=clean_env())
    pids = stack_pids(var_dir)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert set(pids) == {"redis", "mqtt", "web", "worker"}
        for where in (f"127.0.0.1:{http_port}", f"127.0.0.1:{redis_port}", "/healthz"):
            assert where in up.stdout

        status, body = get_json(f"http://127.0.0.1:{http_port}/healthz")
        assert status == 200, body
        assert {n: c["status"] for n, c in body["components"].items()} == {
            "database": "ok", "redis": "ok", "mqtt": "ok", "worker": "ok"}

        client = Celery("test-client")
        client.conf.update(celery_settings(f"redis://127.0.0.1:{redis_port}/0"))
        try:
            assert client.send_task("tinyfleet.ping", args=["up"]).get(timeout=30)[
                "payload"] == "up"
        finally:
            client.close()

        registry_cli_changes_reload_the_running_broker(var_dir, http_port, args[3])

        conf = (var_dir / "broker" / "mosquitto.conf").read_text()
        assert "allow_anonymous false" in conf and f"listener {args[3]} 127.0.0.1" in conf

        again = run_cli(["up", "--detach", "--var", str(var_dir), *ports()], env=clean_env())
        assert again.returncode != 0 and "already running" in again.stderr
    finally:
        down = run_cli(["down", "--var", str(var_dir)], env=clean_env())
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped" in down.stdout
    assert not any(group_alive(pid) for pid in pids.values())
    assert not (var_dir / "stack.json").exists()


def registry_cli_changes_reload_the_running_broker(var: Path, http_port: str,
                                                   mqtt_port: str) -> None:
    """A device registered over HTTP can log in; `tinyfleet devices decommission`, run from
    another shell that knows only the var dir, locks it out of the running broker."""
    cli_env = clean_env() | {"TINYFLEET_VAR_DIR": str(var)}
    token = run_cli(["tokens", "create", "--role", "admin"], env=cli_env)
    assert token.returncode == 0, token.stderr
    api = ApiClient(f"http://127.0.0.1:{http_port}", token.stdout.strip())
    api.post("/api/v1/fleets", {"name": "stack"})
    device = api.post("/api/v1/devices", {"name": "s-1", "fleet": "stack", "mcu": "rp2040"})
    login = ("127.0.0.1", int(mqtt_port), device["mqtt"]["username"], device["mqtt"]["password"])
    assert wait_for(lambda: _accepted(*login), 5, 0.1), "a registered device cannot log in"

    gone = run_cli(["devices", "decommission", device["device"]["id"]], env=cli_env)
    assert gone.returncode == 0, gone.stderr
    assert wait_for(lambda: not _accepted(*login), 5, 0.1), "decommissioned, still logs in"


def _accepted(host: str, port: int, username: str, password: str) -> bool:
    code = connack(host, port, username, password)
    return code is not None and not code.is_failure


def test_a_taken_port_is_named_and_nothing_is_left_running(var_dir: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        args = ports()
        args[3] = str(taken)  # the MQTT port
        up = run_cli(["up", "--detach", "--var", str(var_dir), *args], env=clean_env())
    assert up.returncode != 0
    assert f"MQTT port {taken}" in up.stderr and "--mqtt-port" in up.stderr
    assert stack_pids(var_dir) == {}


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM],
                         ids=["ctrl-c", "sigterm"])
def test_foreground_up_uses_given_servers_and_stops_everything_on_a_signal(
        var_dir: Path, redis_server: RedisServer, postgres_server: PostgresServer,
        stop_signal: signal.Signals) -> None:
    database_url = postgres_server.create_database(f"stack_{stop_signal.name.lower()}")
    env = clean_env() | {"TINYFLEET_REDIS_URL": redis_server.url,
                         "TINYFLEET_DATABASE_URL": database_url}
    args = ports()
    script = Path(sys.executable).with_name("tinyfleet")
    proc = subprocess.Popen([str(script), "up", "--var", str(var_dir), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:  # what a user waits for before pressing Ctrl-C
            lines.append(line)
            if line.startswith("Ctrl-C stops everything"):
                break
        assert get_status(args[5]) == 200, "".join(lines)
        pids = stack_pids(var_dir)
        assert set(pids) == {"mqtt", "web", "worker"}  # Redis is the given one, not ours
        database = get_json(f"http://127.0.0.1:{args[5]}/healthz")[1]["components"]["database"]
        assert database["detail"] == "postgresql"  # migrated at start, then used
        assert not (var_dir / "tinyfleet.db").exists()
        proc.send_signal(stop_signal)  # Ctrl-C, or systemd's stop
        output = "".join(lines) + proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert redis_server.url in output and "stopped." in output
    assert not any(group_alive(pid) for pid in pids.values())
    assert not (var_dir / "stack.json").exists()


def get_status(http_port: str) -> int:
    """Status of /healthz, 0 when nothing answers."""
    try:
        return get_json(f"http://127.0.0.1:{http_port}/healthz")[0]
    except OSError:
        return 0
