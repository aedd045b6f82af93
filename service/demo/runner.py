"""Runs the demo's steps in order around a local stack, and always stops the stack."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from service.demo.api import ApiClient
from service.stack import RunningStack, StackPlan


class DemoError(Exception):
    """A demo step found something wrong; the message says what it expected and saw."""


@dataclass
class DemoContext:
    """What the steps share: the stack, an API client, and what earlier steps produced."""

    var_dir: Path
    stack: RunningStack | None = None
    api: ApiClient | None = None
    results: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # the command line's (once, family)
    # What steps started besides the stack (name, stop): stopped first, newest first.
    cleanups: list[tuple[str, Callable[[], bool]]] = field(default_factory=list)

    @property
    def plan(self) -> StackPlan:
        """The running stack's plan (after the first step)."""
        if self.stack is None:
            raise DemoError("the stack is not started")
        return self.stack.plan

    @property
    def client(self) -> ApiClient:
        """The API client (after the token step)."""
        if self.api is None:
            raise DemoError("no API token yet")
        return self.api

    def session(self) -> Any:
        """A database session on the stack's registry (a context manager; the engine is the
        stack's own)."""
        from service import db

        if self.stack is None or self.stack.engine is None:
            raise DemoError("the stack is not started")
        return db.make_sessionmaker(self.stack.engine)()

    def say(self, text: str = "") -> None:
        """Print one line of the demo's output."""
        click.echo(text)


Step = tuple[str, Callable[[DemoContext], None]]


def prepare_var(var_dir: Path) -> None:
    """Start from an empty var dir: the demo registers fixed names and would meet itself."""
    from service.stack import stop_stack

    stop_stack(var_dir)  # a demo interrupted by SIGKILL may have left its stack behind
    shutil.rmtree(var_dir, ignore_errors=True)
    var_dir.mkdir(parents=True)


def run_demo(var_dir: Path, steps: list[Step], options: dict[str, Any] | None = None) -> None:
    """Run `steps` in order; stop what they started and the stack whatever happens;
    DemoError on failure."""
    context = DemoContext(var_dir.resolve(), options=dict(options or {}))
    prepare_var(context.var_dir)
    started = time.monotonic()
    try:
        for number, (title, step) in enumerate(steps, start=1):
            click.secho(f"\n[{number}/{len(steps)}] {title}", bold=True)
            step_start = time.monotonic()
            step(context)
            click.echo(f"    ({time.monotonic() - step_start:.1f} s)")
    finally:
        if context.cleanups:
            click.secho("\nstopping the devices", bold=True)
        for name, stop in reversed(context.cleanups):
            click.echo(f"  {name:<8} {'stopped' if stop() else 'killed after timeout'}")
        if context.stack is not None:
            click.secho("\nstopping the stack", bold=True)
            for name, graceful in context.stack.stop():
                click.echo(f"  {name:<8} {'stopped' if graceful else 'killed after timeout'}")
    click.secho(f"\ndemo finished in {time.monotonic() - started:.1f} s", bold=True)
