"""Database engine, sessions and migrations (SQLite by default, PostgreSQL by URL)."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from service.private_files import create_private, private_dir

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


class Base(DeclarativeBase):
    """Declarative base of every tinyfleet table."""


def normalize_url(url: str) -> str:
    """The URL with psycopg 3 as the PostgreSQL driver when none is named."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain):]
    return url


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets gunicorn workers read while one writes; foreign keys are off by default.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for `url`; creates the directory of a SQLite file."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            # It holds password and token hashes: 0600 (SQLite gives -wal/-shm the same mode).
            private_dir(Path(path).parent)
            create_private(Path(path))
        engine = create_engine(url)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded values after commit (views shape them after committing)."""
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str) -> AlembicConfig:
    """An Alembic configuration for `url`, built in code (no alembic.ini needed)."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


# Any fixed number: the PostgreSQL advisory lock every migrating process takes.
_MIGRATION_LOCK_ID = 7_412_001


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at `url` to `revision` (the latest by default).

    Safe to call from several processes at once (gunicorn workers each build the app):
    they take turns, under a file lock for SQLite and an advisory lock for PostgreSQL.
    """
    url = normalize_url(url)
    cfg = alembic_config(url)
    if url.startswith("sqlite"):
        make_engine(url).dispose()  # creates the parent directory
        path = url.split("///", 1)[-1]
        if not path or path == ":memory:":
            command.upgrade(cfg, revision)
            return
        create_private(Path(f"{path}.migrate.lock"))
        with open(f"{path}.migrate.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            command.upgrade(cfg, revision)
        return
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
                conn.commit()
            try:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
            finally:
                if conn.dialect.name == "postgresql":
                    conn.rollback()
                    conn.execute(text("SELECT pg_advisory_unlock(:id)"),
                                 {"id": _MIGRATION_LOCK_ID})
                    conn.commit()
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    """The Alembic revision the database at `url` is at, None when unmigrated."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def init_app(app: Any, url: str) -> None:
    """Attach an engine and a session factory to a Flask app; close sessions per request."""
    engine = make_engine(url)
    app.extensions["tinyfleet.engine"] = engine
    app.extensions["tinyfleet.sessionmaker"] = make_sessionmaker(engine)
    app.teardown_appcontext(_close_session)


def request_session() -> Session:
    """The session of the current app context, opened on first use."""
    from flask import current_app, g

    if "db_session" not in g:
        g.db_session = current_app.extensions["tinyfleet.sessionmaker"]()
    session: Session = g.db_session
    return session


def _close_session(_exc: BaseException | None) -> None:
    from flask import g

    session = g.pop("db_session", None)
    if session is not None:
        session.close()


def head_revision() -> str:
    """The newest migration's revision id."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None, f"no migrations in {MIGRATIONS_DIR}"
    return head
