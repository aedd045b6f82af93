"""`tinyfleet up` and `tinyfleet down`: the local stack under var/."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType

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
from service.stack.procs import log_tail
from service.stack.runner import describe, wait_foreground

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
              help="Return once /healthz is green; stop later with `tinyfleet down`.")
def up(redis_port: int, mqtt_port: int, http_port: int, worker_concurrency: int,
       var_dir: Path, detach: bool) -> None:
    """Start Redis, Mosquitto, the service (gunicorn) and a Celery worker under var/."""
    try:
        plan = plan_stack(var_dir, redis_port=redis_port, mqtt_port=mqtt_port,
                          http_port=http_port, worker_concurrency=worker_concurrency)
        stack = start_stack(plan, say=click.echo)
    except StackError as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        raise click.ClickException("interrupted while starting; what had started is stopped") \
            from None
    click.echo("tinyfleet stack is up:")
    click.echo(describe(stack))
    click.echo(f"  health       {plan.http_url}/healthz")
    if detach:
        click.echo(f"stop it with: tinyfleet down --var {plan.var_dir}")
        return
    click.echo("Ctrl-C stops everything.")
    # SIGTERM (e.g. from a service manager) stops the stack like Ctrl-C does.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    exited = None
    try:
        exited = wait_foreground(stack)
    except KeyboardInterrupt:
        click.echo("\nstopping...")
    finally:
        stack.stop()
    if exited is not None:
        tail = log_tail(exited.log_file)
        raise click.ClickException(
            f"{exited.name} (pid {exited.pid}) exited; everything is stopped. "
            f"Last lines of {exited.log_file}:\n{tail}")
    click.echo("stopped.")


def _raise_interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


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
