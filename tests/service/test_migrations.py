"""The Alembic migrations create exactly the tables the models describe, on both backends."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from service import db
from service.models import Base

pytestmark = pytest.mark.integration


def test_migrated_schema_matches_the_models(db_url: str) -> None:
    engine = db.make_engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            tables = set(inspect(conn).get_table_names())
    finally:
        engine.dispose()
    assert diff == []
    assert {"fleets", "devices", "device_tags", "api_tokens", "alembic_version"} <= tables
    assert db.current_revision(db_url) == db.head_revision()


def test_downgrade_and_upgrade_again(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    db.upgrade(url)
    command.downgrade(db.alembic_config(url), "base")
    assert db.current_revision(url) is None
    db.upgrade(url)
    assert db.current_revision(url) == db.head_revision()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_concurrent_upgrades_take_turns(backend: str, tmp_path: Path,
                                        request: pytest.FixtureRequest) -> None:
    # gunicorn workers each build the app, and so each migrate, at the same moment.
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'c.db'}"
    else:
        url = request.getfixturevalue("postgres_server").create_database("concurrent")
    with ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(db.upgrade, url) for _ in range(4)]:
            future.result()
    assert db.current_revision(url) == db.head_revision()
