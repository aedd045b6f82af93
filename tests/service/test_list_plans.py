"""At 100,000 devices every list filter reads one index range in id order: no sort of the
filtered set, on SQLite and on PostgreSQL (EXPLAIN), and walking every page returns each
matching device once, in order.

The table is loaded straight with SQL (a small table is planned differently); the list
indexes are built after the rows, from the models' definitions (migrations create the same:
test_migrations), which loads 100k rows several times faster than inserting into them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from service import db
from service.device_list import SAMPLE, list_devices, plan_page
from service.models import Device, DeviceTag
from service.schemas import DeviceQuery
from tests.service.postgres import PostgresServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N = 100_000
MCUS = ("stm32f412", "stm32f746", "stm32h743", "nrf52840", "rp2040", "esp32s3")
LOAD_BUDGET_S = 45.0


@dataclass
class Loaded:
    """A migrated database holding N devices."""

    engine: Engine
    dialect: str

    def session(self) -> Session:
        """A new session on it."""
        return db.make_sessionmaker(self.engine)()


def _load(engine: Engine) -> None:
    pg = engine.dialect.name == "postgresql"
    if pg:
        seq = f"SELECT i FROM generate_series(0, {N - 1}) AS s(i)"
        # A bijection of 0..N-1 onto scattered ids: id order is unrelated to fleet, MCU, tag.
        did = "'dev-' || lpad(to_hex((i::bigint * 2654435761) % 4294967311), 16, '0')"
    else:
        seq = (f"WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s "
               f"WHERE i < {N - 1}) SELECT i FROM s")
        did = "printf('dev-%016x', (i * 2654435761) % 4294967311)"
    mcu = "CASE i % 6 " + " ".join(f"WHEN {k} THEN '{m}'" for k, m in enumerate(MCUS)) + " END"
    indexes = [*Device.__table__.indexes, *DeviceTag.__table__.indexes]
    with engine.begin() as conn:
        for index in indexes:  # built after the rows: much faster than inserting into them
            index.drop(conn)
        for f in range(5):
            conn.execute(text(
                "INSERT INTO fleets (id, name, description, signing_public_key, "
                "signing_key_path, created_at) VALUES (:i, :n, '', 'k', 'p', CURRENT_TIMESTAMP)"),
                {"i": f + 1, "n": f"fleet-{f}"})
        conn.execute(text(
            "INSERT INTO devices (id, name, fleet_id, mcu, cpu, sram_bytes, flash_bytes, "
            "slot_bytes, ota_layout, state, mqtt_password_hash, created_at) "
            f"SELECT {did}, 'd-' || i, i % 5 + 1, {mcu}, 'cortex-m4', 262144, 1048576, "
            "507904, 'ab', CASE WHEN i % 50 = 0 THEN 'decommissioned' ELSE 'active' END, "
            f"NULL, CURRENT_TIMESTAMP FROM ({seq}) AS q ORDER BY 1"))
        # Every device: "bench" and batch-<i % 8>; one device in 1000: "rare".
        conn.execute(text(
            f"INSERT INTO device_tags (device_id, tag) SELECT {did}, 'batch-' || (i % 8) "
            f"FROM ({seq}) AS q ORDER BY 1"))
        conn.execute(text(f"INSERT INTO device_tags (device_id, tag) SELECT {did}, 'bench' "
                          f"FROM ({seq}) AS q ORDER BY 1"))
        conn.execute(text(f"INSERT INTO device_tags (device_id, tag) SELECT {did}, 'rare' "
                          f"FROM ({seq}) AS q WHERE i % 1000 = 7 ORDER BY 1"))
        for index in indexes:
            index.create(conn)
    if pg:  # what autovacuum does after a bulk load: the planner's statistics
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE devices, device_tags"))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Loaded]:
    """A migrated database with N devices on each backend, loaded within LOAD_BUDGET_S."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('plans') / 'plans.db'}"
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        url = server.create_database("plans100k")
    db.upgrade(url)
    engine = db.make_engine(url)
    start = time.monotonic()
    _load(engine)
    assert time.monotonic() - start < LOAD_BUDGET_S
    yield Loaded(engine, engine.dialect.name)
    engine.dispose()


def explain(loaded: Loaded, session: Session, query: DeviceQuery) -> tuple[str, list[str]]:
    """The driver chosen for `query` and its plan, one line per step."""
    plan = plan_page(session, query)
    sql = str(plan.statement.compile(dialect=loaded.engine.dialect,
                                     compile_kwargs={"literal_binds": True}))
    prefix = "EXPLAIN QUERY PLAN " if loaded.dialect == "sqlite" else "EXPLAIN "
    return plan.driver, [str(row[-1]) for row in session.execute(text(prefix + sql))]


CURSOR = "dev-0000000080000000"  # about half way through the ids
# (query, SQLite: the index the walk reads). Every documented filter and combination.
FILTERS: list[tuple[dict[str, object], str]] = [
    ({}, "sqlite_autoindex_devices_1"),
    ({"cursor": CURSOR}, "sqlite_autoindex_devices_1 (id>?)"),
    ({"fleet": "fleet-2"}, "ix_devices_fleet_id (fleet_id=?)"),
    ({"fleet": "fleet-2", "cursor": CURSOR}, "ix_devices_fleet_id (fleet_id=? AND id>?)"),
    ({"mcu": "stm32f746"}, "ix_devices_mcu_id (mcu=?)"),
    ({"state": "active"}, "ix_devices_state_id (state=?)"),
    ({"state": "decommissioned"}, "ix_devices_state_id (state=?)"),
    ({"fleet": "fleet-2", "mcu": "stm32f746"}, "ix_devices_fleet_mcu_id (fleet_id=? AND mcu=?)"),
    ({"fleet": "fleet-2", "state": "active"}, "ix_devices_fleet_state_id"),
    ({"mcu": "rp2040", "state": "active"}, "ix_devices_mcu_state_id (mcu=? AND state=?)"),
    ({"fleet": "fleet-2", "mcu": "stm32f746", "state": "active"},
     "ix_devices_fleet_mcu_state_id (fleet_id=? AND mcu=? AND state=?)"),
    ({"tag": ["batch-3"]}, "ix_device_tags_tag_device (tag=?)"),
    ({"tag": ["batch-3"], "cursor": CURSOR}, "ix_device_tags_tag_device (tag=? AND device_id>?)"),
    ({"tag": ["batch-3", "bench"], "state": "active"}, "ix_device_tags_tag_device (tag=?)"),
    ({"tag": ["rare"], "fleet": "fleet-1"}, "ix_device_tags_tag_device (tag=?)"),
    ({"fleet": "fleet-2", "tag": ["batch-3"], "mcu": "stm32f746"},
     "ix_devices_fleet_mcu_id (fleet_id=? AND mcu=?)"),
    ({"tag": ["bench"], "state": "decommissioned"}, "ix_devices_state_id (state=?)"),
]


@pytest.mark.parametrize(("args", "sqlite_index"), FILTERS,
                         ids=["&".join(f"{k}={v}" for k, v in a.items()) or "all"
                              for a, _ in FILTERS])
def test_every_filter_reads_one_index_range_in_id_order(loaded: Loaded, args: dict[str, object],
                                                        sqlite_index: str) -> None:
    query = DeviceQuery.model_validate({**args, "limit": 100})
    with loaded.session() as session:
        driver, plan = explain(loaded, session, query)
        text_plan = "\n".join(plan)
        if loaded.dialect == "sqlite":
            assert "USE TEMP B-TREE" not in text_plan, text_plan
            assert f"INDEX {sqlite_index}" in plan[0], text_plan
            if driver.startswith("tag:"):  # then each device is one primary-key lookup
                assert "devices USING INDEX sqlite_autoindex_devices_1 (id=?)" in plan[1]
        else:
            assert plan[0].startswith("Limit"), text_plan
            assert "Sort" not in text_plan and "Seq Scan" not in text_plan, text_plan
            assert "Index" in plan[1] or "Join" in plan[1] or "Nested Loop" in plan[1]


def _walk(session: Session, args: dict[str, object], limit: int) -> tuple[list[str], int]:
    ids: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = DeviceQuery.model_validate({**args, "limit": limit,
                                            **({"cursor": cursor} if cursor else {})})
        rows, cursor = list_devices(session, query)
        ids.extend(r.id for r in rows)
        pages += 1
        if cursor is None:
            return ids, pages


@pytest.mark.parametrize("args", [{}, {"tag": ["batch-3", "bench"], "state": "active"},
                                  {"fleet": "fleet-2", "mcu": "stm32f746", "tag": ["batch-3"]}],
                         ids=["all", "two-tags-active", "fleet-mcu-tag"])
def test_walking_every_page_returns_each_match_once_in_order(loaded: Loaded,
                                                             args: dict[str, object]) -> None:
    where = ["1 = 1"]
    if "fleet" in args:
        where.append("fleet_id = 3 AND mcu = 'stm32f746'")
    if "state" in args:
        where.append("state = 'active'")
    for tag in args.get("tag", []):  # type: ignore[attr-defined]
        where.append(f"id IN (SELECT device_id FROM device_tags WHERE tag = '{tag}')")
    with loaded.session() as session:
        expected = list(session.scalars(text(
            f"SELECT id FROM devices WHERE {' AND '.join(where)} ORDER BY id")))
        ids, pages = _walk(session, args, 1000)
    assert ids == expected and len(ids) > 2 * SAMPLE
    assert pages == -(-len(expected) // 1000)  # the last page is full or not: no empty one
