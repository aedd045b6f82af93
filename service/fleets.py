"""Fleets: creation with an Ed25519 firmware-signing key pair, listing, lookup."""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from firmware.image import generate_signing_key, load_private_key, private_key_pem, public_key_pem
from service.models import Device, DeviceState, Fleet, utcnow
from service.parsing import shown
from service.problems import ApiError, FieldError, invalid
from service.schemas import FLEET_NAME_RE

_FLEET_NAME = re.compile(FLEET_NAME_RE)


def write_signing_key(key_dir: Path, fleet_name: str) -> tuple[Path, str]:
    """A new Ed25519 key: private PEM written 0600 under `key_dir`, public PEM returned."""
    key = generate_signing_key()
    key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # A random suffix and O_EXCL: a failed creation can never overwrite another fleet's key.
    path = key_dir / f"fleet-{fleet_name}-{secrets.token_hex(4)}.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_key_pem(key))
    return path, public_key_pem(key.public_key()).decode()


def load_signing_key(fleet: Fleet) -> Ed25519PrivateKey:
    """The fleet's private signing key (for the firmware signer)."""
    return load_private_key(Path(fleet.signing_key_path).read_bytes())


def new_fleet(session: Session, name: str, key_dir: Path, description: str = "") -> Fleet:
    """A fleet with a fresh key pair, added to the session (not committed); 409 if taken."""
    if session.scalar(select(Fleet.id).where(Fleet.name == name)) is not None:
        raise invalid("name", f"a fleet named {name!r} already exists", status=409)
    path, public_pem = write_signing_key(key_dir, name)
    fleet = Fleet(name=name, description=description, signing_public_key=public_pem,
                  signing_key_path=str(path.resolve()), created_at=utcnow())
    session.add(fleet)
    return fleet


def discard_key(fleet: Fleet) -> None:
    """Remove the key file of a fleet whose creation was rolled back."""
    Path(fleet.signing_key_path).unlink(missing_ok=True)


def list_fleets(session: Session) -> list[tuple[Fleet, int]]:
    """Every fleet with its number of active devices, by name."""
    counts = (select(Device.fleet_id, func.count().label("n"))
              .where(Device.state == DeviceState.ACTIVE).group_by(Device.fleet_id).subquery())
    rows = session.execute(select(Fleet, func.coalesce(counts.c.n, 0))
                           .outerjoin(counts, counts.c.fleet_id == Fleet.id)
                           .order_by(Fleet.name))
    return [(fleet, int(n)) for fleet, n in rows]


def get_fleet(session: Session, name: str) -> tuple[Fleet, int]:
    """The fleet called `name` with its active device count; 404 when none."""
    # A name no fleet can have (bad characters, a NUL byte) never reaches the database.
    fleet = (session.scalar(select(Fleet).where(Fleet.name == name))
             if _FLEET_NAME.fullmatch(name) else None)
    if fleet is None:
        message = f"no fleet named {shown(name)}"
        raise ApiError(404, message, [FieldError("name", message)])
    n = session.scalar(select(func.count()).select_from(Device).where(
        Device.fleet_id == fleet.id, Device.state == DeviceState.ACTIVE))
    return fleet, int(n or 0)
