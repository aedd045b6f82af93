"""Broker files from the registry: content, atomic writes, modes, reload, and the `$7$`
hash format checked against the real mosquitto_passwd."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path
from types import FrameType

import pytest
from sqlalchemy.orm import Session

from service import db
from service.broker_files import (
    ACL_FILE,
    PASSWORD_FILE,
    SERVICE_USERNAME,
    render_acl,
    service_password,
    sync_broker_files,
)
from service.mqtt_passwords import hash_password, verify_password
from service.registry import RegistryContext, decommission, register_devices
from service.schemas import DeviceCreate


@pytest.fixture
def session(tmp_path: Path) -> Session:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    db.upgrade(url)
    return db.make_sessionmaker(db.make_engine(url))()


def _ctx(tmp_path: Path, pid_file: Path | None = None) -> RegistryContext:
    return RegistryContext(key_dir=tmp_path / "keys", broker_dir=tmp_path / "broker",
                           pid_file=pid_file)


@pytest.mark.unit
def test_password_file_follows_the_registry(session: Session, tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    rows = [DeviceCreate(name=f"d{i}", fleet="f", mcu="rp2040") for i in range(3)]
    result = register_devices(session, rows, ctx, create_fleets=True)
    lines = (ctx.broker_dir / PASSWORD_FILE).read_text().splitlines()
    users = dict(line.split(":", 1) for line in lines)
    assert set(users) == {SERVICE_USERNAME, *(r.device_id for r in result.devices)}
    for r in result.devices:
        assert verify_password(r.mqtt_password, users[r.device_id])
    assert verify_password(service_password(ctx.broker_dir), users[SERVICE_USERNAME])
    decommission(session, result.devices[0].device_id, ctx)
    users = dict(line.split(":", 1) for line in
                 (ctx.broker_dir / PASSWORD_FILE).read_text().splitlines())
    assert result.devices[0].device_id not in users and len(users) == 3
    for name in (PASSWORD_FILE, ACL_FILE):
        path = ctx.broker_dir / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        if os.geteuid() == 0 and shutil.which("mosquitto"):
            import pwd

            assert path.stat().st_uid == pwd.getpwnam("mosquitto").pw_uid
    assert stat.S_IMODE((ctx.broker_dir / "service-account.secret").stat().st_mode) == 0o600
    assert not list(ctx.broker_dir.glob(".*.tmp"))


@pytest.mark.unit
def test_acl_confines_devices_to_their_subtree() -> None:
    acl = render_acl().splitlines()
    rules = [line for line in acl if line and not line.startswith("#")]
    assert rules == ["pattern readwrite tinyfleet/v1/%u/#", f"user {SERVICE_USERNAME}",
                     "topic readwrite tinyfleet/v1/#"]


@pytest.mark.unit
def test_sync_never_signals_a_pid_that_is_not_mosquitto(session: Session,
                                                        tmp_path: Path) -> None:
    # The real reload (SIGHUP to a running Mosquitto) is exercised in test_broker.py; here a
    # stale pid file naming some other process (this one) must not get a SIGHUP.
    received: list[int] = []

    def on_hup(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)

    pid_file = tmp_path / "mosquitto.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    previous = signal.signal(signal.SIGHUP, on_hup)
    try:
        result = sync_broker_files(session, tmp_path / "broker", pid_file)
        time.sleep(0.1)
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert received == [] and result.reloaded_pid is None
    assert result.password_file.exists()
    # No pid file, or a pid that is gone: files are written, nothing is signalled, no error.
    assert sync_broker_files(session, tmp_path / "broker",
                             tmp_path / "absent.pid").reloaded_pid is None
    pid_file.write_text("4194303\n")
    assert sync_broker_files(session, tmp_path / "broker", pid_file).reloaded_pid is None


@pytest.mark.unit
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
    import base64

    _, seven, iterations, salt, _digest = theirs["alice"].split("$")
    ours = hash_password("s3cret-Pa55", base64.b64decode(salt), int(iterations))
    assert seven == "7" and ours == theirs["alice"]
