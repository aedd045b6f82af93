"""`tinyfleet up` / `tinyfleet down` as a user runs them: real processes on free ports."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from click.testing import CliRunner

from service.cli.stack import status as status_cmd
from service.demo.api import ApiClient
from service.queue import celery_settings
from service.stack.config import free_port, redact_url
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


def start_two_ups(var: Path) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    """Two `tinyfleet up --detach` on one var dir, 30 ms apart: (the winner's ports, loser)."""
    script = Path(sys.executable).with_name("tinyfleet")
    launched = []
    for _ in range(2):
        args = ports()
        launched.append((args, subprocess.Popen(
            [str(script), "up", "--detach", "--var", str(var), *args], env=clean_env(),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        time.sleep(0.03)
    done = [(args, subprocess.CompletedProcess(proc.args, proc.wait(180),
                                               *proc.communicate())) for args, proc in launched]
    winners = [(args, r) for args, r in done if r.returncode == 0]
    losers = [r for _, r in done if r.returncode != 0]
    assert len(winners) == 1 and len(losers) == 1, [r.stdout + r.stderr for _, r in done]
    return winners[0][0], losers[0]


def test_up_detach_is_locked_private_supervised_and_down_leaves_nothing(var_dir: Path) -> None:
    args, loser = start_two_ups(var_dir)
    http_port, redis_port, mqtt_port = args[5], args[1], args[3]
    pids = stack_pids(var_dir)
    try:
        # The loser stopped at the lock, before touching anything of the winner's.
        assert "already running or starting" in loser.stderr, loser.stderr
        assert set(pids) == {"redis", "mqtt", "web", "worker", "beat", "bridge"}
        assert all(group_alive(pid) for pid in pids.values())
        assert (var_dir / "broker" / "mosquitto.pid").exists()

        status, body = get_json(f"http://127.0.0.1:{http_port}/healthz")
        assert status == 200, body
        assert {n: c["status"] for n, c in body["components"].items()} == {
            "database": "ok", "redis": "ok", "mqtt": "ok", "worker": "ok"}
        redis_url = redis_with_password(var_dir, redis_port)
        client = Celery("test-client")
        client.conf.update(celery_settings(redis_url))
        try:
            assert client.send_task("tinyfleet.ping", args=["up"]).get(timeout=30)[
                "payload"] == "up"
        finally:
            client.close()

        devices = registry_cli_changes_reach_the_running_broker(var_dir, http_port, mqtt_port)
        conf = (var_dir / "broker" / "mosquitto.conf").read_text()
        assert "allow_anonymous false" in conf and f"listener {mqtt_port} 127.0.0.1" in conf
        only_the_owner_can_read(var_dir)
        crashed_processes_are_restarted(var_dir, http_port, mqtt_port, devices)

        again = run_cli(["up", "--detach", "--var", str(var_dir), *ports()], env=clean_env())
        assert again.returncode != 0 and "already running" in again.stderr
    finally:
        down = run_cli(["down", "--var", str(var_dir)], env=clean_env())
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped" in down.stdout
    assert not any(group_alive(pid) for pid in stack_pids_now(var_dir, pids).values())
    assert not (var_dir / "stack.json").exists()
    gone = CliRunner().invoke(status_cmd, ["--var", str(var_dir)])
    assert gone.exit_code == 1 and "no stack running" in gone.output


def stack_pids_now(var: Path, before: dict[str, int]) -> dict[str, int]:
    """The pids recorded before, plus any restarted process's (the supervisor log names them)."""
    log = (var / "log" / "supervisor.log").read_text()
    restarted = {int(pid) for pid in re.findall(r"restarted: pid (\d+)", log)}
    return before | {f"restarted-{pid}": pid for pid in restarted}


def redis_with_password(var: Path, port: str) -> str:
    """Our Redis refuses a client without the generated password; the URL with it."""
    password_file = var / "redis" / "password"
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    anonymous = redis.Redis(host="127.0.0.1", port=int(port), socket_timeout=5)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    anonymous.close()
    assert password_file.read_text().strip() not in (var / "stack.json").read_text()
    return f"redis://:{password_file.read_text().strip()}@127.0.0.1:{port}/0"


def only_the_owner_can_read(var: Path) -> None:
    """Database (+ -wal, -shm), logs, state file, secrets: 0600, in 0700 folders."""
    for name in ("tinyfleet.db", "tinyfleet.db-wal", "tinyfleet.db-shm", "stack.json",
                 "log/web.log", "log/web-access.log", "log/worker.log", "log/redis.log",
                 "broker/passwords", "broker/mosquitto.log"):
        assert stat.S_IMODE((var / name).stat().st_mode) == 0o600, name
    for path in var.rglob("*"):
        mode = path.lstat().st_mode
        if stat.S_ISREG(mode):
            assert not mode & 0o077, f"{path} is {oct(stat.S_IMODE(mode))}"
        elif stat.S_ISDIR(mode):
            assert stat.S_IMODE(mode) == 0o700, f"{path} is {oct(stat.S_IMODE(mode))}"
    # Mosquitto, started by root, drops to its own user, which must pass through var/.
    assert stat.S_IMODE(var.stat().st_mode) in (0o700, 0o711)


def crashed_processes_are_restarted(var: Path, http_port: str, mqtt_port: str,
                                    devices: dict[str, tuple[str, str]]) -> None:
    """The worker and Mosquitto die, the broker's files with it: both come back, the broker
    rebuilt from the registry (the active device gets in, the decommissioned one does not)."""
    pids = stack_pids(var)
    os.kill(pids["worker"], signal.SIGKILL)
    os.kill(pids["mqtt"], signal.SIGKILL)
    for name in ("passwords", "acl", "dynamic-security.json", "mosquitto.db"):
        (var / "broker" / name).unlink(missing_ok=True)

    def both_back() -> bool:
        rows = {r.name: r for r in read_state(var / "stack.json")}
        return all(rows[name].restarts == 1 and rows[name].state == "running"
                   and rows[name].is_ours() for name in ("worker", "mqtt"))

    assert wait_for(both_back, 30, 0.5), (var / "log" / "supervisor.log").read_text()
    log = (var / "log" / "supervisor.log").read_text()
    assert f"worker (pid {pids['worker']}) exited with status -9" in log
    assert wait_for(lambda: get_status(http_port) == 200, 30, 0.5)
    active, gone = devices["active"], devices["gone"]
    assert _accepted("127.0.0.1", int(mqtt_port), *active)
    assert not _accepted("127.0.0.1", int(mqtt_port), *gone)
    status = CliRunner().invoke(status_cmd, ["--var", str(var), "--json"])
    assert status.exit_code == 0, status.output
    rows = {p["name"]: p for p in json.loads(status.output)["processes"]}
    assert (rows["mqtt"]["restarts"], rows["mqtt"]["last_exit"], rows["web"]["restarts"]) == (
        1, -9, 0)


def registry_cli_changes_reach_the_running_broker(
        var: Path, http_port: str, mqtt_port: str) -> dict[str, tuple[str, str]]:
    """A device registered over HTTP can log in; `tinyfleet devices decommission`, run from
    another shell that knows only the var dir, locks it out of the running broker at once."""
    cli_env = clean_env() | {"TINYFLEET_VAR_DIR": str(var)}
    token = run_cli(["tokens", "create", "--role", "admin"], env=cli_env)
    assert token.returncode == 0, token.stderr
    api = ApiClient(f"http://127.0.0.1:{http_port}", token.stdout.strip())
    api.post("/api/v1/fleets", {"name": "stack"})
    logins = {}
    for name in ("s-1", "s-2"):
        device = api.post("/api/v1/devices", {"name": name, "fleet": "stack", "mcu": "rp2040"})
        logins[name] = (device["mqtt"]["username"], device["mqtt"]["password"])
        assert _accepted("127.0.0.1", int(mqtt_port), *logins[name]), "cannot log in"

    gone = run_cli(["devices", "decommission", logins["s-1"][0]], env=cli_env)
    assert gone.returncode == 0, gone.stderr
    assert not _accepted("127.0.0.1", int(mqtt_port), *logins["s-1"]), "decommissioned, in"
    return {"gone": logins["s-1"], "active": logins["s-2"]}


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
        assert set(pids) == {"mqtt", "web", "worker", "beat", "bridge"}  # Redis: the given one
        database = get_json(f"http://127.0.0.1:{args[5]}/healthz")[1]["components"]["database"]
        assert database["detail"] == "postgresql"  # migrated at start, then used
        assert not (var_dir / "tinyfleet.db").exists()
        proc.send_signal(stop_signal)  # Ctrl-C, or systemd's stop
        output = "".join(lines) + proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert redact_url(redis_server.url) in output and "stopped." in output
    assert redis_server.url not in output  # its password is never printed
    assert not any(group_alive(pid) for pid in pids.values())
    assert not (var_dir / "stack.json").exists()


def get_status(http_port: str) -> int:
    """Status of /healthz, 0 when nothing answers."""
    try:
        return get_json(f"http://127.0.0.1:{http_port}/healthz")[0]
    except OSError:
        return 0
