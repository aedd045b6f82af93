"""Request and response schemas of the API (validated and documented from one place)."""

from __future__ import annotations

from dataclasses import dataclass, field

from firmware.targets import (
    CATALOG,
    MAX_FLASH_BYTES,
    MAX_SRAM_BYTES,
    MIN_FLASH_BYTES,
    MIN_SRAM_BYTES,
    Cpu,
    OtaLayout,
)
from service.models import DeviceState, Role
from service.validation import meta

FLEET_NAME_RE = r"[a-z0-9][a-z0-9._-]{0,63}"
DEVICE_NAME_RE = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
TAG_RE = r"[A-Za-z0-9][A-Za-z0-9._:=-]{0,63}"
MAX_TAGS = 32
MAX_BULK_DEVICES = 10_000
MAX_PAGE_LIMIT = 1000
_field = field


# ---- requests ---------------------------------------------------------------------------

@dataclass(frozen=True)
class FleetCreate:
    """A new fleet; it gets its own Ed25519 firmware-signing key pair."""

    name: str = field(metadata=meta("fleet name, unique", pattern=FLEET_NAME_RE,
                                    example="greenhouse"))
    description: str = field(default="", metadata=meta("free text", max_length=500))


@dataclass(frozen=True)
class DeviceCreate:
    """One device: a catalog `mcu`, or explicit `sram_bytes`, `flash_bytes` and `cpu`."""

    name: str = field(metadata=meta("device name, unique across the registry",
                                    pattern=DEVICE_NAME_RE, example="gh-sensor-001"))
    fleet: str = field(metadata=meta("name of an existing fleet", pattern=FLEET_NAME_RE))
    mcu: str | None = field(default=None, metadata=meta(
        "catalog MCU name (GET /api/v1/mcus)", enum_values=tuple(sorted(CATALOG)),
        example="stm32f746"))
    sram_bytes: int | None = field(default=None, metadata=meta(
        "SRAM usable by the firmware, bytes (or '320KiB'); instead of mcu", size=True,
        minimum=MIN_SRAM_BYTES, maximum=MAX_SRAM_BYTES))
    flash_bytes: int | None = field(default=None, metadata=meta(
        "Flash size, bytes (or '1MiB'); instead of mcu", size=True,
        minimum=MIN_FLASH_BYTES, maximum=MAX_FLASH_BYTES))
    cpu: Cpu | None = field(default=None, metadata=meta("core; instead of mcu"))
    tags: list[str] = field(default_factory=list, metadata=meta(
        "free-form labels for selecting devices", pattern=TAG_RE, max_items=MAX_TAGS))
    ota_layout: OtaLayout = field(default=OtaLayout.AB, metadata=meta(
        "ab: two firmware slots (each gets half the Flash after the bootloader); "
        "single: one slot, no rollback"))


@dataclass(frozen=True)
class DeviceBulkCreate:
    """Up to 10,000 devices registered all-or-nothing in one transaction."""

    devices: list[DeviceCreate] = field(metadata=meta(
        "the devices; more than 10,000 is answered 413", max_items=MAX_BULK_DEVICES))
    create_fleets: bool = field(default=False, metadata=meta(
        "create fleets named by rows that do not exist yet (otherwise 422)"))


@dataclass(frozen=True)
class DeviceBulkEnvelope:
    """DeviceBulkCreate before its rows are parsed one by one (not in the OpenAPI document)."""

    devices: list[dict[str, object]] = field(metadata=meta("the rows", max_items=MAX_BULK_DEVICES))
    create_fleets: bool = field(default=False, metadata=meta("create missing fleets"))


@dataclass(frozen=True)
class DeviceUpdate:
    """New tags of a device (they replace the old ones)."""

    tags: list[str] = field(metadata=meta("the device's tags", pattern=TAG_RE,
                                          max_items=MAX_TAGS))


@dataclass(frozen=True)
class DeviceQuery:
    """Filters and paging of GET /api/v1/devices (query string)."""

    fleet: str | None = field(default=None, metadata=meta("fleet name"))
    tag: list[str] = field(default_factory=list, metadata=meta(
        "a tag; repeat to require several", max_items=MAX_TAGS))
    mcu: str | None = field(default=None, metadata=meta("catalog MCU name or 'custom'"))
    state: DeviceState | None = field(default=None, metadata=meta("registry state"))
    limit: int = field(default=100, metadata=meta("page size", minimum=1,
                                                  maximum=MAX_PAGE_LIMIT))
    cursor: str | None = field(default=None, metadata=meta(
        "`next_cursor` of the previous page", max_length=64))


@dataclass(frozen=True)
class TokenCreate:
    """A new API token; the secret is shown once."""

    role: Role = field(metadata=meta("viewer: read; operator: register devices, start "
                                     "campaigns; admin: tokens and deletion"))
    name: str = field(default="api", metadata=meta("label", pattern=r"[A-Za-z0-9._ -]{1,64}"))


# ---- responses (documentation; views build these shapes) -----------------------------------

@dataclass(frozen=True)
class FieldErrorOut:
    """One field at fault; `index` is the row of a bulk request."""

    # `field` is also the attribute's name here, hence the alias.
    field: str = _field(metadata=meta("the field, e.g. 'sram_bytes' or 'tags[2]'"))
    message: str = _field(metadata=meta("what is wrong, with the value and the limit"))
    index: int | None = _field(default=None, metadata=meta("0-based row of a bulk request"))


@dataclass(frozen=True)
class Problem:
    """An RFC 9457 problem document (application/problem+json)."""

    type: str = field(metadata=meta("URI naming the kind of problem"))
    title: str = field(metadata=meta("the HTTP status phrase"))
    status: int = field(metadata=meta("HTTP status"))
    detail: str = field(metadata=meta("what went wrong, naming the first field"))
    errors: list[FieldErrorOut] = field(metadata=meta("every field at fault"))


@dataclass(frozen=True)
class McuOut:
    """A catalog MCU with datasheet figures."""

    name: str = field(metadata=meta("catalog key"))
    vendor: str = field(metadata=meta("manufacturer"))
    cpu: Cpu = field(metadata=meta("core"))
    sram_bytes: int = field(metadata=meta("largest contiguous SRAM region, bytes"))
    flash_bytes: int = field(metadata=meta("Flash, bytes"))
    clock_hz: int = field(metadata=meta("maximum core clock, Hz"))
    fpu: bool = field(metadata=meta("has a floating-point unit"))
    dsp: bool = field(metadata=meta("has the Arm DSP extension"))
    qemu_board: str | None = field(metadata=meta("QEMU machine emulating the core"))
    slot_bytes_ab: int = field(metadata=meta("Flash per firmware slot with A/B OTA"))
    slot_bytes_single: int = field(metadata=meta("Flash for the firmware with one slot"))
    note: str = field(metadata=meta("datasheet remarks"))


@dataclass(frozen=True)
class McuList:
    """The MCU catalog."""

    items: list[McuOut] = field(metadata=meta("catalog entries, by name"))


@dataclass(frozen=True)
class FleetOut:
    """A fleet; the private signing key never leaves the server."""

    name: str = field(metadata=meta("fleet name"))
    description: str = field(metadata=meta("free text"))
    signing_public_key: str = field(metadata=meta("Ed25519 public key, PEM"))
    device_count: int = field(metadata=meta("active devices"))
    created_at: str = field(metadata=meta("ISO 8601 UTC"))


@dataclass(frozen=True)
class FleetList:
    """All fleets."""

    items: list[FleetOut] = field(metadata=meta("fleets, by name"))


@dataclass(frozen=True)
class DeviceOut:
    """A registered device."""

    id: str = field(metadata=meta("device id, also its MQTT username"))
    name: str = field(metadata=meta("device name"))
    fleet: str = field(metadata=meta("fleet name"))
    mcu: str = field(metadata=meta("catalog MCU name or 'custom'"))
    cpu: Cpu = field(metadata=meta("core"))
    sram_bytes: int = field(metadata=meta("SRAM, bytes"))
    flash_bytes: int = field(metadata=meta("Flash, bytes"))
    slot_bytes: int = field(metadata=meta("Flash one firmware image may use, bytes"))
    ota_layout: OtaLayout = field(metadata=meta("OTA slot layout"))
    tags: list[str] = field(metadata=meta("tags, sorted"))
    state: DeviceState = field(metadata=meta("registry state"))
    mqtt_username: str = field(metadata=meta("MQTT username (= id)"))
    created_at: str = field(metadata=meta("ISO 8601 UTC"))


@dataclass(frozen=True)
class MqttCredentials:
    """MQTT login of one device; the password is shown once."""

    host: str = field(metadata=meta("broker host"))
    port: int = field(metadata=meta("broker port"))
    username: str = field(metadata=meta("the device id"))
    password: str = field(metadata=meta("shown only in this response"))


@dataclass(frozen=True)
class DeviceRegistered:
    """A new device with its credentials (returned once)."""

    device: DeviceOut = field(metadata=meta("the device"))
    mqtt: MqttCredentials = field(metadata=meta("broker credentials, shown once"))
    fleet_signing_public_key: str = field(metadata=meta("Ed25519 public key, PEM"))


@dataclass(frozen=True)
class BulkRow:
    """One row of a bulk registration result."""

    id: str = field(metadata=meta("device id = MQTT username"))
    name: str = field(metadata=meta("device name"))
    fleet: str = field(metadata=meta("fleet name"))
    mqtt_password: str = field(metadata=meta("shown only in this response"))


@dataclass(frozen=True)
class BulkRegistered:
    """The result of a bulk registration."""

    count: int = field(metadata=meta("devices registered"))
    mqtt_host: str = field(metadata=meta("broker host"))
    mqtt_port: int = field(metadata=meta("broker port"))
    fleet_signing_public_keys: dict[str, str] = field(metadata=meta(
        "fleet name -> Ed25519 public key, PEM"))
    devices: list[BulkRow] = field(metadata=meta("in request order"))


@dataclass(frozen=True)
class DeviceList:
    """One page of devices."""

    items: list[DeviceOut] = field(metadata=meta("devices, ordered by id"))
    next_cursor: str | None = field(metadata=meta("pass as `cursor` for the next page; "
                                                  "null on the last page"))


@dataclass(frozen=True)
class TokenOut:
    """An API token (without its secret)."""

    id: int = field(metadata=meta("token id"))
    name: str = field(metadata=meta("label"))
    role: Role = field(metadata=meta("role"))
    prefix: str = field(metadata=meta("first characters of the secret"))
    created_at: str = field(metadata=meta("ISO 8601 UTC"))
    revoked_at: str | None = field(metadata=meta("ISO 8601 UTC, null while valid"))


@dataclass(frozen=True)
class TokenCreated:
    """A new token with its secret (shown once)."""

    token: TokenOut = field(metadata=meta("the token"))
    secret: str = field(metadata=meta("the bearer token; shown only in this response"))


@dataclass(frozen=True)
class TokenList:
    """All API tokens."""

    items: list[TokenOut] = field(metadata=meta("tokens, by id"))
