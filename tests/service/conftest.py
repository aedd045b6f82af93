"""Fixtures of the service tests: the app on SQLite and on a real PostgreSQL, API tokens of
each role, and a small client that sends them."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import text
from werkzeug.test import TestResponse

from service import db
from service.app import create_app
from service.auth import create_token
from service.models import Role
from tests.service.postgres import PostgresServer, start_postgres

TABLES = ("device_tags", "devices", "fleets", "api_tokens", "idempotency_keys", "job_events",
          "deployment_jobs", "campaigns", "signed_artifacts", "class_builds", "class_plans",
          "model_versions", "device_metrics")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL of our own for the whole session."""
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """A migrated PostgreSQL database, shared by the session (emptied per test)."""
    url = postgres_server.create_database("tinyfleet_test")
    db.upgrade(url)
    return url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file that each test copies (faster than migrating each time)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "template.db"
    db.upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty, migrated database on each backend."""
    if request.param == "sqlite":
        path = tmp_path / "tinyfleet.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    url = request.getfixturevalue("postgres_url")
    yield url
    engine = db.make_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture
def app(db_url: str, tmp_path: Path) -> Iterator[Flask]:
    """The app on `db_url`, its files under a temporary var/."""
    application = create_app({"DATABASE_URL": db_url, "VAR_DIR": str(tmp_path / "var"),
                              "AUTO_MIGRATE": False, "MQTT_PORT": 18883})
    application.testing = True
    yield application
    application.extensions["tinyfleet.engine"].dispose()


@dataclass
class Api:
    """A test client that sends the bearer token of a role."""

    client: FlaskClient
    tokens: dict[Role, str]

    def call(self, method: str, path: str, role: Role | None = Role.ADMIN,
             **kwargs: Any) -> TestResponse:
        """Send a request as `role` (None: no Authorization header)."""
        headers = dict(kwargs.pop("headers", {}))
        if role is not None:
            headers["Authorization"] = f"Bearer {self.tokens[role]}"
        return self.client.open(path, method=method, headers=headers, **kwargs)

    def get(self, path: str, role: Role | None = Role.ADMIN, **kw: Any) -> TestResponse:
        """GET as `role`."""
        return self.call("GET", path, role, **kw)

    def post(self, path: str, role: Role | None = Role.ADMIN, **kw: Any) -> TestResponse:
        """POST as `role`."""
        return self.call("POST", path, role, **kw)


def make_tokens(app: Flask) -> dict[Role, str]:
    """One token of each role, created straight in the database."""
    session = app.extensions["tinyfleet.sessionmaker"]()
    try:
        secrets = {role: create_token(session, role, role.value)[1] for role in Role}
        session.commit()
    finally:
        session.close()
    return secrets


@pytest.fixture
def api(app: Flask) -> Api:
    """An API client with a token of every role."""
    return Api(app.test_client(), make_tokens(app))


def count_rows(app: Flask, table: str) -> int:
    """Rows in `table`."""
    with app.extensions["tinyfleet.engine"].connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def fleet(api: Api, name: str = "greenhouse") -> dict[str, Any]:
    """Create a fleet through the API."""
    response = api.post("/api/v1/fleets", json={"name": name})
    assert response.status_code == 201, response.json
    return dict(response.json or {})
