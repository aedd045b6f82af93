"""`tinyfleet up`, `tinyfleet down` and `tinyfleet status`: the local stack under var/."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import click

from service.stack import (
    DEFAULT_HTTP_PORT,
    DEFAULT_MQTT_PORT,
    DEFAULT_REDIS_PORT,
    StackError,
    plan_stack,
    start_stack,
    stop_stack,
)
from service.stack.runner import describe, describe_plan
from service.stack.state import read_stack_state
from service.stack.supervisor import Supervisor, detach, raise_interrupt, supervisor_log

var_option = click.option("--var", "var_dir", type=click.Path(file_okay=False, path_type=Path),
                          default=Path("var"), show_default=True,
                          help="Directory for the stack's data, logs, config and state file.")


@click.command()
@click.option("--redis-port", type=int, default=DEFAULT_REDIS_PORT, show_default=True,
              help="Port of our own Redis (ignored when TINYFLEET_REDIS_URL is set).")
@click.option("--mqtt-port", type=int, default=DEFAULT_MQTT_PORT, show_default=True,
              help="Port of our own Mosquitto (ignored when TINYFLEET_MQTT_URL/_HOST is set).")
@click.option("--http-port", type=int, default=DEFAULT_HTTP_PORT, show_default=True,
              help="Port of the service behind gunicorn.")
@click.option("--workers", "worker_concurrency", type=click.IntRange(1, 64), default=1,
              show_default=True, help="Celery worker processes.")
@var_option
@click.option("--detach", is_flag=True,
              help="Return once /healthz is green, leaving a supervisor that restarts what "
                   "exits; stop it with `tinyfleet down`.")
def up(redis_port: int, mqtt_port: int, http_port: int, worker_concurrency: int,
       var_dir: Path, detach: bool) -> None:
    """Start Redis, Mosquitto, the service (gunicorn) and a Celery worker under var/."""
    # Ctrl-C must stop the stack even when our parent started us with SIGINT ignored (as a
    # shell does for `cmd &`, or a process inside a signals_held block): Python then installs
    # no KeyboardInterrupt handler of its own.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        plan = plan_stack(var_dir, redis_port=redis_port, mqtt_port=mqtt_port,
                          http_port=http_port, worker_concurrency=worker_concurrency)
        if detach:
            pid = _detach(plan)
        else:
            stack = start_stack(plan, say=click.echo)
    except StackError as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        raise click.ClickException("interrupted while starting; what had started is stopped") \
            from None
    click.echo("tinyfleet stack is up:")
    if detach:
        click.echo(describe_plan(plan, read_stack_state(plan.state_file).processes))
        click.echo(f"  health       {plan.http_url}/healthz")
        click.echo(f"supervisor pid {pid} restarts what exits (log: "
                   f"{supervisor_log(plan.var_dir)}); status: tinyfleet status --var "
                   f"{plan.var_dir}")
        click.echo(f"stop it with: tinyfleet down --var {plan.var_dir}")
        return
    click.echo(describe(stack))
    click.echo(f"  health       {plan.http_url}/healthz")
    click.echo("Ctrl-C stops everything; a process that exits is restarted.")
    # SIGTERM (e.g. from a service manager or `tinyfleet down`) stops the stack like Ctrl-C.
    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        Supervisor(stack, click.echo).run(threading.Event())
    except KeyboardInterrupt:
        click.echo("\nstopping...")
    finally:
        stack.stop()
    click.echo("stopped.")


def _detach(plan: Any) -> int:
    click.echo(f"starting a supervised stack from {plan.var_dir} ...")
    return detach(plan, click.echo)


@click.command()
@var_option
@click.option("--timeout", "timeout_s", type=float, default=10.0, show_default=True,
              help="Seconds to wait after SIGTERM before SIGKILL.")
def down(var_dir: Path, timeout_s: float) -> None:
    """Stop the stack started by `tinyfleet up` from this var/ directory."""
    try:
        results = stop_stack(var_dir, timeout_s)
    except StackError as exc:
        raise click.ClickException(str(exc)) from exc
    if not results:
        click.echo(f"no stack running from {var_dir.resolve()}")
        return
    for name, graceful in results:
        click.echo(f"  {name:<8} {'stopped' if graceful else 'killed after timeout'}")


@click.command()
@var_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(var_dir: Path, as_json: bool) -> None:
    """Which processes of the stack run, how often each was restarted; exit 1 if one is down."""
    try:
        state = read_stack_state(var_dir.resolve() / "stack.json")
    except StackError as exc:
        raise click.ClickException(str(exc)) from exc
    supervisor = state.supervisor
    rows = [{"name": r.name, "pid": r.pid, "running": r.is_ours(), "restarts": r.restarts,
             "last_exit": r.last_exit, "address": r.address, "log": r.log_file}
            for r in state.processes]
    supervised = supervisor is not None and supervisor.is_ours()
    healthy = supervised and bool(rows) and all(r["running"] for r in rows)
    if as_json:
        click.echo(json.dumps({"var_dir": str(var_dir.resolve()), "running": healthy,
                               "supervisor": {"pid": supervisor.pid, "running": supervised}
                               if supervisor else None, "processes": rows}, indent=2))
    elif supervisor is None and not rows:
        click.echo(f"no stack running from {var_dir.resolve()}")
    else:
        sup = (f"pid {supervisor.pid}, {'running' if supervised else 'GONE'}"
               if supervisor else "none")
        click.echo(f"stack in {var_dir.resolve()}: supervisor {sup}")
        width = max(len(str(r["address"])) for r in rows) + 2 if rows else 10
        for r in rows:
            state_text = "running" if r["running"] else "DOWN"
            last = f", last exit {r['last_exit']}" if r["last_exit"] is not None else ""
            click.echo(f"  {r['name']:<9}{state_text:<9}pid {r['pid']:<8}"
                       f"{r['address']:<{width}}restarts {r['restarts']}{last}")
    if not healthy:
        raise SystemExit(1)
