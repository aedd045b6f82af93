"""Broker files from the registry (no broker running): the base password file and ACL, their
modes, the `$7$` hash format checked against the real mosquitto_passwd, and how each change
becomes dynamic-security commands."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path
from types import FrameType

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from service import db
from service.broker_files import (
    ACL_FILE,
    ADMIN_USERNAME,
    PASSWORD_FILE,
    PROBE_USERNAME,
    SERVICE_USERNAME,
    admin_password,
    reload_mosquitto,
    render_acl,
    render_empty_dynsec,
    service_password,
)
from service.broker_sync import (
    BrokerTarget,
    ChangeKind,
    DeviceChange,
    SyncMode,
    _commands_for,
    apply_changes,
)
from service.models import DeviceState
from service.mqtt_passwords import hash_password, verify_password
from service.registry import RegistryContext, decommission, register_devices
from service.schemas import DeviceCreate
from service.stack.config import free_port
from service.stack.mosquitto import MosquittoFiles, render_mosquitto_conf

pytestmark = pytest.mark.unit


@pytest.fixture
def session(tmp_path: Path) -> Session:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    db.upgrade(url)
    return db.make_sessionmaker(db.make_engine(url))()


def _ctx(tmp_path: Path) -> RegistryContext:
    # A port nothing listens on: no broker, so changes go to the base files.
    return RegistryContext(key_dir=tmp_path / "keys", broker_dir=tmp_path / "broker",
                           pid_file=tmp_path / "mosquitto.pid", mqtt_port=free_port())


def users(path: Path) -> dict[str, str]:
    """username -> hash of a password file."""
    return dict(line.split(":", 1) for line in path.read_text().splitlines())


def test_without_a_broker_the_base_files_follow_the_registry(session: Session,
                                                             tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    rows = [DeviceCreate(name=f"d{i}", fleet="f", mcu="rp2040") for i in range(3)]
    result = register_devices(session, rows, ctx, create_fleets=True)
    pw_file = ctx.broker_dir / PASSWORD_FILE
    found = users(pw_file)
    assert set(found) == {SERVICE_USERNAME, ADMIN_USERNAME, PROBE_USERNAME,
                          *(r.device_id for r in result.devices)}
    for r in result.devices:
        assert verify_password(r.mqtt_password, found[r.device_id])
    assert verify_password(service_password(ctx.broker_dir), found[SERVICE_USERNAME])
    assert verify_password(admin_password(ctx.broker_dir), found[ADMIN_USERNAME])
    decommission(session, result.devices[0].device_id, ctx)
    found = users(pw_file)
    assert result.devices[0].device_id not in found and len(found) == 5
    for name in (PASSWORD_FILE, ACL_FILE, "service-account.secret", "broker-admin.secret"):
        path = ctx.broker_dir / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
        if os.geteuid() == 0 and shutil.which("mosquitto") and name in (PASSWORD_FILE,
                                                                          ACL_FILE):
            import pwd

            assert path.stat().st_uid == pwd.getpwnam("mosquitto").pw_uid
    assert stat.S_IMODE(ctx.broker_dir.stat().st_mode) == 0o700
    assert not list(ctx.broker_dir.glob(".*.tmp"))


def test_acl_confines_devices_and_gives_the_admin_only_the_control_topics() -> None:
    acl = render_acl().splitlines()
    rules = [line for line in acl if line and not line.startswith("#")]
    assert rules == ["pattern readwrite tinyfleet/v1/%u/#",
                     f"user {SERVICE_USERNAME}", "topic readwrite tinyfleet/v1/#",
                     f"user {ADMIN_USERNAME}", "topic write $CONTROL/dynamic-security/v1",
                     "topic read $CONTROL/dynamic-security/v1/response"]
    empty = json.loads(render_empty_dynsec())
    assert empty["clients"] == [] and not any(empty["defaultACLAccess"].values())


def test_mosquitto_conf_has_both_auth_layers_and_binds_client_ids(tmp_path: Path) -> None:
    files = MosquittoFiles.in_dir(tmp_path / "broker")
    conf = render_mosquitto_conf(files, 18999, plugin=Path("/x/dynsec.so")).splitlines()
    for line in ("allow_anonymous false", "plugin /x/dynsec.so",
                 f"plugin_opt_config_file {files.dynsec_file}",
                 f"password_file {files.password_file}", f"acl_file {files.acl_file}",
                 f"listener 0 {files.socket_file}"):
        assert line in conf
    # The TCP listener, the devices' one, rewrites the client id; the plugin comes first.
    tcp = conf.index("listener 18999 127.0.0.1")
    assert conf[tcp + 1] == "use_username_as_clientid true"
    assert conf.index("plugin /x/dynsec.so") < conf.index(f"password_file {files.password_file}")
    long_dir = MosquittoFiles.in_dir(tmp_path / ("x" * 120))
    assert not any(line.startswith("listener 0 ")
                   for line in render_mosquitto_conf(long_dir, 18999, plugin=Path("/p")).split(
                       "\n"))


def test_each_change_becomes_the_commands_of_the_registry_state() -> None:
    pw_hash = hash_password("pw-1")
    active = (DeviceState.ACTIVE, pw_hash)
    new = _commands_for(DeviceChange.registered("dev-a", "pw-1"), active)
    assert new == [{"command": "createClient", "username": "dev-a", "password": "pw-1",
                    "clientid": "dev-a"}]
    rotated = _commands_for(DeviceChange.rotated("dev-a", "pw-1"), active)
    assert [c["command"] for c in rotated] == ["createClient", "setClientPassword"]
    # Whatever the change says, the stored state decides: decommissioned or gone -> disabled.
    for row in [(DeviceState.DECOMMISSIONED, None), None]:
        for change in (DeviceChange.registered("dev-a", "pw-1"),
                       DeviceChange.decommissioned("dev-a")):
            assert [c["command"] for c in _commands_for(change, row)] == [
                "createClient", "disableClient"]
    # A password that is no longer the stored one (a newer rotation committed) is not sent.
    assert _commands_for(DeviceChange.rotated("dev-a", "older"), active) == []


def test_a_change_never_shows_its_password() -> None:
    change = DeviceChange.rotated("dev-a", "s3cret-pw")
    assert "s3cret-pw" not in repr(change) and "s3cret-pw" not in str(change)
    assert change.kind is ChangeKind.ROTATED
    with pytest.raises(ValueError, match="needs the new password"):
        DeviceChange("dev-a", ChangeKind.REGISTERED)
    with pytest.raises(ValueError, match="takes no password"):
        DeviceChange("dev-a", ChangeKind.DECOMMISSIONED, "x")


def test_no_broker_means_files_only(session: Session, tmp_path: Path) -> None:
    target = BrokerTarget(tmp_path / "broker", None, "127.0.0.1", free_port())
    engine = session.get_bind()
    assert isinstance(engine, Engine)
    outcome = apply_changes(engine, target, [DeviceChange.decommissioned("dev-x")])
    assert outcome.mode is SyncMode.FILES and outcome.devices == 0
    assert (target.broker_dir / PASSWORD_FILE).exists()


def test_reload_never_signals_a_pid_that_is_not_mosquitto(tmp_path: Path) -> None:
    # The real reload (SIGHUP to a running Mosquitto) is exercised in test_broker.py; here a
    # stale pid file naming some other process (this one) must not get a SIGHUP.
    received: list[int] = []

    def on_hup(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    pid_file = tmp_path / "mosquitto.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    previous = signal.signal(signal.SIGHUP, on_hup)
    try:
        pid = reload_mosquitto(pid_file)
        time.sleep(0.1)
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert received == [] and pid is None
    # No pid file, or a pid that is gone: nothing is signalled, no error.
    assert reload_mosquitto(tmp_path / "absent.pid") is None
    pid_file.write_text("4194303\n")
    assert reload_mosquitto(pid_file) is None


def test_hash_is_byte_identical_to_mosquitto_passwd(tmp_path: Path) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd is not installed (apt-get install mosquitto)")
    path = tmp_path / "pw"
    path.write_text("alice:s3cret-Pa55\nbob:other\n")
    subprocess.run([tool, "-U", str(path)], check=True, capture_output=True, timeout=30)
    theirs = dict(line.split(":", 1) for line in path.read_text().splitlines())
    assert verify_password("s3cret-Pa55", theirs["alice"])
    assert not verify_password("s3cret-Pa55", theirs["bob"])
    # Same salt -> the same string as mosquitto_passwd writes: the format is identical.
    _, seven, iterations, salt, _digest = theirs["alice"].split("$")
    ours = hash_password("s3cret-Pa55", base64.b64decode(salt), int(iterations))
    assert seven == "7" and ours == theirs["alice"]
