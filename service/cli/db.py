"""`tinyfleet db upgrade|current`: run the Alembic migrations."""

from __future__ import annotations

import click

from service import db as dbmod
from service.config import load_config


@click.group()
def db() -> None:
    """Database schema migrations (TINYFLEET_DATABASE_URL, default var/tinyfleet.db)."""


@db.command("upgrade")
@click.option("--url", default=None, help="database URL (default: the service's)")
@click.option("--revision", default="head", show_default=True)
def upgrade(url: str | None, revision: str) -> None:
    """Bring the database schema to REVISION."""
    url = url or load_config({"AUTO_MIGRATE": False})["DATABASE_URL"]
    dbmod.upgrade(url, revision)
    click.echo(f"database at revision {dbmod.current_revision(url)}")


@db.command("current")
@click.option("--url", default=None, help="database URL (default: the service's)")
def current(url: str | None) -> None:
    """Print the schema revision of the database."""
    url = url or load_config({"AUTO_MIGRATE": False})["DATABASE_URL"]
    click.echo(dbmod.current_revision(url) or "(empty: run `tinyfleet db upgrade`)")
