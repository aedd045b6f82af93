"""Start the stack's processes in order under the var dir's lock, and stop them again."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from sqlalchemy import Engine

from service.private_files import PRIVATE_DIR, PRIVATE_FILE, TRAVERSABLE_DIR, private_dir
from service.stack.config import (
    StackError,
    StackPlan,
    ensure_port_free,
    mosquitto_pid_file_for,
    redact_url,
)
from service.stack.lock import VarLock
from service.stack.mosquitto import broker_user
from service.stack.procs import (
    Started,
    log_tail,
    signals_held,
    spawn,
    stop_groups,
    wait_until,
)
from service.stack.state import (
    ProcessRecord,
    StackState,
    process_start_ticks,
    read_stack_state,
    write_state,
)
from service.stack.table import (
    PROCESS_TABLE,
    Supervised,
    client_names,
    find_program,
    healthz,
    mosquitto_spec,
    redis_spec,
    web_spec,
    worker_spec,
)

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
Say = Callable[[str], None]


@dataclass
class RunningStack:
    """The processes of a started stack, in start order, and the lock that makes it ours."""

    plan: StackPlan
    lock: VarLock
    engine: Engine | None = None
    table: tuple[Supervised, ...] = PROCESS_TABLE
    processes: list[Started] = field(default_factory=list)
    records: list[ProcessRecord] = field(default_factory=list)
    supervisor: ProcessRecord | None = None
    env: dict[str, str] = field(default_factory=dict)
    started_at: dict[str, float] = field(default_factory=dict)

    def row(self, name: str) -> Supervised:
        """The table row called `name`."""
        return next(r for r in self.table if r.name == name)

    def add(self, started: Started, address: str) -> None:
        """Remember a started process, in memory and in the state file."""
        self.processes.append(started)
        self.records.append(_record(started, address))
        self.started_at[started.name] = time.monotonic()
        self.save()

    def replace_process(self, started: Started) -> None:
        """A restarted process takes its predecessor's place (and restart count)."""
        i = next(i for i, p in enumerate(self.processes) if p.name == started.name)
        old = self.records[i]
        self.processes[i] = started
        self.records[i] = replace(_record(started, old.address), restarts=old.restarts + 1,
                                  last_exit=old.last_exit)
        self.started_at[started.name] = time.monotonic()
        self.save()

    def mark_exited(self, name: str, status: int | None) -> None:
        """Record that `name` exited with `status` and waits for its restart."""
        i = next(i for i, p in enumerate(self.processes) if p.name == name)
        self.records[i] = replace(self.records[i], last_exit=status, state="restarting")
        self.save()

    def save(self) -> None:
        """Write the state file (only the lock holder does)."""
        write_state(self.plan.state_file, self.records, self.supervisor)

    def first_exited(self) -> Started | None:
        """A process of ours that has exited, if any."""
        for proc in self.processes:
            if proc.popen is not None and proc.popen.poll() is not None:
                return proc
        return None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> list[tuple[str, bool]]:
        """Stop every process, clients first; remove what this start created; unlock."""
        try:
            with signals_held():
                results = stop_in_tiers(list(self.processes), timeout_s, client_names(self.table))
            self.processes.clear()
            self.records.clear()
            if any(r.name == "mqtt" for r in self.table) and self.plan.own_mqtt:
                forget_broker_pid(self.plan.mosquitto_pid_file)
            self.plan.state_file.unlink(missing_ok=True)
        finally:
            if self.engine is not None:
                self.engine.dispose()
            self.lock.release()
        return results


def _record(started: Started, address: str) -> ProcessRecord:
    ticks = process_start_ticks(started.pid) or 0
    return ProcessRecord(started.name, started.pid, ticks, address, str(started.log_file))


def supervisor_record(address: str = "supervisor") -> ProcessRecord:
    """This process, as the state file names the stack's supervisor."""
    pid = os.getpid()
    return ProcessRecord("supervisor", pid, process_start_ticks(pid) or 0, address, "")


def check_not_running(plan: StackPlan) -> None:
    """Under the lock: refuse when processes of an earlier stack still run; forget a stale file.

    Its supervisor is gone (it held the lock), but what it started may have survived it.
    """
    alive = [r for r in read_stack_state(plan.state_file).processes if r.is_ours()]
    if alive:
        pids = ", ".join(f"{r.name} pid {r.pid}" for r in alive)
        raise StackError(f"a stack from {plan.var_dir} is already running ({pids}) without "
                         f"its supervisor; stop it with `tinyfleet down --var {plan.var_dir}`")
    plan.state_file.unlink(missing_ok=True)


def check_ports(plan: StackPlan) -> None:
    """Fail before starting anything if one of our ports is taken."""
    if plan.own_redis_port is not None:
        ensure_port_free(plan.own_redis_port, "Redis", "--redis-port or TINYFLEET_REDIS_URL")
    if plan.own_mqtt:
        ensure_port_free(plan.mqtt_port, "MQTT", "--mqtt-port or TINYFLEET_MQTT_URL")
    ensure_port_free(plan.http_port, "HTTP", "--http-port")


def var_dir_mode(plan: StackPlan) -> int:
    """0700, or 0711 when our Mosquitto drops to its own user, which must pass through."""
    if plan.own_mqtt and broker_user(plan.var_dir)[1] is not None:
        return TRAVERSABLE_DIR
    return PRIVATE_DIR


def prepare_var(plan: StackPlan) -> None:
    """The var dir and its log dir, private; files an older version left readable, tightened."""
    private_dir(plan.var_dir, var_dir_mode(plan))
    private_dir(plan.log_dir, PRIVATE_DIR)
    from service.metrics import prepare_multiproc_dir

    prepare_multiproc_dir(plan.metrics_dir)  # an earlier run's counts would be summed in
    me = os.geteuid()
    candidates = [plan.var_dir / f"tinyfleet.db{suffix}"
                  for suffix in ("", "-wal", "-shm", ".migrate.lock")]
    candidates += list(plan.log_dir.iterdir())
    for path in candidates:
        with contextlib.suppress(FileNotFoundError):
            st = path.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_uid == me and st.st_mode & 0o077:
                os.chmod(path, PRIVATE_FILE)


def migrate(plan: StackPlan) -> Engine:
    """Bring the database to the latest schema; an engine for the broker's lock and rebuild."""
    from service import db

    db.upgrade(plan.database_url)
    return db.make_engine(plan.database_url)


def launch(stack: RunningStack, row: Supervised) -> Started:
    """Start one row's process and wait until it is ready (its `prepare` held throughout)."""
    plan = stack.plan
    assert stack.engine is not None
    hold = row.prepare(plan, stack.engine) if row.prepare else contextlib.nullcontext()
    with hold:
        proc = spawn(row.spec(plan, stack.env))
        if row.ready is not None:
            check = row.ready
            try:
                wait_until(lambda: check(plan), f"{row.name} to answer", START_TIMEOUT_S, [proc])
            except BaseException:
                stop_groups([proc], 2.0)
                raise
    return proc


def start_stack(plan: StackPlan, say: Say = print, lock: VarLock | None = None,
                table: tuple[Supervised, ...] = PROCESS_TABLE) -> RunningStack:
    """Start every row of `table` in order and wait until /healthz is green.

    Takes the var dir's lock first (or uses `lock`, already taken); on failure, stops what
    it started, removes only the files this start created, and releases the lock.
    """
    lock = lock if lock is not None else VarLock(_ensure_var(plan)).acquire()
    stack = RunningStack(plan, lock, table=table, supervisor=supervisor_record())
    try:
        prepare_var(plan)
        check_not_running(plan)
        check_ports(plan)
        stack.save()  # the supervisor first: `down` can stop a stack that is still starting
        _start_all(stack, say)
    except BaseException:
        stack.stop()
        raise
    return stack


def _ensure_var(plan: StackPlan) -> Path:
    plan.var_dir.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    return plan.var_dir


def _start_all(stack: RunningStack, say: Say) -> None:
    plan = stack.plan
    say(f"database  {redact_url(plan.database_url)}: migrating")
    stack.engine = migrate(plan)
    env = plan.child_env(os.environ)
    env["TINYFLEET_AUTO_MIGRATE"] = "0"  # migrated above, once, not by every gunicorn worker
    stack.env = env
    for row in stack.table:
        if row.wanted(plan):
            stack.add(launch(stack, row), row.address(plan))
    wait_until(lambda: healthz(plan)[0] == 200, f"{plan.http_url}/healthz to be green",
               START_TIMEOUT_S, stack.processes)


def stop_stack(var_dir: Path, timeout_s: float = STOP_TIMEOUT_S) -> list[tuple[str, bool]]:
    """Stop the stack recorded in var_dir's state file; (name, stopped by SIGTERM) for each.

    A live supervisor is asked (SIGTERM) and does it; without one, the recorded process
    groups are stopped here.
    """
    var_dir = var_dir.resolve()
    if not var_dir.is_dir():
        return []
    state_file = var_dir / "stack.json"
    state = read_stack_state(state_file)
    if state.supervisor is not None and state.supervisor.is_ours():
        _stop_supervisor(state, timeout_s)
    # What is left is removed only under the lock: a stack that starts meanwhile owns the
    # state file it writes, and nothing here may touch it.
    lock = VarLock(var_dir)
    try:
        lock.acquire()
    except StackError:
        return [(r.name, not r.is_ours()) for r in state.processes]
    try:
        with signals_held():
            # Records as read before the supervisor stopped (it removes the file), plus any
            # a supervisor killed mid-start left behind.
            records = {r.name: r for r in read_stack_state(state_file).processes}
            records.update({r.name: r for r in state.processes})
            # A record whose pid is no longer ours is already gone (its pid may be reused).
            results = [(r.name, True) for r in records.values() if not r.is_ours()]
            alive = [Started(r.name, r.pid, Path(r.log_file)) for r in records.values()
                     if r.is_ours()]
            results.extend(stop_in_tiers(alive, timeout_s, client_names()))
            if "mqtt" in records:
                forget_broker_pid(mosquitto_pid_file_for(var_dir))
            state_file.unlink(missing_ok=True)
    finally:
        lock.release()
    order = {name: i for i, name in enumerate(records)}
    return sorted(results, key=lambda item: -order.get(item[0], 0))


def _stop_supervisor(state: StackState, timeout_s: float) -> None:
    """SIGTERM the supervisor and wait while it stops its processes (SIGKILL if it hangs)."""
    assert state.supervisor is not None
    pid = state.supervisor.pid
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    # It stops clients, then servers, each tier with `timeout_s` before SIGKILL.
    deadline = time.monotonic() + 2 * timeout_s + 15.0
    while state.supervisor.is_ours() and time.monotonic() < deadline:
        time.sleep(0.05)
    if state.supervisor.is_ours():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def stop_in_tiers(processes: list[Started], timeout_s: float,
                  clients: frozenset[str]) -> list[tuple[str, bool]]:
    """Stop the clients (web, worker, ...), then the servers; (name, by SIGTERM) each."""
    results: list[tuple[str, bool]] = []
    for tier in ([p for p in processes if p.name in clients],
                 [p for p in processes if p.name not in clients]):
        tier.reverse()  # within a tier, the last started first
        results.extend(zip([p.name for p in tier], stop_groups(tier, timeout_s), strict=True))
    return results


def forget_broker_pid(pid_file: Path) -> None:
    """Remove our stopped broker's pid file: a pid left by a killed Mosquitto may be reused,
    and the registry sends SIGHUP (fatal to most programs) to whatever pid it finds there."""
    pid_file.unlink(missing_ok=True)


def describe_plan(plan: StackPlan, records: list[ProcessRecord]) -> str:
    """One line per component: where it listens and where it logs."""
    own = {r.name: r for r in records}
    rows = [
        ("database", redact_url(plan.database_url),
         "file" if plan.database_url.startswith("sqlite") else "external"),
        ("redis", redact_url(plan.redis_url), _origin(own, "redis")),
        ("mqtt", plan.mqtt_url, _origin(own, "mqtt", plan.broker_dir / "mosquitto.log")),
        ("web", plan.http_url, _origin(own, "web")),
        ("worker", f"celery, {plan.worker_concurrency} process(es)", _origin(own, "worker")),
    ]
    known = {name for name, _, _ in rows}
    rows += [(r.name, r.address, _origin(own, r.name)) for r in records if r.name not in known]
    rows.append(("broker auth", str(plan.broker_dir),
                 "base password file + live dynamic-security layer, from the registry"))
    width = max(len(where) for _, where, _ in rows) + 2
    return "\n".join(f"  {name:<13}{where:<{width}}{how}" for name, where, how in rows)


def describe(stack: RunningStack) -> str:
    """`describe_plan` for a stack started by this process."""
    return describe_plan(stack.plan, stack.records)


def _origin(own: dict[str, ProcessRecord], name: str, log_file: Path | None = None) -> str:
    record = own.get(name)
    if record is None:
        return "external (TINYFLEET_* setting)"
    return f"pid {record.pid}, log {log_file or record.log_file}"


__all__ = ["RunningStack", "describe", "describe_plan", "find_program", "healthz",
           "log_tail", "mosquitto_spec", "redis_spec", "start_stack", "stop_stack",
           "web_spec", "worker_spec"]
