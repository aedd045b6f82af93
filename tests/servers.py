"""Real servers for integration tests: redis-server, Mosquitto and a Celery worker.

Each runs on a free port in its own temporary directory, started by the same code that
`tinyfleet up` uses (service.stack), and is stopped (SIGTERM, then SIGKILL) afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.broker_sync import BrokerTarget
from service.stack.config import LOOPBACK, StackPlan, free_port, plan_stack
from service.stack.mosquitto import MosquittoFiles
from service.stack.procs import Started, spawn, stop_group, tcp_open, wait_until
from service.stack.runner import mosquitto_spec, redis_spec, worker_spec

START_TIMEOUT_S = 30.0


def require_program(name: str) -> None:
    """Skip the test when a server binary is missing (`make test` installs them all)."""
    path = os.environ.get("PATH", os.defpath) + ":/usr/sbin:/usr/local/sbin"
    if shutil.which(name, path=path) is None:
        pytest.skip(f"{name} is not installed (bash deploy/install-system-deps.sh)")


def _plan(root: Path, redis_port: int = 16379, mqtt_port: int = 18883) -> StackPlan:
    return plan_stack(root, environ={}, redis_port=redis_port, mqtt_port=mqtt_port,
                      http_port=free_port())


@dataclass(frozen=True)
class RedisServer:
    """A running redis-server."""

    port: int
    url: str
    proc: Started

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL)."""
        stop_group(self.proc, 5.0)


def start_redis(root: Path) -> RedisServer:
    """Start redis-server on a free loopback port, data and log under `root`."""
    require_program("redis-server")
    port = free_port()
    plan = _plan(root, redis_port=port)
    proc = spawn(redis_spec(plan, port))
    try:
        wait_until(lambda: tcp_open(LOOPBACK, port), "redis-server to listen",
                   START_TIMEOUT_S, [proc])
    except BaseException:
        stop_group(proc, 2.0)
        raise
    return RedisServer(port, plan.redis_url, proc)  # with its generated password


@dataclass(frozen=True)
class MosquittoServer:
    """A running Mosquitto with the stack's generated config."""

    port: int
    files: MosquittoFiles
    proc: Started

    @property
    def host(self) -> str:
        """The listener's address (loopback)."""
        return LOOPBACK

    @property
    def target(self) -> BrokerTarget:
        """This broker as the registry keeps it in step (files, pid file, listener)."""
        return BrokerTarget(self.files.broker_dir, self.files.pid_file, LOOPBACK, self.port)

    def reloads(self) -> int:
        """How many times the broker has reloaded its config (SIGHUP) so far."""
        try:
            return self.files.log_file.read_text(errors="replace").count("Reloading config")
        except FileNotFoundError:
            return 0

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL)."""
        stop_group(self.proc, 5.0)


def start_mosquitto(root: Path) -> MosquittoServer:
    """Start Mosquitto on a free loopback port; its auth files live in root/broker (empty at
    first: sync them from a registry with service.broker_sync.full_sync)."""
    require_program("mosquitto")
    port = free_port()
    plan = _plan(root, mqtt_port=port)
    files = MosquittoFiles.in_dir(plan.broker_dir)
    proc = spawn(mosquitto_spec(plan, files))
    try:
        wait_until(lambda: tcp_open(LOOPBACK, port) and files.pid_file.exists(),
                   "mosquitto to listen", START_TIMEOUT_S, [proc])
    except BaseException:
        stop_group(proc, 2.0)
        raise
    return MosquittoServer(port, files, proc)


@dataclass(frozen=True)
class CeleryWorker:
    """A running `celery -A workers.celery_app worker` process."""

    env: Mapping[str, str]
    redis_url: str
    proc: Started

    def stop(self) -> None:
        """Warm shutdown (SIGTERM), SIGKILL after 10 s."""
        stop_group(self.proc, 10.0)


def start_celery_worker(root: Path, redis: RedisServer) -> CeleryWorker:
    """Start a Celery worker on `redis` with its own SQLite database under `root`."""
    plan = _plan(root, redis_port=redis.port)
    env = plan.child_env(os.environ)
    env["TINYFLEET_REDIS_URL"] = redis.url
    proc = spawn(worker_spec(plan, env))
    try:
        wait_until(lambda: _worker_answers(redis.url), "the Celery worker to answer a ping",
                   60.0, [proc])
    except BaseException:
        stop_group(proc, 2.0)
        raise
    return CeleryWorker(env, redis.url, proc)


def _worker_answers(redis_url: str) -> bool:
    from celery import Celery

    from service.queue import celery_settings

    client = Celery("probe")
    client.conf.update(celery_settings(redis_url))
    try:
        return bool(client.control.ping(timeout=0.5, limit=1))
    finally:
        client.close()


def run_cli(args: list[str], env: Mapping[str, str] | None = None, timeout_s: float = 120.0,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run `tinyfleet ARGS` in a fresh interpreter; output captured as text."""
    script = Path(sys.executable).with_name("tinyfleet")
    argv = [str(script)] if script.exists() else [sys.executable, "-c",
                                                  "from service.cli import main; main()"]
    return subprocess.run(
        [*argv, *args],
        env=dict(env) if env is not None else None, cwd=cwd, capture_output=True, text=True,
        timeout=timeout_s, check=False,
    )


def wait_for(predicate: object, timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll a zero-argument callable until it returns truthy or `timeout_s` passes."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())
