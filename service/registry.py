"""The device registry: registration (one or 10,000 at once, all-or-nothing), listing,
tags and decommissioning. Every change is committed, then the broker files follow.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from firmware.targets import CATALOG, KIB, Cpu, OtaLayout, TargetSpec, custom_target
from service.broker_sync import BrokerTarget, DeviceChange, SyncOutcome, apply_changes, full_sync
from service.fleets import discard_key, new_fleet
from service.models import Device, DeviceState, DeviceTag, Fleet, utcnow
from service.mqtt_passwords import hash_password, new_password
from service.problems import ApiError, FieldError
from service.schemas import DeviceCreate, DeviceQuery
from service.validation import parse_into

# A firmware slot smaller than this cannot hold the runtime, the network stack and the
# smallest useful int8 model (MCUNet's smallest ImageNet models need ~100-200 kB of Flash).
MIN_SLOT_BYTES = 64 * KIB
_CHUNK = 500  # IN (...) lists stay far below SQLite's and PostgreSQL's parameter limits
_CURSOR_RE = re.compile(r"dev-[0-9a-f]{16}")


@dataclass(frozen=True)
class RegistryContext:
    """Where the registry keeps files outside the database, and the broker it keeps in step."""

    key_dir: Path
    broker_dir: Path
    pid_file: Path | None = None
    sync_broker: bool = True
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 18883

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RegistryContext:
        """The context described by the service settings (service.config)."""
        pid = config.get("MOSQUITTO_PID_FILE")
        return cls(key_dir=Path(config["VAR_DIR"]) / "keys",
                   broker_dir=Path(config["BROKER_DIR"]),
                   pid_file=Path(pid) if pid else None,
                   sync_broker=bool(config["SYNC_BROKER_FILES"]),
                   mqtt_host=str(config.get("MQTT_HOST", "127.0.0.1")),
                   mqtt_port=int(config.get("MQTT_PORT", 18883)))

    @property
    def broker(self) -> BrokerTarget:
        """The broker whose credentials follow the registry."""
        return BrokerTarget(self.broker_dir, self.pid_file, self.mqtt_host, self.mqtt_port)


@dataclass(frozen=True)
class Registered:
    """A device just registered and its MQTT password (not stored; shown once)."""

    device_id: str
    name: str
    fleet: str
    mqtt_password: str


@dataclass(frozen=True)
class Registration:
    """The result of one (bulk) registration."""

    devices: list[Registered]
    fleets: dict[str, Fleet]  # every fleet named in the request
    created_fleets: list[str]


def new_device_id() -> str:
    """A random device id, also its MQTT username (hex: no MQTT wildcard can appear)."""
    return f"dev-{secrets.token_hex(8)}"


def resolve_target(row: DeviceCreate, index: int | None,
                   errors: list[FieldError]) -> TargetSpec | None:
    """The TargetSpec of a row (catalog or explicit sizes); None after adding its errors."""
    explicit = {"sram_bytes": row.sram_bytes, "flash_bytes": row.flash_bytes, "cpu": row.cpu}
    given = [k for k, v in explicit.items() if v is not None]
    if row.mcu is not None:
        if given:
            errors.append(FieldError(given[0], "give either mcu or sram_bytes, flash_bytes "
                                               "and cpu, not both", index))
            return None
        target = CATALOG.get(row.mcu.strip().lower())
        if target is None:
            errors.append(FieldError("mcu", f"unknown MCU {row.mcu!r}; known: "
                                            f"{', '.join(sorted(CATALOG))}", index))
        return target
    if not given:
        errors.append(FieldError("mcu", "is required unless sram_bytes, flash_bytes and cpu "
                                        "are all given", index))
        return None
    missing = [k for k, v in explicit.items() if v is None]
    for name in missing:
        errors.append(FieldError(name, "is required when mcu is not given", index))
    if missing:
        return None
    assert row.sram_bytes is not None and row.flash_bytes is not None and row.cpu is not None
    return custom_target(row.sram_bytes, row.flash_bytes, Cpu(row.cpu))


def check_slot(row: DeviceCreate, target: TargetSpec, index: int | None,
               errors: list[FieldError]) -> int | None:
    """Flash per firmware slot, or None after an error when below MIN_SLOT_BYTES."""
    slot = target.slot_bytes(row.ota_layout)
    if slot >= MIN_SLOT_BYTES:
        return slot
    how = "halved for A/B OTA" if row.ota_layout is OtaLayout.AB else "one slot"
    hint = "; ota_layout 'single' or more Flash would help" if (
        row.ota_layout is OtaLayout.AB
        and target.slot_bytes(OtaLayout.SINGLE) >= MIN_SLOT_BYTES) else ""
    field = "mcu" if row.mcu is not None else "flash_bytes"
    errors.append(FieldError(field, (
        f"firmware slot of {slot} bytes (Flash {target.flash_bytes} - bootloader "
        f"{target.bootloader_bytes}, {how}) is below the minimum {MIN_SLOT_BYTES} bytes"
        f"{hint}"), index))
    return None


def parse_rows(raw_rows: list[Any], *, from_text: bool = False) -> list[DeviceCreate]:
    """Rows of a bulk request (or CSV) as DeviceCreate; 422 naming every row's bad fields.

    Rows whose fields parse are also checked for their hardware (MCU, sizes, slot), so that
    one answer lists every problem of a 10,000-row file, not just the first kind.
    """
    errors: list[FieldError] = []
    rows: list[DeviceCreate] = []
    parsed_ok: list[tuple[int, DeviceCreate]] = []
    for i, raw in enumerate(raw_rows):
        row = parse_into(DeviceCreate, raw, errors, index=i, from_text=from_text)
        if isinstance(row, DeviceCreate):
            rows.append(row)
            parsed_ok.append((i, row))
    if errors:
        first_row: dict[str, int] = {}
        for i, row in parsed_ok:
            target = resolve_target(row, i, errors)
            if target is not None:
                check_slot(row, target, i, errors)
            if row.name in first_row:
                errors.append(FieldError("name", f"duplicate name {row.name!r}, also in row "
                                                 f"{first_row[row.name]}", i))
            first_row.setdefault(row.name, i)
        errors.sort(key=lambda e: e.index or 0)
        first = errors[0]
        raise ApiError(422, f"row {first.index}: {first.field}: {first.message}; "
                            f"{len(errors)} error(s), nothing was registered", errors)
    return rows


def _taken_names(session: Session, names: list[str]) -> set[str]:
    found: set[str] = set()
    for i in range(0, len(names), _CHUNK):
        chunk = names[i:i + _CHUNK]
        found.update(session.scalars(select(Device.name).where(Device.name.in_(chunk))))
    return found


def _check_names(session: Session, rows: list[DeviceCreate], indexed: bool,
                 conflicts: list[FieldError]) -> None:
    first_row: dict[str, int] = {}
    for i, row in enumerate(rows):
        if row.name in first_row:
            conflicts.append(FieldError("name", f"duplicate name {row.name!r}, also in row "
                                                f"{first_row[row.name]}", i))
        else:
            first_row[row.name] = i
    taken = _taken_names(session, list(first_row))
    for name in sorted(taken, key=first_row.__getitem__):
        conflicts.append(FieldError("name", f"a device named {name!r} already exists",
                                    first_row[name] if indexed else None))


def _resolve_fleets(session: Session, rows: list[DeviceCreate], create: bool, ctx:
                    RegistryContext, indexed: bool,
                    errors: list[FieldError]) -> tuple[dict[str, Fleet], list[str]]:
    wanted = list(dict.fromkeys(row.fleet for row in rows))
    fleets = {f.name: f for f in session.scalars(select(Fleet).where(Fleet.name.in_(wanted)))}
    missing = [name for name in wanted if name not in fleets]
    if missing and not create:
        first: dict[str, int] = {}
        for i, row in enumerate(rows):
            first.setdefault(row.fleet, i)
        for name in missing:
            errors.append(FieldError("fleet", f"no fleet named {name!r} (create it with "
                                              "POST /api/v1/fleets)",
                                     first[name] if indexed else None))
        return fleets, []
    return fleets, missing


def register_devices(session: Session, rows: list[DeviceCreate], ctx: RegistryContext, *,
                     create_fleets: bool = False, indexed: bool = True) -> Registration:
    """Register every row or none: 422 (or 409 for taken names) listing each row's errors."""
    errors: list[FieldError] = []
    hardware: list[tuple[TargetSpec, int] | None] = []
    for i, row in enumerate(rows):
        index = i if indexed else None
        target = resolve_target(row, index, errors)
        slot = check_slot(row, target, index, errors) if target is not None else None
        hardware.append((target, slot) if target is not None and slot is not None else None)
    conflicts: list[FieldError] = []
    _check_names(session, rows, indexed, conflicts)
    fleets, to_create = _resolve_fleets(session, rows, create_fleets, ctx, indexed, errors)
    if errors or conflicts:
        everything = sorted(errors + conflicts, key=lambda e: (e.index or 0))
        first = everything[0]
        where = f"row {first.index}: " if first.index is not None else ""
        raise ApiError(422 if errors else 409,
                       f"{where}{first.field}: {first.message}; {len(everything)} error(s), "
                       "nothing was registered", everything)
    created = [new_fleet(session, name, ctx.key_dir) for name in to_create]
    try:
        session.flush()  # fleet ids
        fleets.update({f.name: f for f in created})
        registered = _insert_devices(session, rows, hardware, fleets)
        session.commit()
    except IntegrityError as err:  # a concurrent request took a name first
        session.rollback()
        for fleet in created:
            discard_key(fleet)
        raise ApiError(409, f"a device or fleet name was taken concurrently: {err.orig}",
                       [FieldError("name", "taken concurrently")]) from None
    except BaseException:
        session.rollback()
        for fleet in created:
            discard_key(fleet)
        raise
    after_change(session, ctx, [DeviceChange.registered(r.device_id, r.mqtt_password)
                                for r in registered])
    return Registration(registered, fleets, to_create)


def _insert_devices(session: Session, rows: list[DeviceCreate],
                    hardware: list[tuple[TargetSpec, int] | None],
                    fleets: dict[str, Fleet]) -> list[Registered]:
    now = utcnow()
    device_rows: list[dict[str, object]] = []
    tag_rows: list[dict[str, str]] = []
    passwords: list[str] = []
    for row, hw in zip(rows, hardware, strict=True):
        assert hw is not None
        target, slot = hw
        device_id, password = new_device_id(), new_password()
        passwords.append(password)
        device_rows.append({
            "id": device_id, "name": row.name, "fleet_id": fleets[row.fleet].id,
            "mcu": target.name, "cpu": target.cpu.value, "sram_bytes": target.sram_bytes,
            "flash_bytes": target.flash_bytes, "slot_bytes": slot,
            "ota_layout": row.ota_layout.value, "state": DeviceState.ACTIVE,
            "mqtt_password_hash": hash_password(password), "created_at": now,
            "decommissioned_at": None,
        })
        tag_rows.extend({"device_id": device_id, "tag": t} for t in sorted(set(row.tags)))
    # Core inserts with executemany: 10,000 ORM objects would cost seconds.
    session.execute(insert(Device), device_rows)
    if tag_rows:
        session.execute(insert(DeviceTag), tag_rows)
    return [Registered(str(values["id"]), row.name, row.fleet, password)
            for values, row, password in zip(device_rows, rows, passwords, strict=True)]


def after_change(session: Session, ctx: RegistryContext,
                 changes: Sequence[DeviceChange] | None = None) -> SyncOutcome | None:
    """Make committed changes take effect at the broker; call it after every commit.

    `changes` names the devices changed and their new passwords (registration, rotation),
    which the broker takes live in milliseconds; None re-syncs everything from the database
    (one reload). A broker that cannot be reached is logged, not raised: the change is
    committed and the broker is rebuilt from the database when it starts.
    """
    if not ctx.sync_broker:
        return None
    engine = session.get_bind()
    assert isinstance(engine, Engine)
    if changes is None:
        return full_sync(engine, ctx.broker)
    return apply_changes(engine, ctx.broker, changes)


@dataclass(frozen=True)
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

    @property
    def mqtt_username(self) -> str:
        """The MQTT username: the device id."""
        return self.id


_ROW_COLUMNS = (Device.id, Device.name, Fleet.name, Device.mcu, Device.cpu, Device.sram_bytes,
                Device.flash_bytes, Device.slot_bytes, Device.ota_layout, Device.state,
                Device.created_at)


def list_devices(session: Session, query: DeviceQuery) -> tuple[list[DeviceRow], str | None]:
    """One page of devices matching the filters, by id, and the cursor of the next page."""
    stmt = select(*_ROW_COLUMNS).join(Fleet, Fleet.id == Device.fleet_id)
    if query.fleet is not None:
        fleet_id = session.scalar(select(Fleet.id).where(Fleet.name == query.fleet))
        if fleet_id is None:
            raise ApiError(422, f"fleet: no fleet named {query.fleet!r}",
                           [FieldError("fleet", f"no fleet named {query.fleet!r}")])
        stmt = stmt.where(Device.fleet_id == fleet_id)
    if query.mcu is not None:
        mcu = query.mcu.strip().lower()
        if mcu not in CATALOG and mcu != "custom":
            raise ApiError(422, f"mcu: unknown MCU {query.mcu!r}",
                           [FieldError("mcu", f"unknown MCU {query.mcu!r}; known: "
                                              f"{', '.join(sorted(CATALOG))}, custom")])
        stmt = stmt.where(Device.mcu == mcu)
    if query.state is not None:
        stmt = stmt.where(Device.state == query.state)
    for tag in query.tag:
        stmt = stmt.where(Device.id.in_(select(DeviceTag.device_id).where(DeviceTag.tag == tag)))
    if query.cursor is not None:
        if not _CURSOR_RE.fullmatch(query.cursor):
            raise ApiError(422, "cursor: not a cursor from a previous page",
                           [FieldError("cursor", f"{query.cursor!r} is not a cursor from "
                                                 "a previous page")])
        stmt = stmt.where(Device.id > query.cursor)
    page = session.execute(stmt.order_by(Device.id).limit(query.limit + 1)).all()
    next_cursor = page[query.limit - 1][0] if len(page) > query.limit else None
    page = page[:query.limit]
    tags: dict[str, list[str]] = {}
    if page:
        ids = [row[0] for row in page]
        for device_id, tag in session.execute(
                select(DeviceTag.device_id, DeviceTag.tag)
                .where(DeviceTag.device_id.in_(ids)).order_by(DeviceTag.tag)):
            tags.setdefault(device_id, []).append(tag)
    return [DeviceRow(*row, tags=tags.get(row[0], [])) for row in page], next_cursor


def find_device(session: Session, key: str) -> Device:
    """The device with id (or else name) `key`; 404 when none."""
    device = session.get(Device, key) or session.scalar(select(Device).where(Device.name == key))
    if device is None:
        raise ApiError(404, f"no device with id or name {key!r}",
                       [FieldError("id", f"no device with id or name {key!r}")])
    return device


def set_tags(session: Session, key: str, tags: list[str]) -> Device:
    """Replace a device's tags and commit."""
    device = find_device(session, key)
    wanted = set(tags)
    # Keep rows whose tag stays: re-adding an identical primary key would conflict.
    device.tag_rows = [r for r in device.tag_rows if r.tag in wanted] + [
        DeviceTag(device_id=device.id, tag=t) for t in sorted(wanted - set(device.tags))]
    session.commit()
    session.refresh(device, ["tag_rows"])
    return device


def decommission(session: Session, key: str, ctx: RegistryContext) -> Device:
    """Decommission a device: its MQTT credentials are deleted, its broker sessions dropped."""
    device = find_device(session, key)
    if device.state is not DeviceState.DECOMMISSIONED:
        device.state = DeviceState.DECOMMISSIONED
        device.mqtt_password_hash = None
        device.decommissioned_at = utcnow()
        session.commit()
    after_change(session, ctx, [DeviceChange.decommissioned(device.id)])
    return device
