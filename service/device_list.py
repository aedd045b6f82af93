"""Device lists at 100,000 devices: every filter, and every page, reads one index range.

A page is "devices matching the filters, after the cursor, by id, the first `limit`". It is
served by walking one index in id order and stopping after `limit + 1` matches, never by
sorting all matches:

- fleet / mcu / state (any combination): the devices index on (those columns..., id);
- tags: device_tags' (tag, device_id) index lists a tag's devices in id order; the other
  filters are checked on each device found (a primary-key lookup).

With tags, the walk may start from a tag or from the devices index. PostgreSQL's planner
chooses (its statistics make it merge the two ordered indexes). SQLite has no statistics,
so the choice is made here, in one small query (`_estimates`): for each candidate walk, its
size (counted up to COUNT_CAP index entries) and how many of its first SAMPLE entries pass
the other filters; the walk expected to read the fewest entries wins, and is remembered for
CHOICE_TTL_S per filter (a listing's pages share it). The SQLite statement
then states the other filters in a form no index serves (Filters.opaque), so that its
planner follows the chosen walk instead of walking a devices index and sorting.

A walk reads about (limit + 1) / (share of its entries that pass), at most its size. Filters
that never meet (a tag no device of that fleet has) make a page read a whole range:
tests/service/test_list_plans.py shows the plans at 100k devices; BENCHMARKS.md the times.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, String, exists, func, select, text, type_coerce
from sqlalchemy.orm import Session, aliased

from service.models import Device, DeviceState, DeviceTag, Fleet
from service.problems import ApiError, FieldError
from service.schemas import DeviceQuery

COUNT_CAP = 1000  # entries counted per candidate walk, at most
SAMPLE = 100  # first entries of a candidate walk checked against the other filters
# SQLite's choice of walk is remembered per filter for a while: the pages of one listing
# (and repeated listings) share it. Any walk returns the right page; only speed depends on it.
CHOICE_TTL_S = 10.0
CHOICES_KEPT = 1024
_CHOICES: dict[tuple[object, ...], tuple[str, float]] = {}

_TAGS = (select(func.aggregate_strings(DeviceTag.tag, " "))
         .where(DeviceTag.device_id == Device.id).correlate(Device).scalar_subquery())
# Plain columns of a page, with each device's tags read through device_tags' primary key
# (also the dashboard's name search: service.dashboard.fleet).
ROW_COLUMNS = (Device.id, Device.name, Device.fleet_id, Device.mcu, Device.cpu,
               Device.sram_bytes, Device.flash_bytes, Device.slot_bytes, Device.ota_layout,
               Device.state, Device.created_at, _TAGS, Device.installed_model_version,
               Device.online, Device.last_seen_at, Device.backend)


@dataclass(slots=True)  # not frozen: a frozen init costs more than the query per row
class DeviceRow:
    """A device as listed: plain values read with one query (ORM objects cost ~5x more)."""

    id: str
    name: str
    fleet_name: str
    mcu: str
    cpu: str
    sram_bytes: int
    flash_bytes: int
    slot_bytes: int
    ota_layout: str
    state: DeviceState
    created_at: datetime
    tags: list[str]
    # What the device reported (OTA events, MQTT presence through the bridge).
    installed_model_version: str | None = None
    online: bool = False
    last_seen_at: datetime | None = None
    backend: str | None = None  # None: it did not say (qemu)

    @property
    def mqtt_username(self) -> str:
        """The MQTT username: the device id."""
        return self.id


@dataclass(frozen=True)
class ListPlan:
    """The statement of one page and the index range it walks."""

    statement: Select[tuple[object, ...]]
    driver: str  # "devices" (the (filters..., id) index) or "tag:<tag>"


@dataclass(frozen=True)
class Filters:
    """The equality filters on devices' own columns."""

    fleet_id: int | None = None
    mcu: str | None = None
    state: DeviceState | None = None

    def indexed(self) -> list[ColumnElement[bool]]:
        """The conditions, as the (filters..., id) indexes serve them."""
        out: list[ColumnElement[bool]] = []
        if self.fleet_id is not None:
            out.append(Device.fleet_id == self.fleet_id)
        if self.mcu is not None:
            out.append(Device.mcu == self.mcu)
        if self.state is not None:
            out.append(Device.state == self.state)
        return out

    def values(self) -> dict[str, Any]:
        """Column -> wanted value (None: not filtered), as stored."""
        return {"fleet_id": self.fleet_id, "mcu": self.mcu,
                "state": None if self.state is None else self.state.value}

    def opaque(self) -> list[ColumnElement[bool]]:
        """The same conditions written so that no index can serve them (`x + 0`, `x || ''`).

        For SQLite, whose planner has no statistics: checked on rows found through a tag,
        they cannot lure it into walking a devices index and sorting every match.
        PostgreSQL gets the plain conditions: its statistics-based planner merges the tag
        and devices indexes in id order, and an opaque condition would ruin its estimates.
        """
        out: list[ColumnElement[bool]] = []
        if self.fleet_id is not None:
            out.append(Device.fleet_id + 0 == self.fleet_id)
        if self.mcu is not None:
            out.append(Device.mcu.concat("") == self.mcu)
        if self.state is not None:
            out.append(type_coerce(Device.state, String).concat("") == self.state.value)
        return out


def device_filters(session: Session, fleet: str | None, mcu: str | None,
                   state: DeviceState | None) -> Filters:
    """The filters on devices' own columns; 422 for a fleet that does not exist."""
    fleet_id = None
    if fleet is not None:
        fleet_id = session.scalar(select(Fleet.id).where(Fleet.name == fleet))
        if fleet_id is None:
            raise ApiError(422, f"fleet: no fleet named {fleet!r}",
                           [FieldError("fleet", f"no fleet named {fleet!r}")])
    return Filters(fleet_id, mcu, state)


def has_tag(tag: str, device_id: Any = Device.id) -> ColumnElement[bool]:
    """The device has `tag` (a lookup in device_tags' primary key)."""
    other = aliased(DeviceTag)
    return exists().where(other.device_id == device_id, other.tag == tag)


def tag_of(driver: str) -> str:
    """The tag a "tag:<tag>" driver walks."""
    return driver.removeprefix("tag:")


_OPAQUE = {"fleet_id": "+ 0", "mcu": "|| ''", "state": "|| ''"}  # as Filters.opaque()


def _estimate_sql(filters: Filters, tags: list[str], after: str | None,
                  drivers: list[str]) -> str:
    """SQLite: for each driver, its size (up to COUNT_CAP) and the hits among its first
    SAMPLE entries, as one row. Plain SQL: building it as SQLAlchemy expressions costs
    more than running it."""
    plain = [f"{col} = :{col}" for col, v in filters.values().items() if v is not None]
    opaque = [f"d.{col} {_OPAQUE[col]} = :{col}"
              for col, v in filters.values().items() if v is not None]
    cursor_devices = " AND id > :after" if after is not None else ""
    cursor_tags = " AND device_id > :after" if after is not None else ""

    def has(tag_index: int, ref: str) -> str:
        return (f"EXISTS (SELECT 1 FROM device_tags x WHERE x.device_id = {ref} "
                f"AND x.tag = :tag{tag_index})")

    columns = []
    for driver in drivers:
        if driver == "devices":
            walk = (f"SELECT id FROM devices WHERE {' AND '.join(plain)}{cursor_devices} "
                    "ORDER BY id")
            checks = [has(i, "s.id") for i in range(len(tags))]
            join = ""
        else:
            lead = tags.index(tag_of(driver))
            walk = (f"SELECT device_id AS id FROM device_tags WHERE tag = :tag{lead}"
                    f"{cursor_tags} ORDER BY device_id")
            checks = opaque + [has(i, "d.id") for i in range(len(tags)) if i != lead]
            join = " JOIN devices d ON d.id = s.id"
        where = f" WHERE {' AND '.join(checks)}" if checks else ""
        columns.append(f"(SELECT count(*) FROM ({walk} LIMIT {COUNT_CAP}))")
        columns.append(f"(SELECT count(*) FROM ({walk} LIMIT {SAMPLE}) AS s{join}{where})")
    return "SELECT " + ", ".join(columns)


def _estimates(session: Session, filters: Filters, tags: list[str], after: str | None,
               drivers: list[str], limit: int) -> dict[str, float]:
    """For each driver, about how many entries its walk reads to fill a page (one query).

    Two facts per driver: its size (counted up to COUNT_CAP) and how many of its first
    SAMPLE entries pass the other filters. A walk never reads more than its size, and reads
    about (limit + 1) / pass-rate entries otherwise.
    """
    params: dict[str, Any] = {k: v for k, v in filters.values().items() if v is not None}
    params.update({f"tag{i}": t for i, t in enumerate(tags)})
    if after is not None:
        params["after"] = after
    row = session.execute(text(_estimate_sql(filters, tags, after, drivers)), params).one()
    out: dict[str, float] = {}
    for i, driver in enumerate(drivers):
        size, hits = int(row[2 * i]), int(row[2 * i + 1])
        seen = min(size, SAMPLE)
        walk_len = (limit + 1) * seen / max(hits, 0.5) if seen else 0.0
        out[driver] = min(float(size) if size < COUNT_CAP else float("inf"), walk_len)
    return out


def choose_driver(session: Session, filters: Filters, tags: list[str], after: str | None,
                  limit: int) -> str:
    """Where a page's walk starts: "devices" or "tag:<tag>" (SQLite: whichever reads least;
    PostgreSQL: the first tag, and its planner merges the indexes in id order)."""
    if not tags:
        return "devices"
    if session.get_bind().dialect.name != "sqlite" or (not filters.indexed()
                                                        and len(tags) == 1):
        return f"tag:{tags[0]}"
    key = (str(session.get_bind().engine.url), filters, tuple(tags), limit)
    now = time.monotonic()
    remembered = _CHOICES.get(key)
    if remembered is not None and remembered[1] > now:
        return remembered[0]
    drivers = [f"tag:{t}" for t in tags] + (["devices"] if filters.indexed() else [])
    estimates = _estimates(session, filters, tags, after, drivers, limit)
    driver = min(drivers, key=lambda d: estimates[d])  # ties: the first tag given
    if len(_CHOICES) >= CHOICES_KEPT:
        _CHOICES.clear()
    _CHOICES[key] = (driver, now + CHOICE_TTL_S)
    return driver


def plan_page(session: Session, query: DeviceQuery) -> ListPlan:
    """The statement for one page of `query` (limit + 1 rows, to know if more follow)."""
    filters = device_filters(session, query.fleet, query.mcu, query.state)
    tags = list(dict.fromkeys(query.tag))
    after = query.cursor
    driver = choose_driver(session, filters, tags, after, query.limit)
    if driver == "devices":
        stmt = select(*ROW_COLUMNS).where(*filters.indexed(), *(has_tag(t) for t in tags))
        if after is not None:
            stmt = stmt.where(Device.id > after)
        stmt = stmt.order_by(Device.id)
    else:
        lead = tag_of(driver)
        walk = aliased(DeviceTag, name="walk")
        sqlite = session.get_bind().dialect.name == "sqlite"
        stmt = (select(*ROW_COLUMNS).select_from(walk)
                .join(Device, Device.id == walk.device_id)
                .where(walk.tag == lead, *(filters.opaque() if sqlite else filters.indexed()),
                       *(has_tag(t) for t in tags if t != lead)))
        if after is not None:
            # On both sides: PostgreSQL does not carry an inequality across the join.
            stmt = stmt.where(walk.device_id > after, Device.id > after)
        stmt = stmt.order_by(walk.device_id)
    return ListPlan(stmt.limit(query.limit + 1), driver)


def list_devices(session: Session, query: DeviceQuery) -> tuple[list[DeviceRow], str | None]:
    """One page of devices matching the filters, by id, and the cursor of the next page."""
    page: list[Any] = list(session.execute(plan_page(session, query).statement).all())
    next_cursor = str(page[query.limit - 1][0]) if len(page) > query.limit else None
    return device_rows(session, page[:query.limit]), next_cursor


def device_rows(session: Session, page: list[Any]) -> list[DeviceRow]:
    """Rows selected as ROW_COLUMNS as DeviceRows (their fleets' names in one query)."""
    if not page:
        return []
    fleet_ids = {row[2] for row in page}
    names = {fleet_id: name for fleet_id, name in
             session.execute(select(Fleet.id, Fleet.name).where(Fleet.id.in_(fleet_ids)))}
    # Tags contain no spaces (schemas.TAG_RE): joined with one, split back here.
    return [DeviceRow(row[0], row[1], names[row[2]], row[3], row[4], row[5], row[6], row[7],
                      row[8], row[9], row[10], sorted(row[11].split(" ")) if row[11] else [],
                      row[12], bool(row[13]), row[14], row[15])
            for row in page]
