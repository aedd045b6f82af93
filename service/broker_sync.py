"""Keeping Mosquitto's auth state equal to the registry's, in milliseconds at 100,000 devices.

The database is the only source of truth; the broker holds two layers (service/broker_files.py):
a base password file written from the database, and the dynamic-security plugin's live layer
in front of it. Measured on Mosquitto 2.0.11 (BENCHMARKS.md, "Fleet registry"):

- a live command costs the plugin a rewrite of its own JSON file, about 8 us per client it
  holds (0.35 s at 100,000 clients), so the live layer is kept small (`LIVE_MAX`);
- a base rewrite + SIGHUP costs ~1 s at 100,000 devices (the broker stalls for the parse).

So `apply_changes` sends each small change as live commands (a new or rotated password, or
disable for a decommission: the plugin drops the device's sessions at once), and folds the live
layer into the base (`full_sync`) when it outgrows `LIVE_MAX` or a change set is bulk.

The plugin's control API takes plaintext passwords only; its JSON file would take our hashes
but is read once, at start. A new or rotated password is therefore sent to the broker once, in
memory, over the service's local socket (it stores its own PBKDF2-SHA512 hash); the rebuild
after a restart needs no plaintext, because the base is the database's `$7$` hashes.

Every writer holds `broker_lock` and re-reads the changed devices from the database: whatever
order concurrent requests commit in, the broker ends with the last commit's state (a password
is applied only if it is still the stored one; the newer change's own call applies its own).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from service.broker_control import (
    CONNACK_ACCEPTED,
    BrokerControlError,
    BrokerEndpoint,
    BrokerUnreachable,
    DynsecSession,
    mqtt_connack,
)
from service.broker_files import (
    ADMIN_USERNAME,
    PROBE_USERNAME,
    SYSTEM_USERNAMES,
    admin_password,
    reload_mosquitto,
    reset_dynsec_file,
    write_base_files,
)
from service.models import Device, DeviceState
from service.mqtt_passwords import verify_password
from service.private_files import PRIVATE_FILE, private_dir

log = logging.getLogger(__name__)

BULK_CHANGES = 100  # a call with more changes rewrites the base instead (one reload)
LIVE_MAX = 300  # live-layer clients beyond which the layer is folded into the base
RELOAD_TIMEOUT_S = 30.0
RESIGNAL_S = 3.0  # no reload seen after this long: SIGHUP again
_CHUNK = 500  # IN (...) lists stay far below SQLite's and PostgreSQL's parameter limits
_LOCK_ID = 7_412_009  # PostgreSQL advisory lock: one broker writer at a time, on any host
_EXISTS = "Client already exists"


class ChangeKind(StrEnum):
    """What happened to a device's MQTT credentials."""

    REGISTERED = "registered"
    ROTATED = "rotated"
    DECOMMISSIONED = "decommissioned"


@dataclass(frozen=True)
class DeviceChange:
    """One committed change; `password` is the new plaintext (never stored, never logged)."""

    device_id: str
    kind: ChangeKind
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.kind is ChangeKind.DECOMMISSIONED) != (self.password is None):
            raise ValueError(f"{self.device_id}: a {self.kind.value} change "
                             f"{'takes no' if self.password else 'needs the new'} password")

    @classmethod
    def registered(cls, device_id: str, password: str) -> DeviceChange:
        """A device just registered with `password`."""
        return cls(device_id, ChangeKind.REGISTERED, password)

    @classmethod
    def rotated(cls, device_id: str, password: str) -> DeviceChange:
        """A device's password replaced by `password` (its sessions on the old one drop)."""
        return cls(device_id, ChangeKind.ROTATED, password)

    @classmethod
    def decommissioned(cls, device_id: str) -> DeviceChange:
        """A device decommissioned (refused from now on, its sessions dropped)."""
        return cls(device_id, ChangeKind.DECOMMISSIONED)


@dataclass(frozen=True)
class BrokerTarget:
    """The broker the registry keeps in step: its files, our pid file, where it listens."""

    broker_dir: Path
    pid_file: Path | None = None  # our own Mosquitto (SIGHUP after a base rewrite)
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 18883

    def endpoint(self) -> BrokerEndpoint:
        """Its local socket when it has one, else host:port."""
        return BrokerEndpoint.for_broker_dir(self.broker_dir, self.mqtt_host, self.mqtt_port)


class SyncMode(StrEnum):
    """How a change reached the broker."""

    LIVE = "live"  # dynamic-security commands, no reload
    RELOAD = "reload"  # base rewritten, broker reloaded, stale live entries removed
    FILES = "files"  # base rewritten; no broker answered (it reads them when it starts)


@dataclass(frozen=True)
class SyncOutcome:
    """What one sync did."""

    mode: SyncMode
    devices: int  # changes sent live, or active devices in the base
    seconds: float
    live_clients: int | None = None  # clients in the live layer afterwards, when known
    detail: str = ""


@contextlib.contextmanager
def broker_lock(engine: Engine, broker_dir: Path) -> Iterator[None]:
    """One broker writer at a time: a PostgreSQL advisory lock, else a file lock."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _LOCK_ID})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _LOCK_ID})
        return
    private_dir(Path(broker_dir))
    fd = os.open(Path(broker_dir) / ".sync.lock", os.O_RDWR | os.O_CREAT, PRIVATE_FILE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def apply_changes(engine: Engine, target: BrokerTarget,
                  changes: Sequence[DeviceChange]) -> SyncOutcome:
    """Make committed `changes` take effect at the broker (live when few, else one reload)."""
    start = time.perf_counter()
    if not changes:
        return SyncOutcome(SyncMode.LIVE, 0, 0.0)
    with broker_lock(engine, target.broker_dir):
        if len(changes) > BULK_CHANGES:
            return _full_sync(engine, target, {c.device_id for c in changes}, start)
        try:
            return _apply_live(engine, target, changes, start)
        except BrokerUnreachable as exc:
            return _files_only(engine, target, start, str(exc))
        except BrokerControlError as exc:
            # Refused (the broker lost our state or is not ours) or an unexpected answer:
            # rebuild everything from the database.
            log.warning("live broker update failed (%s); rebuilding from the registry", exc)
            return _full_sync(engine, target, None, start)


def full_sync(engine: Engine, target: BrokerTarget) -> SyncOutcome:
    """Rewrite the base from the database, reload the broker and empty its live layer."""
    start = time.perf_counter()
    with broker_lock(engine, target.broker_dir):
        return _full_sync(engine, target, None, start)


def ensure_in_step(engine: Engine, target: BrokerTarget) -> SyncOutcome | None:
    """Rebuild the broker from the database if it refuses our admin account (it lost its
    state: restarted empty, or its files replaced); None when it is in step or unreachable.

    The stack's supervisor calls this every 10 seconds, so a broker that lost its state is
    rebuilt even when no change comes to reveal it.
    """
    endpoint = target.endpoint()
    try:
        code = mqtt_connack(endpoint, (ADMIN_USERNAME, admin_password(target.broker_dir)))
    except OSError:
        return None
    if code == CONNACK_ACCEPTED:
        return None
    log.warning("the broker at %s refuses the registry's admin account (CONNACK %d): "
                "rebuilding it from the registry", endpoint, code)
    return full_sync(engine, target)


def prepare_start(engine: Engine, broker_dir: Path) -> int:
    """Before Mosquitto starts: the base from the database, an empty live layer.

    Call it holding `broker_lock` and keep holding it until the broker listens, so that no
    change committed in between is missed. Returns the number of active devices.
    """
    with Session(engine) as session:
        files = write_base_files(session, broker_dir)
    reset_dynsec_file(broker_dir)
    return files.devices


def _apply_live(engine: Engine, target: BrokerTarget, changes: Sequence[DeviceChange],
                start: float) -> SyncOutcome:
    rows = _current(engine, [c.device_id for c in changes])
    commands: list[dict[str, Any]] = []
    for change in changes:
        commands.extend(_commands_for(change, rows.get(change.device_id)))
    commands.append({"command": "listClients", "verbose": False, "count": 1})
    with DynsecSession(target.endpoint(), ADMIN_USERNAME,
                       admin_password(target.broker_dir)) as dynsec:
        answers = dynsec.run(commands)
        retry = _check(commands, answers)
        if retry:
            _check(retry, dynsec.run(retry))
    live = int(answers[-1].get("data", {}).get("totalCount", 0))
    if live > LIVE_MAX:
        log.info("live layer holds %d clients (> %d): folding it into the base", live, LIVE_MAX)
        return _full_sync(engine, target, None, start)
    return SyncOutcome(SyncMode.LIVE, len(changes), time.perf_counter() - start, live)


def _current(engine: Engine, ids: list[str]) -> dict[str, tuple[DeviceState, str | None]]:
    """(state, password hash) of each device as committed now (a fresh connection)."""
    found: dict[str, tuple[DeviceState, str | None]] = {}
    with engine.connect() as conn:
        for i in range(0, len(ids), _CHUNK):
            rows = conn.execute(select(Device.id, Device.state, Device.mqtt_password_hash)
                                .where(Device.id.in_(ids[i:i + _CHUNK])))
            found.update((r[0], (r[1], r[2])) for r in rows)
    return found


def _commands_for(change: DeviceChange,
                  row: tuple[DeviceState, str | None] | None) -> list[dict[str, Any]]:
    """The live commands that give `change.device_id` its registry state (maybe none)."""
    user = change.device_id
    if row is None or row[0] is not DeviceState.ACTIVE or row[1] is None:
        # Not active (or gone): refused, whatever else happened; disabling drops its sessions.
        return [{"command": "createClient", "username": user},
                {"command": "disableClient", "username": user}]
    if change.password is None:
        log.warning("%s: reported %s but the registry says active; left as it is",
                    user, change.kind.value)
        return []
    if not verify_password(change.password, row[1]):
        # A newer password was committed since: its own call applies it, this one must not.
        log.info("%s: superseded by a newer password; not applied", user)
        return []
    # The client id is bound too: on the Unix-socket listener nothing rewrites it.
    commands: list[dict[str, Any]] = [{"command": "createClient", "username": user,
                                       "password": change.password, "clientid": user}]
    if change.kind is ChangeKind.ROTATED:
        # Also for a client the layer already has; it drops sessions on the old password.
        commands.append({"command": "setClientPassword", "username": user,
                         "password": change.password})
    return commands


def _check(commands: list[dict[str, Any]],
           answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Raise on an unexpected error; the follow-up commands an existing client needs."""
    retry: list[dict[str, Any]] = []
    for i, (command, answer) in enumerate(zip(commands, answers, strict=True)):
        error = answer.get("error")
        if error is None:
            continue
        if command["command"] == "createClient" and error == _EXISTS:
            following = commands[i + 1] if i + 1 < len(commands) else {}
            if "password" in command and following.get("username") != command["username"]:
                # A registration whose id the layer already had: set the password instead.
                retry.append({"command": "setClientPassword", "username": command["username"],
                              "password": command["password"]})
            continue
        raise BrokerControlError(f"{command['command']} {command.get('username', '')}: "
                                 f"{error}")
    return retry


def _files_only(engine: Engine, target: BrokerTarget, start: float,
                why: str) -> SyncOutcome:
    """No broker answers: the base follows the registry, so a broker starting now is right."""
    with Session(engine) as session:
        files = write_base_files(session, target.broker_dir)
    reload_mosquitto(target.pid_file)
    log.info("broker not reachable (%s): base files rewritten", why)
    return SyncOutcome(SyncMode.FILES, files.devices, time.perf_counter() - start, None, why)


def _full_sync(engine: Engine, target: BrokerTarget, forget: set[str] | None,
               start: float) -> SyncOutcome:
    """Base from the database, reload, then drop the live entries the base now covers.

    `forget`: only these devices' live entries (a bulk change); None: all of them.
    """
    with Session(engine) as session:
        files = write_base_files(session, target.broker_dir)
    pid = reload_mosquitto(target.pid_file)
    endpoint = target.endpoint()
    if pid is None:
        # Not our broker (or none): it reads the files when it (re)starts. Its live layer
        # cannot be emptied safely before it has reloaded the base.
        return SyncOutcome(SyncMode.FILES, files.devices, time.perf_counter() - start, None,
                           "base rewritten; no broker of ours to reload")
    try:
        _wait_reloaded(endpoint, files.probe_password, target.pid_file)
        with DynsecSession(endpoint, ADMIN_USERNAME, admin_password(target.broker_dir)) as ds:
            live = _live_clients(ds)
            drop = sorted((live if forget is None else live & forget) - set(SYSTEM_USERNAMES))
            # Deleting drops the device's sessions; it reconnects on the base at once.
            for answer, user in zip(ds.run([{"command": "deleteClient", "username": u}
                                            for u in drop]), drop, strict=True):
                if "error" in answer:
                    log.warning("deleteClient %s: %s", user, answer["error"])
            remaining = len(live) - len(drop)
    except BrokerUnreachable as exc:
        return SyncOutcome(SyncMode.FILES, files.devices, time.perf_counter() - start, None,
                           str(exc))
    except BrokerControlError as exc:
        # The registry's change is committed; failing the request would not undo it.
        log.error("broker at %s not in step with the registry: %s (does it use %s?)",
                  endpoint, exc, target.broker_dir)
        return SyncOutcome(SyncMode.FILES, files.devices, time.perf_counter() - start, None,
                           str(exc))
    return SyncOutcome(SyncMode.RELOAD, files.devices, time.perf_counter() - start, remaining)


def _wait_reloaded(endpoint: BrokerEndpoint, probe_password: str,
                   pid_file: Path | None) -> None:
    """Until the broker accepts this base's probe login, i.e. it has reloaded the base.

    Mosquitto drops a SIGHUP that arrives while it is reloading (one flag, cleared when the
    reload ends); ours never overlap (the lock), but one from elsewhere may: signal again.
    """
    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    resignal = time.monotonic() + RESIGNAL_S
    while True:
        try:
            if mqtt_connack(endpoint, (PROBE_USERNAME, probe_password)) == CONNACK_ACCEPTED:
                return
        except OSError as exc:
            raise BrokerUnreachable(f"MQTT broker at {endpoint}: {exc}") from exc
        now = time.monotonic()
        if now >= deadline:
            raise BrokerControlError(f"the broker at {endpoint} did not reload its password "
                                     f"file within {RELOAD_TIMEOUT_S:.0f} s")
        if now >= resignal:
            reload_mosquitto(pid_file)
            resignal = now + RESIGNAL_S
        time.sleep(0.01)


def _live_clients(dynsec: DynsecSession) -> set[str]:
    """Every username the live layer holds."""
    answer = dynsec.run([{"command": "listClients", "verbose": False, "count": -1}])[0]
    if "error" in answer:
        raise BrokerControlError(f"listClients: {answer['error']}")
    return set(answer.get("data", {}).get("clients", []))
