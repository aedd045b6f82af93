"""Start the stack's processes in order, wait for each to answer, and stop them again."""

from __future__ import annotations

import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from service.stack.config import (
    StackError,
    StackPlan,
    ensure_port_free,
    mosquitto_pid_file_for,
    redact_url,
)
from service.stack.mosquitto import MosquittoFiles, write_mosquitto_conf
from service.stack.procs import (
    ProcessSpec,
    Started,
    log_tail,
    signals_held,
    spawn,
    stop_groups,
    tcp_open,
    wait_until,
)
from service.stack.state import ProcessRecord, process_start_ticks, read_state, write_state

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
Say = Callable[[str], None]


@dataclass
class RunningStack:
    """The processes of a started stack, in start order, and where each listens."""

    plan: StackPlan
    processes: list[Started] = field(default_factory=list)
    records: list[ProcessRecord] = field(default_factory=list)

    def add(self, started: Started, address: str) -> None:
        """Remember a started process, in memory and in the state file."""
        self.processes.append(started)
        ticks = process_start_ticks(started.pid) or 0
        self.records.append(ProcessRecord(started.name, started.pid, ticks, address,
                                          str(started.log_file)))
        write_state(self.plan.state_file, self.records)

    def first_exited(self) -> Started | None:
        """A process of ours that has exited, if any."""
        for proc in self.processes:
            if proc.popen is not None and proc.popen.poll() is not None:
                return proc
        return None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> list[tuple[str, bool]]:
        """Stop every process, last started first; (name, stopped by SIGTERM) for each."""
        with signals_held():
            results = stop_in_tiers(list(self.processes), timeout_s)
        self.processes.clear()
        self.records.clear()
        forget_broker_pid(self.plan.mosquitto_pid_file)
        self.plan.state_file.unlink(missing_ok=True)
        return results


def find_program(name: str) -> str:
    """The path of a server binary; sbin directories are searched too (Mosquitto lives there)."""
    path = os.environ.get("PATH", os.defpath) + ":/usr/sbin:/usr/local/sbin:/sbin"
    found = shutil.which(name, path=path)
    if found is None:
        raise StackError(f"{name} is not installed (make setup installs it: "
                         f"bash deploy/install-system-deps.sh)")
    return found


def check_not_running(plan: StackPlan) -> None:
    """Refuse to start twice from one var/; forget a stale state file."""
    alive = [r for r in read_state(plan.state_file) if r.is_ours()]
    if alive:
        pids = ", ".join(f"{r.name} pid {r.pid}" for r in alive)
        raise StackError(f"a stack from {plan.var_dir} is already running ({pids}); "
                         f"stop it with `tinyfleet down --var {plan.var_dir}`")
    plan.state_file.unlink(missing_ok=True)


def check_ports(plan: StackPlan) -> None:
    """Fail before starting anything if one of our ports is taken."""
    if plan.own_redis_port is not None:
        ensure_port_free(plan.own_redis_port, "Redis", "--redis-port or TINYFLEET_REDIS_URL")
    if plan.own_mqtt:
        ensure_port_free(plan.mqtt_port, "MQTT", "--mqtt-port or TINYFLEET_MQTT_URL")
    ensure_port_free(plan.http_port, "HTTP", "--http-port")


def migrate_and_sync(plan: StackPlan) -> MosquittoFiles:
    """Bring the database to the latest schema and write the broker files from the registry."""
    from service import db
    from service.broker_files import sync_broker_files

    db.upgrade(plan.database_url)
    engine = db.make_engine(plan.database_url)
    try:
        with db.make_sessionmaker(engine)() as session:
            sync_broker_files(session, plan.broker_dir, pid_file=None)
    finally:
        engine.dispose()
    return MosquittoFiles.in_dir(plan.broker_dir)


def redis_spec(plan: StackPlan, port: int) -> ProcessSpec:
    """redis-server on loopback, data under var/redis."""
    data_dir = plan.var_dir / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = (find_program("redis-server"), "--port", str(port), "--bind", plan.host,
            "--dir", str(data_dir), "--daemonize", "no", "--save", "300 1",
            "--appendonly", "no", "--logfile", "")
    return ProcessSpec("redis", argv, plan.log_dir / "redis.log")


def mosquitto_spec(plan: StackPlan, files: MosquittoFiles) -> ProcessSpec:
    """mosquitto with our generated config (loopback listener, no anonymous access)."""
    config = write_mosquitto_conf(files, plan.mqtt_port, plan.host)
    return ProcessSpec("mqtt", (find_program("mosquitto"), "-c", str(config)),
                       plan.log_dir / "mosquitto.out")


def web_spec(plan: StackPlan, env: dict[str, str]) -> ProcessSpec:
    """gunicorn serving the app factory."""
    argv = (sys.executable, "-m", "gunicorn", "--bind", f"{plan.host}:{plan.http_port}",
            "--workers", str(plan.web_workers), "--timeout", "120", "--graceful-timeout", "5",
            "--access-logfile", str(plan.log_dir / "web-access.log"),
            "--error-logfile", "-", "service.app:create_app()")
    return ProcessSpec("web", argv, plan.log_dir / "web.log", env=env)


def worker_spec(plan: StackPlan, env: dict[str, str]) -> ProcessSpec:
    """A Celery worker on the stack's Redis."""
    argv = (sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
            "--concurrency", str(plan.worker_concurrency), "--loglevel", "INFO",
            "--hostname", f"tinyfleet-{plan.http_port}@%h", "--without-mingle",
            "--without-gossip")
    return ProcessSpec("worker", argv, plan.log_dir / "worker.log", env=env)


def healthz(plan: StackPlan, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of GET /healthz; (0, b"") when the server does not answer."""
    try:
        with urllib.request.urlopen(plan.http_url + "/healthz", timeout=timeout_s) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def start_stack(plan: StackPlan, say: Say = print) -> RunningStack:
    """Start every component of `plan` and wait until /healthz is green; stop all on failure."""
    plan.var_dir.mkdir(parents=True, exist_ok=True)
    plan.log_dir.mkdir(parents=True, exist_ok=True)
    check_not_running(plan)
    check_ports(plan)
    stack = RunningStack(plan)
    try:
        _start_all(stack, say)
    except BaseException:
        stack.stop()
        raise
    return stack


def _start_all(stack: RunningStack, say: Say) -> None:
    plan = stack.plan
    say(f"database  {redact_url(plan.database_url)}: migrating")
    files = migrate_and_sync(plan)
    if plan.own_redis_port is not None:
        proc = spawn(redis_spec(plan, plan.own_redis_port))
        stack.add(proc, redact_url(plan.redis_url))
        wait_until(lambda: tcp_open(plan.host, plan.own_redis_port or 0), "Redis to listen",
                   START_TIMEOUT_S, [proc])
    if plan.own_mqtt:
        proc = spawn(mosquitto_spec(plan, files))
        stack.add(proc, plan.mqtt_url)
        wait_until(lambda: tcp_open(plan.mqtt_host, plan.mqtt_port)
                   and plan.mosquitto_pid_file.exists(), "Mosquitto to listen",
                   START_TIMEOUT_S, [proc])
    env = plan.child_env(os.environ)
    env["TINYFLEET_AUTO_MIGRATE"] = "0"  # migrated above, once, not by every gunicorn worker
    web = spawn(web_spec(plan, env))
    stack.add(web, plan.http_url)
    worker = spawn(worker_spec(plan, env))
    stack.add(worker, f"celery on {redact_url(plan.redis_url)}")
    wait_until(lambda: healthz(plan)[0] == 200, f"{plan.http_url}/healthz to be green",
               START_TIMEOUT_S, stack.processes)


def stop_stack(var_dir: Path, timeout_s: float = STOP_TIMEOUT_S) -> list[tuple[str, bool]]:
    """Stop the stack recorded in var_dir's state file; (name, stopped by SIGTERM) for each."""
    state_file = var_dir.resolve() / "stack.json"
    records = read_state(state_file)
    results: list[tuple[str, bool]] = []
    with signals_held():
        # A record whose pid is no longer ours is already gone (its pid may be reused).
        results.extend((r.name, True) for r in records if not r.is_ours())
        alive = [Started(r.name, r.pid, Path(r.log_file)) for r in records if r.is_ours()]
        results.extend(stop_in_tiers(alive, timeout_s))
        if any(r.name == "mqtt" for r in records):
            forget_broker_pid(mosquitto_pid_file_for(var_dir.resolve()))
        state_file.unlink(missing_ok=True)
    return results


# The clients (service, worker) stop first, together; then the servers they use, together.
CLIENT_COMPONENTS = ("web", "worker")


def stop_in_tiers(processes: list[Started], timeout_s: float) -> list[tuple[str, bool]]:
    """Stop the web server and worker, then Redis and Mosquitto; (name, by SIGTERM) each."""
    results: list[tuple[str, bool]] = []
    for tier in ([p for p in processes if p.name in CLIENT_COMPONENTS],
                 [p for p in processes if p.name not in CLIENT_COMPONENTS]):
        tier.reverse()  # within a tier, the last started first
        results.extend(zip([p.name for p in tier], stop_groups(tier, timeout_s), strict=True))
    return results


def forget_broker_pid(pid_file: Path) -> None:
    """Remove our stopped broker's pid file: a pid left by a killed Mosquitto may be reused,
    and the registry sends SIGHUP (fatal to most programs) to whatever pid it finds there."""
    pid_file.unlink(missing_ok=True)


def describe(stack: RunningStack) -> str:
    """One line per component: where it listens and where it logs."""
    plan = stack.plan
    own = {r.name: r for r in stack.records}
    rows = [
        ("database", redact_url(plan.database_url),
         "file" if plan.database_url.startswith("sqlite") else "external"),
        ("redis", redact_url(plan.redis_url), _origin(own, "redis")),
        ("mqtt", plan.mqtt_url, _origin(own, "mqtt", plan.broker_dir / "mosquitto.log")),
        ("web", plan.http_url, _origin(own, "web")),
        ("worker", f"celery, {plan.worker_concurrency} process(es)", _origin(own, "worker")),
        ("broker files", str(plan.broker_dir), "password file + ACL from the registry"),
    ]
    width = max(len(where) for _, where, _ in rows) + 2
    return "\n".join(f"  {name:<13}{where:<{width}}{how}" for name, where, how in rows)


def _origin(own: dict[str, ProcessRecord], name: str, log_file: Path | None = None) -> str:
    record = own.get(name)
    if record is None:
        return "external (TINYFLEET_* setting)"
    return f"pid {record.pid}, log {log_file or record.log_file}"


def wait_foreground(stack: RunningStack, poll_s: float = 0.5) -> Started | None:
    """Block until a process of the stack exits (returned) or KeyboardInterrupt is raised."""
    while True:
        exited = stack.first_exited()
        if exited is not None:
            return exited
        time.sleep(poll_s)


__all__ = ["RunningStack", "describe", "healthz", "log_tail", "start_stack", "stop_stack",
           "wait_foreground"]
