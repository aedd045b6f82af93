"""The table of processes the stack runs: how each starts, when it is ready, where it listens.

Servers (Redis, Mosquitto) start first and stop last; clients (the web server, the Celery
worker, and whatever later rows add: an MQTT bridge, Celery beat) start after them and stop
first. The supervisor (service/stack/supervisor.py) starts the rows in order and restarts any
that exits. To run one more process under `tinyfleet up`, add a row to `PROCESS_TABLE`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from service.private_files import private_dir, write_private
from service.stack.config import StackError, StackPlan, redact_url
from service.stack.mosquitto import MosquittoFiles, write_mosquitto_conf
from service.stack.procs import ProcessSpec, tcp_open

Env = Mapping[str, str]


@dataclass(frozen=True)
class Supervised:
    """One row: a process of the stack."""

    name: str
    client: bool  # uses the servers: started after them, stopped before them
    spec: Callable[[StackPlan, Env], ProcessSpec]
    address: Callable[[StackPlan], str]
    wanted: Callable[[StackPlan], bool] = lambda _plan: True
    # Polled after each start until true (the start fails if the process exits first).
    ready: Callable[[StackPlan], bool] | None = None
    # Held from before the process is spawned until it is ready (the broker: rebuilt from
    # the database under the registry's broker lock, so no change is missed in between).
    prepare: Callable[[StackPlan, Engine], contextlib.AbstractContextManager[None]] | None = None
    # Called by the supervisor every few seconds while the process runs (the broker: is its
    # auth state still ours? else rebuild it from the database).
    watch: Callable[[StackPlan, Engine], None] | None = None


def find_program(name: str) -> str:
    """The path of a server binary; sbin directories are searched too (Mosquitto lives there)."""
    path = os.environ.get("PATH", os.defpath) + ":/usr/sbin:/usr/local/sbin:/sbin"
    found = shutil.which(name, path=path)
    if found is None:
        raise StackError(f"{name} is not installed (make setup installs it: "
                         f"bash deploy/install-system-deps.sh)")
    return found


def render_redis_conf(plan: StackPlan, port: int, data_dir: Path) -> str:
    """redis.conf: loopback only, a password, data under var/redis."""
    lines = [f"port {port}", f"bind {plan.host}", "protected-mode yes",
             f"dir {data_dir}", "daemonize no", "save 300 1", "appendonly no", 'logfile ""']
    if plan.own_redis_password:
        # In a 0600 file, not on the command line, which every user can read in /proc.
        lines.append(f"requirepass {plan.own_redis_password}")
    return "\n".join(lines) + "\n"


def redis_spec(plan: StackPlan, port: int) -> ProcessSpec:
    """redis-server on loopback with a password, data under var/redis."""
    data_dir = private_dir(plan.var_dir / "redis")
    conf = data_dir / "redis.conf"
    write_private(conf, render_redis_conf(plan, port, data_dir))
    return ProcessSpec("redis", (find_program("redis-server"), str(conf)),
                       plan.log_dir / "redis.log")


def mosquitto_spec(plan: StackPlan, files: MosquittoFiles) -> ProcessSpec:
    """mosquitto with our generated config (loopback listener, no anonymous access)."""
    config = write_mosquitto_conf(files, plan.mqtt_port, plan.host)
    return ProcessSpec("mqtt", (find_program("mosquitto"), "-c", str(config)),
                       plan.log_dir / "mosquitto.out")


def web_spec(plan: StackPlan, env: Env) -> ProcessSpec:
    """gunicorn serving the app factory."""
    argv = (sys.executable, "-m", "gunicorn", "--config", "python:service.gunicorn_conf",
            "--bind", f"{plan.host}:{plan.http_port}",
            "--workers", str(plan.web_workers), "--timeout", "120", "--graceful-timeout", "5",
            "--access-logfile", str(plan.log_dir / "web-access.log"),
            "--error-logfile", "-", "service.app:create_app()")
    return ProcessSpec("web", argv, plan.log_dir / "web.log", env=env)


def worker_spec(plan: StackPlan, env: Env) -> ProcessSpec:
    """A Celery worker on the stack's Redis."""
    argv = (sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
            "--concurrency", str(plan.worker_concurrency), "--loglevel", "INFO",
            "--hostname", f"tinyfleet-{plan.http_port}@%h", "--without-mingle",
            "--without-gossip")
    return ProcessSpec("worker", argv, plan.log_dir / "worker.log", env=env)


def beat_spec(plan: StackPlan, env: Env) -> ProcessSpec:
    """Celery beat: runs the campaign reconciler every RECONCILE_INTERVAL_S."""
    argv = (sys.executable, "-m", "celery", "-A", "workers.celery_app", "beat",
            "--loglevel", "INFO", "--schedule", str(plan.var_dir / "celerybeat-schedule"))
    return ProcessSpec("beat", argv, plan.log_dir / "beat.log", env=env)


def bridge_spec(plan: StackPlan, env: Env) -> ProcessSpec:
    """The MQTT bridge (workers.bridge) with the database sink (workers.sink)."""
    argv = (sys.executable, "-m", "workers.bridge", "--sink", "workers.sink:database_sink")
    return ProcessSpec("bridge", argv, plan.log_dir / "bridge.log", env=env)


def healthz(plan: StackPlan, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of GET /healthz; (0, b"") when the server does not answer."""
    try:
        with urllib.request.urlopen(plan.http_url + "/healthz", timeout=timeout_s) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


@contextlib.contextmanager
def broker_rebuilt(plan: StackPlan, engine: Engine) -> Iterator[None]:
    """The broker's files from the database, held under the registry's broker lock."""
    from service.broker_sync import broker_lock, prepare_start

    with broker_lock(engine, plan.broker_dir):
        prepare_start(engine, plan.broker_dir)
        yield


def broker_in_step(plan: StackPlan, engine: Engine) -> None:
    """Rebuild our broker's auth state from the database if it has lost it."""
    from service.broker_sync import BrokerTarget, ensure_in_step

    ensure_in_step(engine, BrokerTarget(plan.broker_dir, plan.mosquitto_pid_file,
                                        plan.mqtt_host, plan.mqtt_port))


def _mqtt_ready(plan: StackPlan) -> bool:
    files = MosquittoFiles.in_dir(plan.broker_dir)
    socket_ok = not files.has_socket_listener or files.socket_file.is_socket()
    return tcp_open(plan.mqtt_host, plan.mqtt_port) and files.pid_file.exists() and socket_ok


PROCESS_TABLE: tuple[Supervised, ...] = (
    Supervised(
        "redis", client=False,
        spec=lambda plan, _env: redis_spec(plan, plan.own_redis_port or 0),
        address=lambda plan: redact_url(plan.redis_url),
        wanted=lambda plan: plan.own_redis_port is not None,
        ready=lambda plan: tcp_open(plan.host, plan.own_redis_port or 0)),
    Supervised(
        "mqtt", client=False,
        spec=lambda plan, _env: mosquitto_spec(plan, MosquittoFiles.in_dir(plan.broker_dir)),
        address=lambda plan: plan.mqtt_url,
        wanted=lambda plan: plan.own_mqtt,
        ready=_mqtt_ready,
        prepare=broker_rebuilt,
        watch=broker_in_step),
    Supervised("web", client=True, spec=web_spec, address=lambda plan: plan.http_url),
    Supervised("worker", client=True, spec=worker_spec,
               address=lambda plan: f"celery on {redact_url(plan.redis_url)}"),
    Supervised("beat", client=True, spec=beat_spec,
               address=lambda plan: "celery beat: the campaign reconciler"),
    Supervised("bridge", client=True, spec=bridge_spec,
               address=lambda plan: f"MQTT bridge on {plan.mqtt_url}"),
)


def client_names(table: tuple[Supervised, ...] = PROCESS_TABLE) -> frozenset[str]:
    """Names of the rows that are clients of the servers (stopped first)."""
    return frozenset(row.name for row in table if row.client)
