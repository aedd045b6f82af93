"""The MQTT wire protocol between the service and its devices: topics, messages, block frames.

Defined once here and used by both sides (the bridge in workers/, the agents in device_agent/).
Pure: no I/O. Every decoder is strict: unknown fields, wrong types, out-of-range values and
payloads over the topic's byte cap raise `ProtocolError`, whose message names the field.

Topics (`{id}` is the device id, also its MQTT username; `{update}` an update id):

    tinyfleet/v1/{id}/cmd                 server -> device  JSON command (ota_offer, personalize,
                                                            rollback)
    tinyfleet/v1/{id}/ota/{update}/req    device -> server  JSON BlockRequest (ranges or bitmap)
    tinyfleet/v1/{id}/ota/{update}/blk    server -> device  binary block frame
    tinyfleet/v1/{id}/evt                 device -> server  JSON DeviceEvent
    tinyfleet/v1/{id}/metrics             device -> server  JSON MetricsReport (numbers only)
    tinyfleet/v1/{id}/presence            device -> server  b"online" / b"offline" (retained;
                                                            the last will is b"offline"), or
                                                            JSON Presence: online + the
                                                            images its backend runs

Block frame (little endian): a 32-byte header, then `length` bytes of data:

    offset size field
    0      4    magic b"TFBK"
    4      1    frame version (1)
    5      3    reserved, 0
    8      8    image tag: the first 8 bytes of the image's sha256 (which image this block is of)
    16     4    index (0-based)
    20     4    total (block count of the image)
    24     4    length of the data
    28     4    CRC-32 (zlib/IEEE) of the data

The update is named by the topic and the image by its tag, so one artifact's frames are the
same bytes for every device that receives it (the bridge builds them once).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import math
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from firmware.image import SIGNATURE_BYTES, parse_image

TOPIC_ROOT = "tinyfleet/v1"
DEFAULT_BLOCK_SIZE = 4096
MIN_BLOCK_SIZE = 256
MAX_BLOCK_SIZE = 65536
MAX_BLOCKS = 16384  # 64 MiB at the default block size: more than any MCU's Flash slot
MAX_RANGES = 64  # ranges in one BlockRequest
MAX_REASON_CHARS = 256
MAX_LOSS_POINTS = 50
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # never +, #, / or $: safe inside a topic
_ID_RE = re.compile(ID_PATTERN)


class ProtocolError(ValueError):
    """A message or topic that does not follow the protocol; the text names the field."""


class Channel(enum.StrEnum):
    """The last topic level, which says what a message is."""

    CMD = "cmd"
    EVT = "evt"
    METRICS = "metrics"
    PRESENCE = "presence"
    REQ = "req"
    BLK = "blk"


# The byte cap of a payload on each channel: anything longer is refused before it is parsed.
MAX_PAYLOAD_BYTES: dict[Channel, int] = {
    Channel.CMD: 64 * 1024,  # an offer is ~1 kB; a personalize scheme may be a few kB
    Channel.REQ: 4096,  # a bitmap of MAX_BLOCKS bits is 2 kB (2.7 kB base64)
    Channel.EVT: 1024,
    Channel.METRICS: 4096,
    Channel.PRESENCE: 128,
    Channel.BLK: 32 + MAX_BLOCK_SIZE,
}

# Subscriptions of the service side (the bridge).
DEVICE_TO_SERVER = (f"{TOPIC_ROOT}/+/evt", f"{TOPIC_ROOT}/+/metrics", f"{TOPIC_ROOT}/+/presence",
                    f"{TOPIC_ROOT}/+/ota/+/req")


# --- topics ----------------------------------------------------------------------------------


def _check_id(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise ProtocolError(f"{kind} {value!r} is not 1-64 characters of [A-Za-z0-9_.-] "
                            "starting with a letter or digit")
    return value


def cmd_topic(device_id: str) -> str:
    """Where the service sends a device its commands."""
    return f"{TOPIC_ROOT}/{_check_id('device id', device_id)}/cmd"


def evt_topic(device_id: str) -> str:
    """Where a device reports its update events."""
    return f"{TOPIC_ROOT}/{_check_id('device id', device_id)}/evt"


def metrics_topic(device_id: str) -> str:
    """Where a device reports personalization metrics."""
    return f"{TOPIC_ROOT}/{_check_id('device id', device_id)}/metrics"


def presence_topic(device_id: str) -> str:
    """Where a device says online (retained) and its last will says offline."""
    return f"{TOPIC_ROOT}/{_check_id('device id', device_id)}/presence"


def req_topic(device_id: str, update_id: str) -> str:
    """Where a device asks for the blocks of an update it lacks."""
    return (f"{TOPIC_ROOT}/{_check_id('device id', device_id)}/ota/"
            f"{_check_id('update id', update_id)}/req")


def blk_topic(device_id: str, update_id: str) -> str:
    """Where the service sends a device the blocks of an update."""
    return (f"{TOPIC_ROOT}/{_check_id('device id', device_id)}/ota/"
            f"{_check_id('update id', update_id)}/blk")


def device_subscriptions(device_id: str) -> tuple[str, str]:
    """The topics a device subscribes to: its commands and the blocks of any update."""
    return cmd_topic(device_id), f"{TOPIC_ROOT}/{device_id}/ota/+/blk"


@dataclass(frozen=True)
class Topic:
    """A parsed topic: whose, which channel, and the update for req/blk."""

    device_id: str
    channel: Channel
    update_id: str | None = None


def parse_topic(topic: str) -> Topic:
    """A topic string -> Topic; ProtocolError for anything outside the protocol."""
    parts = topic.split("/")
    if len(parts) < 4 or f"{parts[0]}/{parts[1]}" != TOPIC_ROOT:
        raise ProtocolError(f"topic {topic[:200]!r} is not under {TOPIC_ROOT}/{{device id}}/")
    device_id = _check_id("device id", parts[2])
    if len(parts) == 4 and parts[3] in ("cmd", "evt", "metrics", "presence"):
        return Topic(device_id, Channel(parts[3]))
    if len(parts) == 6 and parts[3] == "ota" and parts[5] in ("req", "blk"):
        return Topic(device_id, Channel(parts[5]), _check_id("update id", parts[4]))
    raise ProtocolError(f"topic {topic[:200]!r} names no channel of the protocol (cmd, evt, "
                        "metrics, presence, ota/{update}/req, ota/{update}/blk)")


# --- JSON messages ---------------------------------------------------------------------------

Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
SignatureHex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{128}$")]
Reason = Annotated[str, StringConstraints(max_length=MAX_REASON_CHARS)]
Bytes = Annotated[int, Field(ge=0, le=2**40)]
UnixTime = Annotated[float, Field(ge=0, le=2**34, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Loss = Annotated[float, Field(ge=0.0, le=1e9, allow_inf_nan=False)]


class _Message(BaseModel):
    """Strict: no unknown field, no coercion between types, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class OtaOffer(_Message):
    """An update offered to a device: what it needs to decide, and how the image is cut up."""

    type: Literal["ota_offer"] = "ota_offer"
    update_id: Id
    model_id: Name
    model_version: Name
    target_mcu: Name  # MCU catalog name (or "custom"): the class the image was built for
    target_cpu: Name  # firmware.targets.Cpu value, e.g. "cortex-m7"
    predicted_sram_bytes: Bytes  # the one memory account: arena + scratch + static + stack
    predicted_flash_bytes: Bytes
    image_bytes: Annotated[int, Field(ge=1, le=MAX_BLOCKS * MAX_BLOCK_SIZE)]
    image_sha256: Sha256Hex  # of the whole signed image (the artifact's address)
    signature: SignatureHex  # the image's Ed25519 signature (its last 64 bytes), hex
    block_size: Annotated[int, Field(ge=MIN_BLOCK_SIZE, le=MAX_BLOCK_SIZE)] = DEFAULT_BLOCK_SIZE
    block_count: Annotated[int, Field(ge=1, le=MAX_BLOCKS)]
    offer_deadline: UnixTime | None = None  # accept or refuse by then (unix seconds, UTC)
    install_deadline: UnixTime | None = None  # installed (or failed) by then

    @model_validator(mode="after")
    def _blocks_cover_the_image(self) -> OtaOffer:
        expected = math.ceil(self.image_bytes / self.block_size)
        if self.block_count != expected:
            raise ValueError(f"block_count {self.block_count} does not cut {self.image_bytes} "
                             f"bytes into {self.block_size}-byte blocks (that is {expected})")
        return self

    @property
    def image_tag(self) -> bytes:
        """The tag every block frame of this image carries."""
        return bytes.fromhex(self.image_sha256[:16])

    def block_length(self, index: int) -> int:
        """The data length of block `index` (the last one may be short)."""
        if not 0 <= index < self.block_count:
            raise ProtocolError(f"block index {index} is outside 0..{self.block_count - 1}")
        return min(self.block_size, self.image_bytes - index * self.block_size)


def make_offer(update_id: str, image: bytes, *, block_size: int = DEFAULT_BLOCK_SIZE,
               offer_deadline: float | None = None,
               install_deadline: float | None = None) -> OtaOffer:
    """The offer of a signed image (firmware.image format), its summary read from the image."""
    manifest = parse_image(image).manifest
    return OtaOffer(
        update_id=update_id, model_id=manifest.model_id, model_version=manifest.model_version,
        target_mcu=manifest.target.name, target_cpu=manifest.target.cpu,
        predicted_sram_bytes=manifest.predicted.sram_bytes,
        predicted_flash_bytes=manifest.predicted.flash_bytes, image_bytes=len(image),
        image_sha256=hashlib.sha256(image).hexdigest(),
        signature=image[-SIGNATURE_BYTES:].hex(), block_size=block_size,
        block_count=math.ceil(len(image) / block_size), offer_deadline=offer_deadline,
        install_deadline=install_deadline)


class PersonalizeCommand(_Message):
    """Fine-tune the installed model on local data, with a sparse-update scheme."""

    type: Literal["personalize"] = "personalize"
    round: Annotated[int, Field(ge=0, le=2**31)]
    update_id: Id | None = None  # the installed update it applies to (None: the installed one)
    # The scheme as firmware.training writes it; None: the one in the installed manifest.
    scheme: dict[str, Any] | None = None


class RollbackCommand(_Message):
    """Go back to the previous slot's image."""

    type: Literal["rollback"] = "rollback"
    update_id: Id | None = None  # the update being rolled back, when it is known
    reason: Reason | None = None


Command = Annotated[OtaOffer | PersonalizeCommand | RollbackCommand, Field(discriminator="type")]


class UpdateState(enum.StrEnum):
    """The states a device reports for an update, in their usual order; the last four end it."""

    ACCEPTED = "accepted"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    SELF_TEST = "self_test"
    INSTALLED = "installed"
    REFUSED = "refused"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"

    @property
    def terminal(self) -> bool:
        """Whether the update is over in this state."""
        return self in _TERMINAL


_TERMINAL = {UpdateState.INSTALLED, UpdateState.REFUSED, UpdateState.FAILED,
             UpdateState.ROLLED_BACK}


class DeviceEvent(_Message):
    """One state change of an update on a device."""

    update_id: Id | None  # None only for a rollback the device did without an update
    state: UpdateState
    progress: Fraction | None = None  # share of the image received, 0..1
    reason: Reason | None = None  # why, for refused / failed / rolled_back
    slot: Annotated[int, Field(ge=0, le=1)] | None = None  # the A/B slot written or running
    time: UnixTime | None = None  # the device's clock (unix seconds), if it has one

    @model_validator(mode="after")
    def _reason_for_bad_ends(self) -> DeviceEvent:
        if self.state in (UpdateState.REFUSED, UpdateState.FAILED) and not self.reason:
            raise ValueError(f"state {self.state.value} needs a reason")
        return self


class MetricsReport(_Message):
    """The numbers a personalization round reports: an allow-list, never data or labels."""

    round: Annotated[int, Field(ge=0, le=2**31)]
    samples_used: Annotated[int, Field(ge=0, le=2**31)]
    accuracy_before: Fraction
    accuracy_after: Fraction
    loss_before: Loss
    loss_after: Loss
    loss_curve: Annotated[tuple[Loss, ...], Field(max_length=MAX_LOSS_POINTS)] = ()
    training_memory_bytes: Bytes
    duration_s: Annotated[float, Field(ge=0, le=1e7, allow_inf_nan=False)]


class BlockRequest(_Message):
    """The blocks a device lacks: half-open [start, end) ranges, or a bitmap (exactly one).

    The bitmap is base64 of bytes where bit i (byte i // 8, bit i % 8, least significant
    first) set means block i is wanted.
    """

    ranges: Annotated[tuple[tuple[Annotated[int, Field(ge=0, le=MAX_BLOCKS)],
                                  Annotated[int, Field(ge=1, le=MAX_BLOCKS)]], ...],
                      Field(min_length=1, max_length=MAX_RANGES)] | None = None
    bitmap: Annotated[str, StringConstraints(min_length=4, max_length=3000,
                                             pattern=r"^[A-Za-z0-9+/]+={0,2}$")] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> BlockRequest:
        if (self.ranges is None) == (self.bitmap is None):
            raise ValueError("give exactly one of ranges and bitmap")
        for i, (start, end) in enumerate(self.ranges or ()):
            if start >= end:
                raise ValueError(f"ranges[{i}] [{start}, {end}) is empty")
        return self

    @classmethod
    def for_blocks(cls, indices: list[int] | set[int] | range) -> BlockRequest:
        """The request for these block indices: ranges when few, else a bitmap."""
        wanted = sorted(set(indices))
        if not wanted:
            raise ProtocolError("a block request needs at least one block")
        runs: list[tuple[int, int]] = []
        for i in wanted:
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        if len(runs) <= MAX_RANGES:
            return cls(ranges=tuple(runs))
        bits = bytearray((wanted[-1] >> 3) + 1)
        for i in wanted:
            bits[i >> 3] |= 1 << (i & 7)
        return cls(bitmap=base64.b64encode(bytes(bits)).decode())

    def indices(self, block_count: int) -> list[int]:
        """The wanted indices in order, each once; ProtocolError past the image's blocks."""
        if self.ranges is not None:
            out: set[int] = set()
            for i, (start, end) in enumerate(self.ranges):
                if end > block_count:
                    raise ProtocolError(f"ranges[{i}] [{start}, {end}) goes past the image's "
                                        f"{block_count} blocks")
                out.update(range(start, end))
            return sorted(out)
        assert self.bitmap is not None
        try:
            bits = base64.b64decode(self.bitmap, validate=True)
        except ValueError as exc:
            raise ProtocolError(f"bitmap is not base64: {exc}") from None
        wanted = [i for i in range(len(bits) * 8) if bits[i >> 3] >> (i & 7) & 1]
        if not wanted:
            raise ProtocolError("bitmap asks for no block")
        if wanted[-1] >= block_count:
            raise ProtocolError(f"bitmap asks for block {wanted[-1]}, past the image's "
                                f"{block_count} blocks")
        return wanted


_COMMAND: TypeAdapter[OtaOffer | PersonalizeCommand | RollbackCommand] = TypeAdapter(Command)
JsonMessage = OtaOffer | PersonalizeCommand | RollbackCommand | DeviceEvent | MetricsReport | \
    BlockRequest
M = TypeVar("M", bound=BaseModel)


def _check_size(channel: Channel, payload: bytes) -> None:
    cap = MAX_PAYLOAD_BYTES[channel]
    if len(payload) > cap:
        raise ProtocolError(f"{channel.value} payload is {len(payload)} bytes, over the "
                            f"{cap}-byte cap")


def _reason(exc: ValidationError) -> str:
    """The first error of a ValidationError as `field: message` (what a log line needs)."""
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "(message)"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        return f"{where}: unknown field{more}"
    return f"{where}: {first['msg']}{more}"


def _decode(model: type[M], channel: Channel, payload: bytes) -> M:
    _check_size(channel, payload)
    try:
        return model.model_validate_json(payload, strict=True)
    except ValidationError as exc:
        raise ProtocolError(f"{channel.value}: {_reason(exc)}") from None


def encode(message: JsonMessage) -> bytes:
    """A message as its compact JSON payload (fields left at None are left out)."""
    return message.model_dump_json(exclude_none=True).encode()


def decode_command(payload: bytes) -> OtaOffer | PersonalizeCommand | RollbackCommand:
    """A cmd payload -> its command (by `type`)."""
    _check_size(Channel.CMD, payload)
    try:
        return _COMMAND.validate_json(payload, strict=True)
    except ValidationError as exc:
        raise ProtocolError(f"cmd: {_reason(exc)}") from None


def decode_event(payload: bytes) -> DeviceEvent:
    """An evt payload -> DeviceEvent."""
    return _decode(DeviceEvent, Channel.EVT, payload)


def decode_metrics(payload: bytes) -> MetricsReport:
    """A metrics payload -> MetricsReport."""
    return _decode(MetricsReport, Channel.METRICS, payload)


def decode_block_request(payload: bytes) -> BlockRequest:
    """A req payload -> BlockRequest."""
    return _decode(BlockRequest, Channel.REQ, payload)


ONLINE = b"online"
OFFLINE = b"offline"
# What a device's backend runs: "qemu" (images for its MCU's core, the default when a device
# does not say) or "host-<machine>" (the host backend: shared-library images, manifest
# target host-x86_64 etc.).
BACKEND_PATTERN = r"^(qemu|host-[a-z0-9_]{1,32})$"
DEFAULT_BACKEND = "qemu"


class Presence(_Message):
    """A device's presence, and optionally which images its backend runs (the service offers
    the artifact built for it: the MCU image, or the host library for `host-<machine>`)."""

    online: bool
    backend: Annotated[str, StringConstraints(pattern=BACKEND_PATTERN)] | None = None


def encode_presence(online: bool, backend: str | None = None) -> bytes:
    """b"online" / b"offline", or the JSON Presence when a backend is named."""
    if backend is None:
        return ONLINE if online else OFFLINE
    return Presence(online=online, backend=backend).model_dump_json().encode()


def decode_presence_message(payload: bytes) -> Presence:
    """A presence payload (b"online", b"offline" or a JSON Presence) -> Presence."""
    _check_size(Channel.PRESENCE, payload)
    if payload == ONLINE:
        return Presence(online=True)
    if payload == OFFLINE:
        return Presence(online=False)
    if payload.startswith(b"{"):
        return _decode(Presence, Channel.PRESENCE, payload)
    raise ProtocolError(f"presence payload {payload[:16]!r} is neither b'online', b'offline' "
                        "nor a JSON presence")


def decode_presence(payload: bytes) -> bool:
    """A presence payload -> online (True) or offline (False)."""
    return decode_presence_message(payload).online


# --- block frames ----------------------------------------------------------------------------

FRAME_MAGIC = b"TFBK"
FRAME_VERSION = 1
FRAME_HEADER = struct.Struct("<4sB3s8sIIII")
TAG_BYTES = 8


@dataclass(frozen=True)
class Block:
    """One decoded block frame (its CRC already checked)."""

    image_tag: bytes
    index: int
    total: int
    data: bytes


def image_tag(image_sha256: str) -> bytes:
    """The 8-byte tag of an image in its block frames: the start of its sha256."""
    return bytes.fromhex(image_sha256[: 2 * TAG_BYTES])


def encode_block(tag: bytes, index: int, total: int, data: bytes) -> bytes:
    """One block frame: header + data."""
    if len(tag) != TAG_BYTES:
        raise ProtocolError(f"image tag is {len(tag)} bytes, must be {TAG_BYTES}")
    if not 0 <= index < total <= MAX_BLOCKS:
        raise ProtocolError(f"block index {index} of {total} is out of range")
    if not 0 < len(data) <= MAX_BLOCK_SIZE:
        raise ProtocolError(f"block data is {len(data)} bytes, must be 1..{MAX_BLOCK_SIZE}")
    return FRAME_HEADER.pack(FRAME_MAGIC, FRAME_VERSION, b"\0\0\0", tag, index, total,
                             len(data), zlib.crc32(data)) + data


def decode_block(frame: bytes) -> Block:
    """A blk payload -> Block; ProtocolError for a bad header, a short frame or a CRC mismatch."""
    _check_size(Channel.BLK, frame)
    if len(frame) < FRAME_HEADER.size:
        raise ProtocolError(f"block frame is {len(frame)} bytes, shorter than its "
                            f"{FRAME_HEADER.size}-byte header")
    magic, version, reserved, tag, index, total, length, crc = FRAME_HEADER.unpack_from(frame)
    if magic != FRAME_MAGIC:
        raise ProtocolError(f"block frame magic {magic!r} is not {FRAME_MAGIC!r}")
    if version != FRAME_VERSION:
        raise ProtocolError(f"block frame version {version} is not {FRAME_VERSION}")
    if reserved != b"\0\0\0":
        raise ProtocolError("block frame reserved bytes are not 0")
    if not 0 <= index < total <= MAX_BLOCKS:
        raise ProtocolError(f"block index {index} of {total} is out of range")
    data = frame[FRAME_HEADER.size:]
    if len(data) != length:
        raise ProtocolError(f"block {index}: header says {length} bytes of data, frame has "
                            f"{len(data)}")
    actual = zlib.crc32(data)
    if actual != crc:
        raise ProtocolError(f"block {index}: CRC-32 {actual:08x} does not match the header's "
                            f"{crc:08x}")
    return Block(tag, index, total, data)
