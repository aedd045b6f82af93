"""Alembic environment: migrations run in code from `service.db.upgrade(url)`."""

from __future__ import annotations

from alembic import context

import service.models  # noqa: F401  (registers the tables on Base.metadata)
from service.db import Base, make_engine

target_metadata = Base.metadata


def run_offline() -> None:
    """Emit SQL for the configured URL without connecting."""
    context.configure(url=context.config.get_main_option("sqlalchemy.url"),
                      target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    """Migrate the database at the configured URL (or on the connection handed over)."""
    given = context.config.attributes.get("connection")
    if given is not None:  # service.db.upgrade holds a lock on this connection
        context.configure(connection=given, target_metadata=target_metadata,
                          render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        given.commit()
        return
    engine = make_engine(context.config.get_main_option("sqlalchemy.url") or "")
    try:
        with engine.connect() as connection:
            # SQLite cannot ALTER most things: batch mode rebuilds tables instead.
            context.configure(connection=connection, target_metadata=target_metadata,
                              render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
