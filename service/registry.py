"""The device registry: registration (one or 10,000 at once, all-or-nothing), lookup, tags,
credential rotation and decommissioning. Every change is committed, then the broker follows
(`after_change`). Listing lives in service.device_list.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, insert, select, update
from sqlalchemy.orm import Session

from firmware.targets import CATALOG, KIB, Cpu, OtaLayout, TargetSpec, custom_target
from service.broker_sync import BrokerTarget, DeviceChange, SyncOutcome, apply_changes, full_sync
from service.device_list import device_filters
from service.fleets import discard_key, new_fleet
from service.models import Device, DeviceState, DeviceTag, Fleet, utcnow
from service.mqtt_passwords import hash_password, new_password
from service.parsing import shown, validate_rows
from service.problems import ApiError, FieldError
from service.schemas import (
    DEVICE_ID_RE,
    DEVICE_NAME_RE,
    MAX_BULK_DEVICES,
    CredentialRotation,
    DeviceCreate,
)

# A firmware slot smaller than this cannot hold the runtime, the network stack and the
# smallest useful int8 model (MCUNet's smallest ImageNet models need ~100-200 kB of Flash).
MIN_SLOT_BYTES = 64 * KIB
_CHUNK = 500  # IN (...) lists stay far below SQLite's and PostgreSQL's parameter limits
_DEVICE_ID = re.compile(DEVICE_ID_RE)
_DEVICE_NAME = re.compile(DEVICE_NAME_RE)
PROGRESS_EVERY = 250  # rows between two progress callbacks

Progress = Callable[[int, int], None]  # (done, total)


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
    """A device and its new MQTT password (not stored; shown once). None: decommissioned."""

    device_id: str
    name: str
    fleet: str
    mqtt_password: str | None


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
        return CATALOG[row.mcu]  # the schema admits catalog names only
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


def rows_failed(parsed: list[DeviceCreate | None], errors: list[FieldError]) -> ApiError:
    """The 422 for rows with schema errors, after checking the others' hardware and names,
    so that one answer lists every problem of a 10,000-row file, not just the first kind."""
    first_row: dict[str, int] = {}
    for i, row in enumerate(parsed):
        if row is None:
            continue
        target = resolve_target(row, i, errors)
        if target is not None:
            check_slot(row, target, i, errors)
        if row.name in first_row:
            errors.append(FieldError("name", f"duplicate name {row.name!r}, also in row "
                                             f"{first_row[row.name]}", i))
        first_row.setdefault(row.name, i)
    errors.sort(key=lambda e: e.index or 0)
    first = errors[0]
    where = f"row {first.index}: " if first.index is not None else ""
    return ApiError(422, f"{where}{first.field}: {first.message}; {len(errors)} error(s), "
                         "nothing was registered", errors)


def parse_rows(raw_rows: list[Any]) -> list[DeviceCreate]:
    """Rows of a bulk request or CSV file as DeviceCreate; 422 naming every row's errors."""
    parsed, errors = validate_rows(DeviceCreate, raw_rows)
    if errors:
        raise rows_failed(parsed, errors)
    return [row for row in parsed if row is not None]


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


def _resolve_fleets(session: Session, rows: list[DeviceCreate], create: bool, indexed: bool,
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
                     create_fleets: bool = False, indexed: bool = True,
                     progress: Progress | None = None,
                     before_commit: Callable[[list[Registered]], None] | None = None,
                     ) -> Registration:
    """Register every row or none: 422 (or 409 for taken names) listing each row's errors.

    `before_commit` runs inside the registration's transaction (an Idempotency-Key records
    the device ids there, so that both are committed or neither).
    """
    errors: list[FieldError] = []
    hardware: list[tuple[TargetSpec, int]] = []
    for i, row in enumerate(rows):
        index = i if indexed else None
        target = resolve_target(row, index, errors)
        slot = check_slot(row, target, index, errors) if target is not None else None
        if target is not None and slot is not None:
            hardware.append((target, slot))
    conflicts: list[FieldError] = []
    _check_names(session, rows, indexed, conflicts)
    fleets, to_create = _resolve_fleets(session, rows, create_fleets, indexed, errors)
    if errors or conflicts:
        everything = sorted(errors + conflicts, key=lambda e: (e.index or 0))
        first = everything[0]
        where = f"row {first.index}: " if first.index is not None else ""
        raise ApiError(422 if errors else 409,
                       f"{where}{first.field}: {first.message}; {len(everything)} error(s), "
                       "nothing was registered", everything)
    # Passwords are hashed before anything is written: no lock is held meanwhile.
    credentials = _new_credentials(len(rows), progress)
    created = [new_fleet(session, name, ctx.key_dir) for name in to_create]
    try:
        session.flush()  # fleet ids
        fleets.update({f.name: f for f in created})
        registered = _insert_devices(session, rows, hardware, fleets, credentials)
        if before_commit is not None:
            before_commit(registered)
        session.commit()
    except BaseException:
        # An IntegrityError (a name taken concurrently) becomes a 409 in the app's handler.
        session.rollback()
        for fleet in created:
            discard_key(fleet)
        raise
    after_change(session, ctx, [DeviceChange.registered(r.device_id, r.mqtt_password)
                                for r in registered if r.mqtt_password is not None])
    return Registration(registered, fleets, to_create)


def _new_credentials(n: int, progress: Progress | None) -> list[tuple[str, str]]:
    """`n` (password, $7$ hash) pairs."""
    out = []
    for i in range(n):
        password = new_password()
        out.append((password, hash_password(password)))
        if progress is not None and (i + 1) % PROGRESS_EVERY == 0:
            progress(i + 1, n)
    if progress is not None:
        progress(n, n)
    return out


def _insert_devices(session: Session, rows: list[DeviceCreate],
                    hardware: list[tuple[TargetSpec, int]], fleets: dict[str, Fleet],
                    credentials: list[tuple[str, str]]) -> list[Registered]:
    now = utcnow()
    device_rows: list[dict[str, object]] = []
    tag_rows: list[dict[str, str]] = []
    for row, (target, slot), (_password, pw_hash) in zip(rows, hardware, credentials,
                                                         strict=True):
        device_id = new_device_id()
        device_rows.append({
            "id": device_id, "name": row.name, "fleet_id": fleets[row.fleet].id,
            "mcu": target.name, "cpu": target.cpu.value, "sram_bytes": target.sram_bytes,
            "flash_bytes": target.flash_bytes, "slot_bytes": slot,
            "ota_layout": row.ota_layout.value, "state": DeviceState.ACTIVE,
            "mqtt_password_hash": pw_hash, "created_at": now, "decommissioned_at": None,
        })
        tag_rows.extend({"device_id": device_id, "tag": t} for t in sorted(set(row.tags)))
    # Core inserts with executemany: 10,000 ORM objects would cost seconds.
    session.execute(insert(Device), device_rows)
    if tag_rows:
        session.execute(insert(DeviceTag), tag_rows)
    return [Registered(str(values["id"]), row.name, row.fleet, password)
            for values, row, (password, _h) in zip(device_rows, rows, credentials,
                                                   strict=True)]


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


def _no_device(key: str) -> ApiError:
    what = "id" if _DEVICE_ID.fullmatch(key) else "id or name"
    message = f"no device with {what} {shown(key)}"
    if what == "id":
        message += " (keys of the form dev-<16 hex digits> are ids, never names)"
    return ApiError(404, message, [FieldError("id", message)])


def find_device(session: Session, key: str) -> Device:
    """The device with id `key` when `key` has an id's form, else with name `key`; 404.

    Names may not take an id's form, so a key always means one thing (a device named so
    before that rule is reachable by its id).
    """
    if _DEVICE_ID.fullmatch(key):
        device = session.get(Device, key)
    elif _DEVICE_NAME.fullmatch(key):
        device = session.scalar(select(Device).where(Device.name == key))
    else:  # no device can have this key: do not send it to the database at all
        device = None
    if device is None:
        raise _no_device(key)
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


# ---- credential rotation ----------------------------------------------------------------

@dataclass(frozen=True)
class Selected:
    """A device chosen for rotation."""

    device_id: str
    name: str
    fleet: str
    active: bool


def _selected(session: Session, ids: list[str]) -> dict[str, Selected]:
    found: dict[str, Selected] = {}
    for i in range(0, len(ids), _CHUNK):
        for device_id, name, fleet, state in session.execute(
                select(Device.id, Device.name, Fleet.name, Device.state)
                .join(Fleet, Fleet.id == Device.fleet_id)
                .where(Device.id.in_(ids[i:i + _CHUNK]))):
            found[device_id] = Selected(device_id, name, fleet,
                                        state is DeviceState.ACTIVE)
    return found


def select_for_rotation(session: Session, spec: CredentialRotation) -> list[Selected]:
    """The devices a rotation request names (in its order) or selects (by id); 422 for an
    unknown key, 409 for a decommissioned one, 413 above 10,000."""
    if spec.devices is not None:
        return _select_keys(session, spec.devices)
    filters = device_filters(session, spec.fleet, spec.mcu, DeviceState.ACTIVE)
    stmt = select(Device.id).where(*filters.indexed())
    for tag in dict.fromkeys(spec.tag or []):
        stmt = stmt.where(Device.id.in_(select(DeviceTag.device_id).where(DeviceTag.tag == tag)))
    ids = list(session.scalars(stmt.order_by(Device.id).limit(MAX_BULK_DEVICES + 1)))
    if len(ids) > MAX_BULK_DEVICES:
        message = (f"the filters select more than {MAX_BULK_DEVICES} devices; narrow them "
                   "(e.g. by tag) and rotate in several requests")
        raise ApiError(413, message, [FieldError("devices", message)])
    if not ids:
        raise ApiError(422, "the filters select no active device",
                       [FieldError("devices", "the filters select no active device")])
    found = _selected(session, ids)
    return [found[i] for i in ids]


def _select_keys(session: Session, keys: list[str]) -> list[Selected]:
    by_key: dict[str, str] = {}
    ids = [k for k in keys if _DEVICE_ID.fullmatch(k)]
    names = [k for k in keys if not _DEVICE_ID.fullmatch(k)]
    by_key.update({i: i for i in ids})
    for i in range(0, len(names), _CHUNK):
        rows = session.execute(select(Device.name, Device.id)
                               .where(Device.name.in_(names[i:i + _CHUNK])))
        by_key.update((name, device_id) for name, device_id in rows)
    found = _selected(session, list(dict.fromkeys(by_key.values())))
    errors: list[FieldError] = []
    conflicts: list[FieldError] = []
    seen: dict[str, int] = {}
    out: list[Selected] = []
    for index, key in enumerate(keys):
        device = found.get(by_key.get(key, ""))
        if device is None:
            errors.append(FieldError("devices", _no_device(key).detail, index))
        elif not device.active:
            conflicts.append(FieldError("devices", f"device {device.device_id} "
                                                   f"({device.name}) is decommissioned", index))
        elif device.device_id in seen:
            errors.append(FieldError("devices", f"device {device.device_id} is also in row "
                                                f"{seen[device.device_id]}", index))
        else:
            seen[device.device_id] = index
            out.append(device)
    if errors or conflicts:
        everything = sorted(errors + conflicts, key=lambda e: e.index or 0)
        first = everything[0]
        raise ApiError(422 if errors else 409,
                       f"row {first.index}: {first.message}; {len(everything)} error(s), "
                       "no password was changed", everything)
    return out


def rotate_credentials(session: Session, devices: list[Selected], ctx: RegistryContext, *,
                       progress: Progress | None = None,
                       before_commit: Callable[[list[Registered]], None] | None = None,
                       ) -> list[Registered]:
    """New MQTT passwords for the active ones of `devices` (decommissioned ones get None);
    the old passwords stop working when the broker has been updated."""
    active = [d for d in devices if d.active]
    credentials = iter(_new_credentials(len(active), progress))
    out: list[Registered] = []
    changes: list[dict[str, object]] = []
    for device in devices:
        if not device.active:
            out.append(Registered(device.device_id, device.name, device.fleet, None))
            continue
        password, pw_hash = next(credentials)
        changes.append({"id": device.device_id, "mqtt_password_hash": pw_hash})
        out.append(Registered(device.device_id, device.name, device.fleet, password))
    try:
        if changes:
            # ORM bulk UPDATE by primary key (executemany); only active rows: a device
            # decommissioned meanwhile keeps no credentials.
            session.execute(update(Device).where(Device.state == DeviceState.ACTIVE), changes,
                            execution_options={"synchronize_session": None})
        if before_commit is not None:
            before_commit(out)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    after_change(session, ctx, [DeviceChange.rotated(r.device_id, r.mqtt_password)
                                for r in out if r.mqtt_password is not None])
    return out


def rotate_one(session: Session, key: str, ctx: RegistryContext) -> tuple[Device, str]:
    """A new MQTT password for one device; 409 when it is decommissioned."""
    device = find_device(session, key)
    if device.state is not DeviceState.ACTIVE:
        message = f"device {device.id} ({device.name}) is decommissioned: it has no credentials"
        raise ApiError(409, message, [FieldError("id", message)])
    (done,) = rotate_credentials(session, [Selected(device.id, device.name, device.fleet_name,
                                                    True)], ctx)
    session.refresh(device)
    assert done.mqtt_password is not None
    return device, done.mqtt_password


def replay_devices(session: Session, device_ids: list[str]) -> list[Selected]:
    """The devices of an earlier answer, in its order (active or not)."""
    found = _selected(session, device_ids)
    return [found[i] for i in device_ids if i in found]

