"""Request and response schemas of the API: pydantic v2 models, validated and documented from
one place (service.api.openapi builds the OpenAPI document from these models).

Request models reject what their JSON Schema rejects: every constraint is a JSON Schema
keyword (`pattern`, `minimum`, `maxItems`, `enum`, `not`) checked by pydantic itself, or a
validator whose rule the same keyword states. Patterns are anchored and use only syntax that
ECMA-262 (JSON Schema), Rust's regex (pydantic-core) and Python's `re` read alike.
Strings are strict (no number -> string coercion), integers are JSON integers (no floats, no
booleans), and a size is an integer or a string of digits with a binary unit.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from firmware.targets import (
    CATALOG,
    KIB,
    MAX_FLASH_BYTES,
    MAX_SRAM_BYTES,
    MIB,
    MIN_FLASH_BYTES,
    MIN_SRAM_BYTES,
    Cpu,
    OtaLayout,
)
from service.models import AnalysisState, CampaignState, DeviceState, JobState, ModelKind, Role

FLEET_NAME_RE = r"^[a-z0-9][a-z0-9._-]{0,63}$"
DEVICE_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
DEVICE_ID_RE = r"^dev-[0-9a-f]{16}$"
# A name of this form could be mistaken for another device's id (any letter case).
ID_FORM_RE = r"^[dD][eE][vV]-[0-9a-fA-F]{16}$"
TAG_RE = r"^[A-Za-z0-9][A-Za-z0-9._:=-]{0,63}$"
TOKEN_NAME_RE = r"^[A-Za-z0-9._ -]{1,64}$"
# Free text: any Unicode except control characters (tab, newline and CR allowed).
TEXT_RE = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"
# 262144, 256KiB, 256kB, 256K, 1MiB, 1MB, 1M, 512B: whole numbers, 1024-based units.
SIZE_RE = r"^([0-9]{1,12})([KkMm](?:[iI]?[bB])?|[bB])?$"
IDEMPOTENCY_KEY_RE = r"^[\x21-\x7e]{1,255}$"  # visible ASCII

MAX_TAGS = 32
MAX_BULK_DEVICES = 10_000
MAX_PAGE_LIMIT = 1000
MAX_TOKEN_LIFETIME_S = 10 * 365 * 86400
MIN_TOKEN_LIFETIME_S = 60
MCU_FILTER_VALUES = (*sorted(CATALOG), "custom")

_SIZE = re.compile(SIZE_RE)
_ID_FORM = re.compile(ID_FORM_RE)
_UNITS = {"": 1, "b": 1, "k": KIB, "kb": KIB, "kib": KIB, "m": MIB, "mb": MIB, "mib": MIB}


def _fail(message: str) -> PydanticCustomError:
    """A validation error whose message is `message` as written."""
    return PydanticCustomError("tinyfleet", "{message}", {"message": message})


def json_integer(value: Any) -> Any:
    """A JSON number without a fraction (2048.0) as the integer it is in JSON Schema;
    anything else is left to the strict int validator (2048.5, inf, true: refused)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def parse_size_value(value: Any) -> Any:
    """Bytes from an integer or a size string; other types are left to the int validator."""
    value = json_integer(value)
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match is None or value != value.strip():
            shown = value if len(value) <= 40 else value[:40] + "..."
            raise _fail(f"{shown!r} is not a size such as 262144, 256KiB or 1MiB "
                        f"(whole numbers; units B, K/KB/KiB, M/MB/MiB, 1024-based)")
        return int(match[1]) * _UNITS[(match[2] or "").lower()]
    return value


def _size_schema(minimum: int, maximum: int) -> WithJsonSchema:
    return WithJsonSchema({"oneOf": [
        {"type": "integer", "minimum": minimum, "maximum": maximum},
        {"type": "string", "pattern": SIZE_RE}]})


def _not_id_form(value: str) -> str:
    if _ID_FORM.fullmatch(value):
        raise _fail(f"{value!r} has the form of a device id (dev-<16 hex digits>); "
                    "pick a name that does not")
    return value


def _catalog_mcu(value: Any) -> Any:
    if isinstance(value, str) and value not in CATALOG:
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise _fail(f"unknown MCU {shown!r}; known: {', '.join(sorted(CATALOG))}")
    return value


def _mcu_filter(value: Any) -> Any:
    if isinstance(value, str) and value not in MCU_FILTER_VALUES:
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise _fail(f"unknown MCU {shown!r}; known: {', '.join(MCU_FILTER_VALUES)}")
    return value


def _query_int(value: Any) -> Any:
    # Query strings are text: digits only (no sign, spaces, '_' or exponent).
    if isinstance(value, str):
        if not re.fullmatch(r"[0-9]{1,9}", value):
            shown = value if len(value) <= 40 else value[:40] + "..."
            raise _fail(f"must be an integer, got {shown!r}")
        return int(value)
    return value


FleetName = Annotated[str, Field(strict=True, pattern=FLEET_NAME_RE)]
DeviceName = Annotated[str, Field(strict=True, pattern=DEVICE_NAME_RE,
                                  json_schema_extra={"not": {"pattern": ID_FORM_RE}}),
                       AfterValidator(_not_id_form)]
DeviceKey = Annotated[str, Field(strict=True, pattern=DEVICE_NAME_RE)]
Tag = Annotated[str, Field(strict=True, pattern=TAG_RE)]
CatalogMcu = Annotated[str, Field(strict=True, json_schema_extra={"enum": sorted(CATALOG)}),
                       BeforeValidator(_catalog_mcu)]
McuFilter = Annotated[str, Field(strict=True, json_schema_extra={
    "enum": list(MCU_FILTER_VALUES)}), BeforeValidator(_mcu_filter)]
# Bytes as a JSON integer or a size string; the limits apply to the number of bytes.
SramSize = Annotated[int, BeforeValidator(parse_size_value),
                     Field(strict=True, ge=MIN_SRAM_BYTES, le=MAX_SRAM_BYTES),
                     _size_schema(MIN_SRAM_BYTES, MAX_SRAM_BYTES)]
FlashSize = Annotated[int, BeforeValidator(parse_size_value),
                      Field(strict=True, ge=MIN_FLASH_BYTES, le=MAX_FLASH_BYTES),
                      _size_schema(MIN_FLASH_BYTES, MAX_FLASH_BYTES)]


class RequestModel(BaseModel):
    """A request body or query: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- requests ---------------------------------------------------------------------------

class FleetCreate(RequestModel):
    """A new fleet; it gets its own Ed25519 firmware-signing key pair."""

    name: FleetName = Field(description="fleet name, unique", examples=["greenhouse"])
    description: Annotated[str, Field(strict=True, pattern=TEXT_RE, max_length=500)] = Field(
        default="", description="free text (no control characters)")


class DeviceCreate(RequestModel):
    """One device: a catalog `mcu`, or explicit `sram_bytes`, `flash_bytes` and `cpu`."""

    name: DeviceName = Field(description="device name, unique across the registry; not of "
                                         "the form dev-<16 hex> (that is an id)",
                             examples=["gh-sensor-001"])
    fleet: FleetName = Field(description="name of an existing fleet")
    mcu: CatalogMcu | None = Field(default=None, description="catalog MCU name "
                                   "(GET /api/v1/mcus)", examples=["stm32f746"])
    sram_bytes: SramSize | None = Field(default=None, description=(
        "SRAM usable by the firmware, bytes (or '320KiB'); instead of mcu"))
    flash_bytes: FlashSize | None = Field(default=None, description=(
        "Flash size, bytes (or '1MiB'); instead of mcu"))
    cpu: Cpu | None = Field(default=None, description="core; instead of mcu")
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS,
                            description="free-form labels for selecting devices")
    ota_layout: OtaLayout = Field(default=OtaLayout.AB, description=(
        "ab: two firmware slots (each gets half the Flash after the bootloader); "
        "single: one slot, no rollback"))


class DeviceBulkCreate(RequestModel):
    """Up to 10,000 devices registered all-or-nothing in one transaction."""

    devices: list[DeviceCreate] = Field(max_length=MAX_BULK_DEVICES, description=(
        "the devices; more than 10,000 is answered 413"))
    create_fleets: bool = Field(default=False, strict=True, description=(
        "create fleets named by rows that do not exist yet (otherwise 422)"))


class DeviceUpdate(RequestModel):
    """New tags of a device (they replace the old ones)."""

    tags: list[Tag] = Field(max_length=MAX_TAGS, description="the device's tags")


class DeviceQuery(RequestModel):
    """Filters and paging of GET /api/v1/devices (query string)."""

    fleet: FleetName | None = Field(default=None, description="fleet name")
    tag: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS,
                           description="a tag; repeat to require several")
    mcu: McuFilter | None = Field(default=None, description="catalog MCU name or 'custom'")
    state: DeviceState | None = Field(default=None, description="registry state")
    limit: Annotated[int, BeforeValidator(_query_int)] = Field(
        default=100, ge=1, le=MAX_PAGE_LIMIT, strict=True, description="page size")
    cursor: Annotated[str, Field(strict=True, pattern=DEVICE_ID_RE)] | None = Field(
        default=None, description="`next_cursor` of the previous page")


_SELECTION = ("devices", "fleet", "tag", "mcu")
_FILTERS: list[Any] = [{"required": [name]} for name in _SELECTION[1:]]


class CredentialRotation(RequestModel):
    """Devices whose MQTT passwords are replaced: listed by id or name (`devices`), or
    selected by filters (`fleet`, `tag`, `mcu`; active devices only); at most 10,000."""

    # Given means present: no field takes null, so the document's oneOf says the same.
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["devices"], "not": {"anyOf": _FILTERS}},
        {"not": {"required": ["devices"]}, "anyOf": _FILTERS}]})

    devices: list[DeviceKey] = Field(default=None, min_length=1,  # type: ignore[arg-type]
                                     max_length=MAX_BULK_DEVICES,
                                     description="device ids or names")
    fleet: FleetName = Field(default=None,  # type: ignore[assignment]
                             description="every active device of this fleet")
    tag: list[Tag] = Field(default=None, min_length=1,  # type: ignore[arg-type]
                           max_length=MAX_TAGS, description="devices with all these tags")
    mcu: McuFilter = Field(default=None,  # type: ignore[assignment]
                           description="catalog MCU name or 'custom'")

    @model_validator(mode="after")
    def _one_selection(self) -> CredentialRotation:
        listed = self.devices is not None
        filtered = any(getattr(self, name) is not None for name in _SELECTION[1:])
        if listed == filtered:
            raise _fail("give either devices (ids or names) or filters (fleet, tag, mcu), "
                        "not both and not neither")
        return self


class TokenCreate(RequestModel):
    """A new API token; the secret is shown once."""

    role: Role = Field(description="viewer: read; operator: register devices, start "
                                   "campaigns; admin: tokens and deletion")
    name: Annotated[str, Field(strict=True, pattern=TOKEN_NAME_RE)] = Field(
        default="api", description="label")
    # Constraints before the validator: so they reach the JSON Schema as minimum/maximum.
    expires_in_s: Annotated[int, Field(strict=True, ge=MIN_TOKEN_LIFETIME_S,
                                       le=MAX_TOKEN_LIFETIME_S),
                            BeforeValidator(json_integer)] | None = Field(
        default=None,
        description="lifetime in seconds; the token is refused after it (default: never)")


# ---- responses (documentation; views build these shapes) -----------------------------------

class FieldErrorOut(BaseModel):
    """One field at fault; `index` is the row of a bulk request."""

    field: str = Field(description="the field, e.g. 'sram_bytes' or 'tags[2]'")
    message: str = Field(description="what is wrong, with the value and the limit")
    index: int | None = Field(default=None, description="0-based row of a bulk request")


class Problem(BaseModel):
    """An RFC 9457 problem document (application/problem+json)."""

    type: str = Field(description="URI naming the kind of problem")
    title: str = Field(description="the HTTP status phrase")
    status: int = Field(description="HTTP status")
    detail: str = Field(description="what went wrong, naming the first field")
    errors: list[FieldErrorOut] = Field(description="every field at fault")


class McuOut(BaseModel):
    """A catalog MCU with datasheet figures."""

    name: str = Field(description="catalog key")
    vendor: str = Field(description="manufacturer")
    cpu: Cpu = Field(description="core")
    sram_bytes: int = Field(description="largest contiguous SRAM region, bytes")
    flash_bytes: int = Field(description="Flash, bytes")
    clock_hz: int = Field(description="maximum core clock, Hz")
    fpu: bool = Field(description="has a floating-point unit")
    dsp: bool = Field(description="has the Arm DSP extension")
    qemu_board: str | None = Field(description="QEMU machine emulating the core")
    slot_bytes_ab: int = Field(description="Flash per firmware slot with A/B OTA")
    slot_bytes_single: int = Field(description="Flash for the firmware with one slot")
    note: str = Field(description="datasheet remarks")


class McuList(BaseModel):
    """The MCU catalog."""

    items: list[McuOut] = Field(description="catalog entries, by name")


class FleetOut(BaseModel):
    """A fleet; the private signing key never leaves the server."""

    name: str = Field(description="fleet name")
    description: str = Field(description="free text")
    signing_public_key: str = Field(description="Ed25519 public key, PEM")
    device_count: int = Field(description="active devices")
    created_at: str = Field(description="ISO 8601 UTC")


class FleetList(BaseModel):
    """All fleets."""

    items: list[FleetOut] = Field(description="fleets, by name")


class DeviceReported(BaseModel):
    """What a device's agent reported (OTA events, MQTT presence through the bridge)."""

    installed_model_version: str | None = Field(
        description="model version of the image it runs (None: none installed by tinyfleet)")
    online: bool = Field(description="its retained MQTT presence says online")
    last_seen_at: str | None = Field(description="ISO 8601 UTC of its last presence change")
    backend: str = Field(description="what its agent runs: 'qemu' (images for its MCU) or "
                                     "'host-<arch>' (the host backend's library images)")


class DeviceOut(BaseModel):
    """A registered device."""

    id: str = Field(description="device id (dev-<16 hex>), also its MQTT username")
    name: str = Field(description="device name")
    fleet: str = Field(description="fleet name")
    mcu: str = Field(description="catalog MCU name or 'custom'")
    cpu: Cpu = Field(description="core")
    sram_bytes: int = Field(description="SRAM, bytes")
    flash_bytes: int = Field(description="Flash, bytes")
    slot_bytes: int = Field(description="Flash one firmware image may use, bytes")
    ota_layout: OtaLayout = Field(description="OTA slot layout")
    tags: list[str] = Field(description="tags, sorted")
    state: DeviceState = Field(description="registry state")
    mqtt_username: str = Field(description="MQTT username (= id)")
    created_at: str = Field(description="ISO 8601 UTC")
    reported: DeviceReported = Field(description="what the device reported")


class MqttCredentials(BaseModel):
    """MQTT login of one device; the password is shown once."""

    host: str = Field(description="broker host")
    port: int = Field(description="broker port")
    username: str = Field(description="the device id")
    password: str = Field(description="shown only in this response")


class DeviceRegistered(BaseModel):
    """A device with new credentials (returned once)."""

    device: DeviceOut = Field(description="the device")
    mqtt: MqttCredentials = Field(description="broker credentials, shown once")
    fleet_signing_public_key: str = Field(description="Ed25519 public key, PEM")


class BulkRow(BaseModel):
    """One device of a bulk result, with its new MQTT password."""

    id: str = Field(description="device id = MQTT username")
    name: str = Field(description="device name")
    fleet: str = Field(description="fleet name")
    mqtt_password: str | None = Field(description=(
        "shown only in this response; null in a replay for a device decommissioned since"))


class BulkRegistered(BaseModel):
    """The result of a bulk registration."""

    count: int = Field(description="devices registered")
    mqtt_host: str = Field(description="broker host")
    mqtt_port: int = Field(description="broker port")
    fleet_signing_public_keys: dict[str, str] = Field(description=(
        "fleet name -> Ed25519 public key, PEM"))
    devices: list[BulkRow] = Field(description="in request order")
    replayed: bool = Field(description=(
        "true when this answers a retry with the same Idempotency-Key: the devices of the "
        "first request, with passwords rotated again (the first answer's stop working)"))


class CredentialsRotated(BaseModel):
    """New MQTT passwords of several devices (shown once; the old ones stop working)."""

    count: int = Field(description="devices whose password was replaced")
    mqtt_host: str = Field(description="broker host")
    mqtt_port: int = Field(description="broker port")
    devices: list[BulkRow] = Field(description="by id, or in request order")
    replayed: bool = Field(description="true when this answers a retry with the same "
                                       "Idempotency-Key (passwords rotated again)")


class DeviceList(BaseModel):
    """One page of devices."""

    items: list[DeviceOut] = Field(description="devices, ordered by id")
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; "
                                                "null on the last page")


class TokenOut(BaseModel):
    """An API token (without its secret)."""

    id: int = Field(description="token id")
    name: str = Field(description="label")
    role: Role = Field(description="role")
    prefix: str = Field(description="first characters of the secret")
    created_at: str = Field(description="ISO 8601 UTC")
    expires_at: str | None = Field(description="ISO 8601 UTC; null: never expires")
    revoked_at: str | None = Field(description="ISO 8601 UTC, null while valid")


class TokenCreated(BaseModel):
    """A new token with its secret (shown once)."""

    token: TokenOut = Field(description="the token")
    secret: str = Field(description="the bearer token; shown only in this response")


class TokenList(BaseModel):
    """All API tokens."""

    items: list[TokenOut] = Field(description="tokens, by id")


# ---- OTA: model versions, campaigns, jobs ---------------------------------------------------

MODEL_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
MODEL_VERSION_RE = r"^[0-9a-f]{16}$"
MAX_DEADLINE_S = 30 * 86400
MAX_SELECTOR_IDS = MAX_BULK_DEVICES

ModelName = Annotated[str, Field(strict=True, pattern=MODEL_NAME_RE)]
ModelVersionId = Annotated[str, Field(strict=True, pattern=MODEL_VERSION_RE)]
Percent = Annotated[float, BeforeValidator(json_integer), Field(strict=True, ge=0, le=100)]
DeadlineS = Annotated[int, Field(strict=True, ge=1, le=MAX_DEADLINE_S),
                      BeforeValidator(json_integer)]


class ModelRegister(RequestModel):
    """A model version from a path on the server (admin): a `train-supernet` family
    directory, or an .onnx file. Uploads use multipart/form-data instead (fields `name`,
    `file`: a .tar.gz/.tgz/.zip of a family directory, or an .onnx file)."""

    name: ModelName = Field(description="a label for the model", examples=["digits"])
    path: Annotated[str, Field(strict=True, min_length=1, max_length=4096,
                               pattern=TEXT_RE)] = Field(
        description="absolute path on the server: a family directory or an .onnx file")
    analyze: bool = Field(default=True, strict=True, description=(
        "queue the family's contribution analysis when it has none (on-device training "
        "needs it)"))


class ModelUploadForm(RequestModel):
    """The form fields of an upload (besides `file`)."""

    name: ModelName = Field(description="a label for the model")
    analyze: bool = Field(default=True, description="queue the contribution analysis")


class DeviceSelector(RequestModel):
    """Which devices a campaign updates; resolved to a snapshot when it is created. Every
    given filter must match (fleet AND tags AND ids AND mcu); active devices only."""

    fleet: FleetName | None = Field(default=None, description="fleet name")
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS,
                            description="devices with all these tags")
    ids: list[DeviceKey] = Field(default_factory=list, max_length=MAX_SELECTOR_IDS,
                                 description="device ids or names")
    mcu: McuFilter | None = Field(default=None, description="catalog MCU name or 'custom'")

    @model_validator(mode="after")
    def _something(self) -> DeviceSelector:
        if self.fleet is None and not self.tags and not self.ids and self.mcu is None:
            raise _fail("give at least one of fleet, tags, ids, mcu (a campaign never "
                        "selects every device by default)")
        return self


class RolloutPolicy(RequestModel):
    """How a campaign rolls out."""

    canary_percent: Percent = Field(default=10.0, description=(
        "share of the devices in the canary batch (batch 0), rounded up"))
    batch_size: Annotated[int, Field(strict=True, ge=1, le=MAX_BULK_DEVICES),
                          BeforeValidator(json_integer)] = Field(
        default=100, description="devices per batch after the canary")
    max_failure_percent: Percent = Field(default=10.0, description=(
        "halt when failures exceed this share of finished jobs"))
    personalize: bool = Field(default=False, strict=True, description=(
        "reserve SRAM for on-device training and ship the sparse-update scheme"))
    start_at: AwareDatetime | None = Field(default=None, description=(
        "ISO 8601 with a time zone; the campaign waits until then"))
    offer_deadline_s: DeadlineS = Field(default=3600, description=(
        "an offer unanswered this long fails as timed out"))
    install_deadline_s: DeadlineS = Field(default=1800, description=(
        "an install silent this long fails as timed out"))


class CampaignCreate(RequestModel):
    """A new campaign: a model version to a selection of devices."""

    model_version: ModelVersionId = Field(description="a model version id (16 hex)")
    selector: DeviceSelector = Field(description="which devices")
    policy: RolloutPolicy = Field(default_factory=RolloutPolicy, description="rollout")


class CampaignQuery(RequestModel):
    """Filters of GET /api/v1/campaigns."""

    state: CampaignState | None = Field(default=None, description="campaign state")
    limit: Annotated[int, BeforeValidator(_query_int)] = Field(
        default=100, ge=1, le=MAX_PAGE_LIMIT, strict=True, description="page size")


class JobQuery(RequestModel):
    """Filters and paging of GET /api/v1/jobs."""

    campaign: Annotated[int, BeforeValidator(_query_int)] | None = Field(
        default=None, ge=1, strict=True, description="campaign id")
    state: JobState | None = Field(default=None, description="job state")
    device: Annotated[str, Field(strict=True, pattern=DEVICE_ID_RE)] | None = Field(
        default=None, description="device id")
    limit: Annotated[int, BeforeValidator(_query_int)] = Field(
        default=100, ge=1, le=MAX_PAGE_LIMIT, strict=True, description="page size")
    cursor: Annotated[int, BeforeValidator(_query_int)] | None = Field(
        default=None, ge=0, strict=True, description="`next_cursor` of the previous page")


class ModelVersionOut(BaseModel):
    """A registered model version (immutable)."""

    id: str = Field(description="content hash, 16 hex digits")
    name: str = Field(description="label")
    kind: ModelKind = Field(description="family (searched per class) or onnx (fixed)")
    size_bytes: int = Field(description="bytes stored")
    analysis: AnalysisState = Field(description="contribution analysis (families)")
    analysis_reason: str | None = Field(description="why the analysis failed")
    info: dict[str, Any] = Field(description="summary: space, classes, resolutions")
    created_at: str = Field(description="ISO 8601 UTC")


class ModelVersionRegistered(BaseModel):
    """The answer to a registration."""

    model: ModelVersionOut = Field(description="the version")
    created: bool = Field(description="false when this content was registered before")


class ModelVersionList(BaseModel):
    """Every model version."""

    items: list[ModelVersionOut] = Field(description="newest first")


class JobOut(BaseModel):
    """One device's job in a campaign."""

    id: int = Field(description="job id")
    campaign: int = Field(description="campaign id")
    device: str = Field(description="device id")
    batch: int = Field(description="0: canary")
    hw_class: str = Field(description="hardware class key")
    state: JobState = Field(description="job state")
    reason: str | None = Field(description="why it failed or was skipped")
    emulated: bool | None = Field(description="false: built for a core QEMU cannot run")
    artifact_sha256: str | None = Field(description="signed image offered")
    update_id: str | None = Field(description="the OTA update id on MQTT")
    progress: float | None = Field(description="download progress 0..1")
    attempts: int = Field(description="task attempts")
    state_changed_at: str = Field(description="ISO 8601 UTC")
    events: list[dict[str, Any]] | None = Field(default=None, description=(
        "every state change (GET /jobs/{id} only)"))


class JobList(BaseModel):
    """A page of jobs."""

    items: list[JobOut] = Field(description="jobs by id")
    next_cursor: int | None = Field(description="pass as `cursor`; null on the last page")


class CampaignOut(BaseModel):
    """A campaign with its progress."""

    id: int = Field(description="campaign id")
    model_version: str = Field(description="model version id")
    state: CampaignState = Field(description="campaign state")
    halt_reason: str | None = Field(description="why it halted")
    selector: dict[str, Any] = Field(description="as given")
    policy: dict[str, Any] = Field(description="rollout policy")
    batch_count: int = Field(description="batches, canary included")
    current_batch: int = Field(description="the latest released batch (-1: none)")
    jobs: int = Field(description="jobs (devices selected, skipped included)")
    counts: dict[str, int] = Field(description="jobs per state")
    batches: list[dict[str, Any]] = Field(description="per batch: counts per state")
    failures: list[dict[str, Any]] = Field(description="failed jobs: device and reason")
    created_at: str = Field(description="ISO 8601 UTC")
    started_at: str | None = Field(description="ISO 8601 UTC")
    finished_at: str | None = Field(description="ISO 8601 UTC")


class CampaignList(BaseModel):
    """Campaigns, newest first."""

    items: list[CampaignOut] = Field(description="campaigns")
