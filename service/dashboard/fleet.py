"""The fleet page's data: one page of devices (filters, name search, keyset paging), the
counts by MCU class and state, and the table's columns.

Without a search the page is the API's list (`service.device_list.list_devices`: one index
range in id order, the cursor an id). A search `q` is a name prefix (or one whole device id):
its page walks the unique index on `name` from `q`, in name order, the cursor a name, and
checks the other filters on each device found, as the API's tag walks do. A page never sorts
or counts the matches, so it costs the same on page 1 and page 1,000 of 100,000 devices.

The counts by MCU class and state are shared by the pages a process serves for up to 2 s
(a GROUP BY over every device is the page's most expensive part at 100,000 devices).

The columns are one table (`COLUMNS`): the page and its script render what it lists. The
installed model version and online/offline join it when campaigns and presence record them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from device_agent.protocol import DEFAULT_BACKEND
from firmware.targets import KIB
from service.device_list import (
    ROW_COLUMNS,
    DeviceRow,
    Filters,
    device_filters,
    device_rows,
    has_tag,
    list_devices,
)
from service.models import Device, DeviceState, Fleet
from service.parsing import validate
from service.problems import ApiError, FieldError
from service.schemas import DEVICE_ID_RE, DEVICE_NAME_RE, MAX_TAGS, TAG_RE, DeviceQuery

PAGE_SIZES = (25, 50, 100, 200)
DEFAULT_PAGE_SIZE = 50
FLEETS_LISTED = 500  # fleet names offered in the filter's list (any other can be typed)
_ID = re.compile(DEVICE_ID_RE)
_NAME = re.compile(DEVICE_NAME_RE)
_PREFIX = re.compile(r"^[A-Za-z0-9._-]{1,128}$")  # what a device name may start with
_TAG = re.compile(TAG_RE)
# Collations in which a prefix's names are exactly the range [prefix, prefix + 1).
_BYTEWISE = {"c", "posix", "c.utf-8", "c.utf8", "ucs_basic"}
_COLLATION: dict[str, bool] = {}
COUNTS_MAX_AGE_S = 2.0  # the poll interval: a page sees counts at most one poll old
COUNTS_KEPT = 256
_COUNTS: dict[tuple[str, int | None], tuple[float, list[McuCount]]] = {}


@dataclass(frozen=True)
class Column:
    """One column of the fleet table: its key in the JSON rows, title, and value."""

    key: str
    title: str
    value: Callable[[DeviceRow], Any]
    numeric: bool = False


def _kib(n: int) -> str:
    return f"{n / KIB:,.0f} kB"


def presence(online: bool, last_seen_at: datetime | None) -> str:
    """'online', 'offline, last seen YYYY-MM-DD HH:MM UTC', or 'never seen'."""
    if online:
        return "online"
    if last_seen_at is None:
        return "never seen"
    when = last_seen_at if last_seen_at.tzinfo else last_seen_at.replace(tzinfo=UTC)
    return f"offline, last seen {when.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


COLUMNS: tuple[Column, ...] = (
    Column("name", "Name", lambda d: d.name),
    Column("id", "Id", lambda d: d.id),
    Column("fleet", "Fleet", lambda d: d.fleet_name),
    Column("mcu", "MCU", lambda d: d.mcu),
    Column("cpu", "Core", lambda d: d.cpu),
    Column("sram", "SRAM", lambda d: _kib(d.sram_bytes), numeric=True),
    Column("slot", "Flash slot", lambda d: _kib(d.slot_bytes), numeric=True),
    Column("state", "State", lambda d: d.state.value),
    Column("model", "Installed model", lambda d: d.installed_model_version or "none"),
    Column("presence", "Presence", lambda d: presence(d.online, d.last_seen_at)),
    Column("backend", "Backend", lambda d: d.backend or DEFAULT_BACKEND),
    Column("tags", "Tags", lambda d: " ".join(d.tags)),
)


@dataclass(frozen=True)
class FleetQuery:
    """What the fleet page shows: the API's filters, a search, a page size and a cursor."""

    q: str | None = None
    fleet: str | None = None
    mcu: str | None = None
    state: DeviceState | None = None
    tags: tuple[str, ...] = ()
    limit: int = DEFAULT_PAGE_SIZE
    cursor: str | None = None

    def args(self, **changes: Any) -> dict[str, Any]:
        """The query string of this query (with `changes`), without empty values."""
        values: dict[str, Any] = {
            "q": self.q, "fleet": self.fleet, "mcu": self.mcu,
            "state": self.state.value if self.state else None,
            "tag": " ".join(self.tags) or None,
            "limit": self.limit if self.limit != DEFAULT_PAGE_SIZE else None,
            "cursor": self.cursor}
        values.update(changes)
        return {k: v for k, v in values.items() if v is not None}


@dataclass
class FleetPage:
    """One page of devices and the cursor of the next (None: the last page)."""

    devices: list[DeviceRow]
    next_cursor: str | None
    errors: list[FieldError] = field(default_factory=list)


def _empty(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


def parse_fleet_query(args: Mapping[str, str]) -> FleetQuery:
    """The query of the page's URL; ApiError 422 naming every bad field."""
    errors: list[FieldError] = []
    q = _empty(args.get("q"))
    if q is not None and not _PREFIX.fullmatch(q):
        errors.append(FieldError("q", "search by the start of a name or a whole device id: "
                                      "letters, digits, '.', '_' and '-', at most 128"))
    tags = tuple(dict.fromkeys((_empty(args.get("tag")) or "").replace(",", " ").split()))
    errors += [FieldError("tag", f"{t!r} is not a tag") for t in tags if not _TAG.fullmatch(t)]
    if len(tags) > MAX_TAGS:
        errors.append(FieldError("tag", f"at most {MAX_TAGS} tags"))
    raw_limit = _empty(args.get("limit"))
    limit = DEFAULT_PAGE_SIZE
    if raw_limit is not None:
        if raw_limit.isdigit() and int(raw_limit) in PAGE_SIZES:
            limit = int(raw_limit)
        else:
            errors.append(FieldError("limit", f"one of {', '.join(map(str, PAGE_SIZES))}"))
    cursor = _empty(args.get("cursor"))
    by_name = q is not None and not _ID.fullmatch(q)
    if cursor is not None and not (_NAME if by_name else _ID).fullmatch(cursor):
        errors.append(FieldError("cursor", "is not the cursor of a page of this list"))
    state = None
    try:  # the API's own checks of fleet, mcu and state
        api = validate(DeviceQuery, {k: v for k, v in (
            ("fleet", _empty(args.get("fleet"))), ("mcu", _empty(args.get("mcu"))),
            ("state", _empty(args.get("state")))) if v is not None})
        state = api.state
    except ApiError as err:
        errors += err.errors
    if errors:
        raise ApiError(422, "; ".join(f"{e.field}: {e.message}" for e in errors), errors)
    return FleetQuery(q=q, fleet=api.fleet, mcu=api.mcu, state=state, tags=tags, limit=limit,
                      cursor=cursor)


def fleet_page(session: Session, query: FleetQuery) -> FleetPage:
    """One page of the devices `query` selects."""
    if query.q is None:
        api = DeviceQuery(fleet=query.fleet, mcu=query.mcu, state=query.state,
                          tag=list(query.tags), limit=query.limit, cursor=query.cursor)
        devices, next_cursor = list_devices(session, api)
        return FleetPage(devices, next_cursor)
    filters = device_filters(session, query.fleet, query.mcu, query.state)
    if _ID.fullmatch(query.q):
        stmt = select(*ROW_COLUMNS).where(Device.id == query.q, *filters.indexed(),
                                          *(has_tag(t) for t in query.tags))
        return FleetPage(device_rows(session, list(session.execute(stmt).all())), None)
    return _name_walk(session, query, filters)


def _bytewise_names(session: Session) -> bool:
    """True when names sort byte by byte (SQLite; PostgreSQL with a C collation)."""
    bind = session.get_bind()
    if bind.dialect.name == "sqlite":
        return True
    key = str(bind.engine.url)
    if key not in _COLLATION:
        collation = session.scalar(text(
            "SELECT datcollate FROM pg_database WHERE datname = current_database()"))
        _COLLATION[key] = str(collation or "").lower() in _BYTEWISE
    return _COLLATION[key]


def _name_walk(session: Session, query: FleetQuery, filters: Filters) -> FleetPage:
    """Devices whose name starts with `query.q`, by name, from the unique name index."""
    q = query.q
    assert q is not None
    sqlite = session.get_bind().dialect.name == "sqlite"
    starts = func.substr(Device.name, 1, len(q)) == q  # exact, whatever the range admits
    if _bytewise_names(session):
        # Names starting with q are exactly [q, q with its last character + 1) here.
        upper = q[:-1] + chr(ord(q[-1]) + 1)
        where = [Device.name >= q, Device.name < upper, starts]
    else:
        # A linguistic collation orders names by more than their bytes: no range is exact,
        # so the name index is walked in its order with the exact check on each name.
        where = [starts]
    if query.cursor is not None:
        where.append(Device.name > query.cursor)
    # SQLite: the other filters in a form no index serves, so that the name index leads.
    stmt = (select(*ROW_COLUMNS)
            .where(*where, *(filters.opaque() if sqlite else filters.indexed()),
                   *(has_tag(t) for t in query.tags))
            .order_by(Device.name).limit(query.limit + 1))
    page = list(session.execute(stmt).all())
    next_cursor = str(page[query.limit - 1][1]) if len(page) > query.limit else None
    return FleetPage(device_rows(session, page[:query.limit]), next_cursor)


@dataclass(frozen=True)
class McuCount:
    """Devices of one MCU class, by registry state."""

    mcu: str
    by_state: dict[str, int]

    @property
    def total(self) -> int:
        """Every state together."""
        return sum(self.by_state.values())


def counts_by_mcu(session: Session, fleet: str | None,
                  max_age_s: float = COUNTS_MAX_AGE_S) -> list[McuCount]:
    """Devices by MCU class and state, of one fleet or of all, at most `max_age_s` old.

    One GROUP BY over the (mcu, state, id) index: ~20-60 ms at 100,000 devices, so every
    open page asking for it every 2 s would cost more than the pages themselves; the
    answer is shared by the pages this process serves for `max_age_s`.
    """
    filters = device_filters(session, fleet, None, None)
    key = (str(session.get_bind().engine.url), filters.fleet_id)
    now = time.monotonic()
    cached = _COUNTS.get(key)
    if cached is not None and now - cached[0] < max_age_s:
        return cached[1]
    rows = session.execute(select(Device.mcu, Device.state, func.count())
                           .where(*filters.indexed()).group_by(Device.mcu, Device.state))
    out: dict[str, dict[str, int]] = {}
    for mcu, state, count in rows:
        out.setdefault(mcu, {s.value: 0 for s in DeviceState})[state.value] = int(count)
    counts = [McuCount(mcu, by_state) for mcu, by_state in sorted(out.items())]
    if len(_COUNTS) >= COUNTS_KEPT:
        _COUNTS.clear()
    _COUNTS[key] = (now, counts)
    return counts


def fleet_names(session: Session) -> list[str]:
    """Fleet names for the filter's list (the first FLEETS_LISTED by name)."""
    return list(session.scalars(select(Fleet.name).order_by(Fleet.name).limit(FLEETS_LISTED)))


def row_json(device: DeviceRow) -> dict[str, Any]:
    """A table row: every column's value by key, and the device's page."""
    return {column.key: column.value(device) for column in COLUMNS}


def page_json(page: FleetPage, counts: list[McuCount]) -> dict[str, Any]:
    """What the page's script polls: the columns, rows, next cursor and counts."""
    return {
        "columns": [{"key": c.key, "title": c.title, "numeric": c.numeric} for c in COLUMNS],
        "items": [row_json(d) for d in page.devices],
        "next_cursor": page.next_cursor,
        "counts": [{"mcu": c.mcu, "by_state": c.by_state, "total": c.total} for c in counts],
        "states": [s.value for s in DeviceState],
    }
