"""The registry's tables: fleets, devices (with tags), API tokens and idempotency keys."""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from service.db import Base


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class Role(enum.Enum):
    """API token roles, each including the rights of the ones before it."""

    VIEWER = "viewer"  # read
    OPERATOR = "operator"  # register devices, start campaigns
    ADMIN = "admin"  # tokens, decommissioning

    @property
    def rank(self) -> int:
        """Position in viewer < operator < admin."""
        return _ROLE_RANK[self]

    def allows(self, needed: Role) -> bool:
        """True when this role has at least the rights of `needed`."""
        return self.rank >= needed.rank


_ROLE_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


class DeviceState(enum.Enum):
    """Registry state of a device (connectivity is reported separately, over MQTT)."""

    ACTIVE = "active"
    DECOMMISSIONED = "decommissioned"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Store the lowercase values (what the API shows), as VARCHAR with a CHECK constraint.
    return Enum(cls, name=name, native_enum=False, create_constraint=True, length=20,
                values_callable=lambda e: [m.value for m in e])


class Fleet(Base):
    """A group of devices sharing one Ed25519 firmware-signing key."""

    __tablename__ = "fleets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    signing_public_key: Mapped[str] = mapped_column(Text)  # PEM, SubjectPublicKeyInfo
    signing_key_path: Mapped[str] = mapped_column(Text)  # PEM PKCS#8 file, mode 0600
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    devices: Mapped[list[Device]] = relationship(back_populates="fleet")


class Device(Base):
    """One MCU in the field. `id` is also its MQTT username."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    fleet_id: Mapped[int] = mapped_column(ForeignKey("fleets.id"))
    mcu: Mapped[str] = mapped_column(String(32))  # catalog name, or "custom"
    cpu: Mapped[str] = mapped_column(String(20))  # firmware.targets.Cpu value
    sram_bytes: Mapped[int] = mapped_column(Integer)
    flash_bytes: Mapped[int] = mapped_column(Integer)
    slot_bytes: Mapped[int] = mapped_column(Integer)  # Flash one firmware image may use
    ota_layout: Mapped[str] = mapped_column(String(10))  # firmware.targets.OtaLayout value
    state: Mapped[DeviceState] = mapped_column(_enum(DeviceState, "device_state"),
                                               default=DeviceState.ACTIVE)
    # Mosquitto's own PBKDF2-SHA512 format ($7$...); None once decommissioned.
    mqtt_password_hash: Mapped[str | None] = mapped_column(String(160))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    decommissioned_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    fleet: Mapped[Fleet] = relationship(back_populates="devices", lazy="joined")
    tag_rows: Mapped[list[DeviceTag]] = relationship(
        cascade="all, delete-orphan", lazy="selectin", order_by="DeviceTag.tag")

    # One index per combination of the list filters, each ending in `id`: a filtered page
    # (ordered by id, after a cursor) is one range of one index, never a sort of every match.
    __table_args__ = (
        Index("ix_devices_fleet_id", "fleet_id", "id"),
        Index("ix_devices_mcu_id", "mcu", "id"),
        Index("ix_devices_state_id", "state", "id"),
        Index("ix_devices_fleet_mcu_id", "fleet_id", "mcu", "id"),
        Index("ix_devices_fleet_state_id", "fleet_id", "state", "id"),
        Index("ix_devices_mcu_state_id", "mcu", "state", "id"),
        Index("ix_devices_fleet_mcu_state_id", "fleet_id", "mcu", "state", "id"),
    )
    @property
    def fleet_name(self) -> str:
        """The name of the device's fleet."""
        return self.fleet.name

    @property
    def tags(self) -> list[str]:
        """The device's tags, sorted."""
        return [row.tag for row in self.tag_rows]

    @property
    def mqtt_username(self) -> str:
        """The MQTT username: the device id."""
        return self.id


class DeviceTag(Base):
    """One tag of one device (a table, not a JSON column, so filters use an index)."""

    __tablename__ = "device_tags"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)

    # (tag, device_id) covers "devices with tag X": the filter never touches the table.
    __table_args__ = (Index("ix_device_tags_tag_device", "tag", "device_id"),)


class ApiToken(Base):
    """An API bearer token; only the SHA-256 of the secret is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[Role] = mapped_column(_enum(Role, "token_role"))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, to recognise a token
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # None: never


class IdempotencyState(enum.Enum):
    """Progress of a request sent with an Idempotency-Key."""

    IN_PROGRESS = "in_progress"
    DONE = "done"


class IdempotencyKey(Base):
    """A bulk request's Idempotency-Key and what it did (kept 24 h).

    Only device ids are kept, never passwords: a retry gets the same devices with passwords
    rotated again.
    """

    __tablename__ = "idempotency_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope: Mapped[str] = mapped_column(String(32))  # the route, e.g. "devices.bulk"
    key: Mapped[str] = mapped_column(String(255))
    request_sha256: Mapped[str] = mapped_column(String(64))
    state: Mapped[IdempotencyState] = mapped_column(_enum(IdempotencyState, "idempotency_state"))
    device_ids: Mapped[str | None] = mapped_column(Text)  # JSON list, in answer order
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("scope", "key", name="uq_idempotency_keys_scope_key"),
        Index("ix_idempotency_keys_created_at", "created_at"),
    )
