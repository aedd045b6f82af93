"""What the registry's CLI commands share: the app's settings and a database session.

The CLI is the administrator's local tool: it works on the database directly (that is how
the first admin token comes to exist), with the same settings as the service (TINYFLEET_*).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click
from flask import Flask
from sqlalchemy.orm import Session

from service.problems import ApiError
from service.registry import RegistryContext


def load_app() -> Flask:
    """The app built from the environment (migrating the database if needed)."""
    from service.app import create_app

    return create_app()


@contextmanager
def app_session() -> Iterator[tuple[Flask, Session]]:
    """The app and a session on its database, closed afterwards."""
    app = load_app()
    session = app.extensions["tinyfleet.sessionmaker"]()
    try:
        yield app, session
    finally:
        session.close()
        app.extensions["tinyfleet.engine"].dispose()


def registry_context(app: Flask) -> RegistryContext:
    """Key, broker and pid-file locations from the app's settings."""
    return RegistryContext.from_config(app.config)


def echo_json(data: Any) -> None:
    """Print `data` as indented JSON."""
    click.echo(json.dumps(data, indent=2, sort_keys=False))


def fail(err: ApiError, as_json: bool, first_line: int | None = None) -> NoReturn:
    """Report an ApiError (every field) and exit with status 1.

    With `first_line`, row indices are shown as file lines (row 0 is line `first_line`).
    """
    def where(index: int | None) -> str:
        if index is None:
            return ""
        return f"line {index + first_line}: " if first_line is not None else f"row {index}: "

    if as_json:
        errors = []
        for e in err.errors:
            item = e.to_json()
            if first_line is not None and e.index is not None:
                item["line"] = e.index + first_line
            errors.append(item)
        echo_json({"status": err.status, "detail": err.detail, "errors": errors})
    else:
        click.echo(f"error: {err.detail}", err=True)
        for e in err.errors[:50]:
            click.echo(f"  {where(e.index)}{e.field}: {e.message}", err=True)
        if len(err.errors) > 50:
            click.echo(f"  ... and {len(err.errors) - 50} more", err=True)
    raise SystemExit(1)
