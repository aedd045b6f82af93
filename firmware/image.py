"""The signed firmware image: header, manifest JSON, payload, Ed25519 signature.

Layout (little endian):

    offset  size  field
    0       8     magic b"TFLYIMG\\0"
    8       2     format version (1)
    10      2     flags (reserved, 0)
    12      4     manifest length M
    16      4     payload length P
    20      M     manifest: UTF-8 JSON, keys sorted, no whitespace
    20+M    P     payload (an ELF file or a raw binary, see manifest.payload_format)
    20+M+P  64    Ed25519 signature over bytes [0, 20+M+P)

The signature covers the header too, so no byte can change without `verify_image` failing;
the manifest carries the payload's sha256 so a payload can also be checked on its own once
streamed to flash. Images are parsed into frozen dataclasses here, at the edge; nothing
downstream reads raw JSON.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from firmware.errors import ImageError

MAGIC = b"TFLYIMG\x00"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sHHII")
SIGNATURE_BYTES = 64
MAX_MANIFEST_BYTES = 16 * 1024 * 1024


class PayloadFormat(enum.Enum):
    """What the payload bytes are."""

    ELF = "elf"  # the linked firmware as an ELF file (what QEMU loads)
    BIN = "bin"  # a raw flash image (objcopy -O binary)


@dataclass(frozen=True)
class MemoryFigures:
    """SRAM and Flash in bytes."""

    sram_bytes: int
    flash_bytes: int


@dataclass(frozen=True)
class ImageTarget:
    """The device class the image was built for."""

    name: str
    cpu: str
    sram_bytes: int
    flash_bytes: int
    slot_bytes: int


@dataclass(frozen=True)
class ImageSchedule:
    """The inference schedule compiled in: p x p patches up to `split_after` (p = 1: layers)."""

    patches: int
    split_after: str | None
    input_patch: tuple[int, int] | None
    memory_model: str


@dataclass(frozen=True)
class TensorQuant:
    """int8 quantization of the model's input or output: real = scale * (q - zero_point)."""

    scale: float
    zero_point: int
    shape: tuple[int, int, int]  # (channels, height, width); bytes are HWC


@dataclass(frozen=True)
class TestVector:
    """One int8 input (HWC bytes) and the int8 logits the reference computes for it."""

    __test__ = False  # not a pytest class, despite the name

    input_q: bytes
    expected: tuple[int, ...]


@dataclass(frozen=True)
class OverlayRegion:
    """Where a slot keeps its weights overlay (firmware.codegen.overlay) and what it covers."""

    address: int  # absolute Flash address of the region (the slot's last `region_bytes`)
    region_bytes: int
    body_bytes: int
    layout_id: int
    layers: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    """Everything a device or operator needs to know about an image, besides its payload."""

    model_id: str
    model_version: str
    target: ImageTarget
    schedule: ImageSchedule
    predicted: MemoryFigures
    measured: MemoryFigures | None
    input: TensorQuant
    output: TensorQuant
    test_vectors: tuple[TestVector, ...]
    payload_format: PayloadFormat
    payload_bytes: int
    payload_sha256: str
    sparse_update: Mapping[str, Any] | None = None  # the on-device training scheme
    # False: built for a core with no QEMU board, never run before signing ("not emulated")
    emulated: bool = True
    overlay: OverlayRegion | None = None  # images built for on-device personalization
    # The int8 graph the device fine-tunes (firmware.int8.serialize bytes), signed with the
    # rest; present in images built for personalization (their firmware cannot be trained).
    int8_model: bytes | None = None

    def to_json(self) -> bytes:
        """Canonical JSON bytes (sorted keys, no whitespace): what the signature covers."""
        return json.dumps(_manifest_dict(self), sort_keys=True, separators=(",", ":"),
                          allow_nan=False).encode()


@dataclass(frozen=True)
class FirmwareImage:
    """A parsed image. `signed_bytes` is everything the signature covers."""

    format_version: int
    manifest: Manifest
    payload: bytes
    signature: bytes
    signed_bytes: bytes


def make_manifest(*, model_id: str, model_version: str, target: ImageTarget,
                  schedule: ImageSchedule, predicted: MemoryFigures,
                  measured: MemoryFigures | None, input: TensorQuant, output: TensorQuant,
                  test_vectors: tuple[TestVector, ...], payload: bytes,
                  payload_format: PayloadFormat,
                  sparse_update: Mapping[str, Any] | None = None,
                  emulated: bool = True,
                  overlay: OverlayRegion | None = None,
                  int8_model: bytes | None = None) -> Manifest:
    """A Manifest whose payload size and sha256 are computed from `payload`."""
    return Manifest(model_id=model_id, model_version=model_version, target=target,
                    schedule=schedule, predicted=predicted, measured=measured, input=input,
                    output=output, test_vectors=test_vectors, payload_format=payload_format,
                    payload_bytes=len(payload), payload_sha256=hashlib.sha256(payload).hexdigest(),
                    sparse_update=sparse_update, emulated=emulated, overlay=overlay,
                    int8_model=int8_model)


def sign_image(manifest: Manifest, payload: bytes, key: Ed25519PrivateKey) -> bytes:
    """Serialize and sign an image; the manifest must describe this payload."""
    digest = hashlib.sha256(payload).hexdigest()
    if manifest.payload_sha256 != digest or manifest.payload_bytes != len(payload):
        raise ImageError(
            f"manifest describes a payload of {manifest.payload_bytes} bytes, sha256 "
            f"{manifest.payload_sha256[:16]}..., not this one ({len(payload)} bytes, "
            f"{digest[:16]}...)"
        )
    body = manifest.to_json()
    if len(body) > MAX_MANIFEST_BYTES:
        raise ImageError(f"manifest is {len(body)} bytes, over the {MAX_MANIFEST_BYTES} limit")
    signed = HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(body), len(payload)) + body + payload
    return signed + key.sign(signed)


def parse_image(data: bytes) -> FirmwareImage:
    """Check an image's structure and parse it (the signature is NOT checked here)."""
    minimum = HEADER.size + SIGNATURE_BYTES
    if len(data) < minimum:
        raise ImageError(f"image is {len(data)} bytes, shorter than the {minimum}-byte minimum "
                         "(header + signature)")
    magic, version, flags, manifest_len, payload_len = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ImageError(f"bad magic {magic!r} (expected {MAGIC!r}): not a tinyfleet image")
    if version != FORMAT_VERSION:
        raise ImageError(f"format version {version} is not supported (this build reads "
                         f"{FORMAT_VERSION})")
    if flags != 0:
        raise ImageError(f"reserved header flags are 0x{flags:04x}, must be 0")
    expected = HEADER.size + manifest_len + payload_len + SIGNATURE_BYTES
    if len(data) != expected:
        raise ImageError(
            f"header declares a {manifest_len}-byte manifest and a {payload_len}-byte payload "
            f"({expected} bytes with header and signature), but the image has {len(data)} bytes"
        )
    body_end = HEADER.size + manifest_len
    signed_end = body_end + payload_len
    manifest = parse_manifest(data[HEADER.size:body_end])
    return FirmwareImage(format_version=version, manifest=manifest,
                         payload=data[body_end:signed_end], signature=data[signed_end:],
                         signed_bytes=data[:signed_end])


def verify_image(data: bytes, public_key: Ed25519PublicKey) -> FirmwareImage:
    """Parse an image and check its signature and payload digest; ImageError says what failed."""
    try:
        image = parse_image(data)
    except ImageError as exc:
        raise ImageError(f"image rejected: {exc}") from exc
    try:
        public_key.verify(image.signature, image.signed_bytes)
    except InvalidSignature:
        raise ImageError(
            f"image rejected: Ed25519 signature does not verify with key {key_id(public_key)} "
            "(the image was modified after signing, or signed by another key)"
        ) from None
    manifest = image.manifest
    digest = hashlib.sha256(image.payload).hexdigest()
    if digest != manifest.payload_sha256 or len(image.payload) != manifest.payload_bytes:
        raise ImageError(
            f"image rejected: payload sha256 {digest[:16]}... ({len(image.payload)} bytes) does "
            f"not match the manifest's {manifest.payload_sha256[:16]}... "
            f"({manifest.payload_bytes} bytes)"
        )
    return image


# --- keys ------------------------------------------------------------------------------------


def generate_signing_key() -> Ed25519PrivateKey:
    """A new Ed25519 signing key."""
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    """PKCS#8 PEM of a private key (unencrypted: protect the file)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM of a public key."""
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key(pem: bytes) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM; ImageError if it is another kind of key."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ImageError(f"signing key is not a readable unencrypted PEM key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ImageError(f"signing key is {type(key).__name__}, expected Ed25519")
    return key


def load_public_key(data: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (a private key PEM yields its public half)."""
    if b"PRIVATE KEY" in data:
        return load_private_key(data).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ImageError(f"public key is not a readable PEM key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ImageError(f"public key is {type(key).__name__}, expected Ed25519")
    return key


def key_id(key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw public key (for messages and logs)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# --- manifest JSON <-> dataclasses -----------------------------------------------------------


def _memory_dict(m: MemoryFigures | None) -> dict[str, int] | None:
    return None if m is None else {"sram_bytes": m.sram_bytes, "flash_bytes": m.flash_bytes}


def _quant_dict(t: TensorQuant) -> dict[str, Any]:
    return {"scale": t.scale, "zero_point": t.zero_point, "shape": list(t.shape)}


def _manifest_dict(m: Manifest) -> dict[str, Any]:
    s = m.schedule
    return {
        "model_id": m.model_id,
        "model_version": m.model_version,
        "target": {"name": m.target.name, "cpu": m.target.cpu,
                   "sram_bytes": m.target.sram_bytes, "flash_bytes": m.target.flash_bytes,
                   "slot_bytes": m.target.slot_bytes},
        "schedule": {"patches": s.patches, "split_after": s.split_after,
                     "input_patch": None if s.input_patch is None else list(s.input_patch),
                     "memory_model": s.memory_model},
        "memory": {"predicted": _memory_dict(m.predicted), "measured": _memory_dict(m.measured)},
        "input": _quant_dict(m.input),
        "output": _quant_dict(m.output),
        "test_vectors": [{"input_b64": base64.b64encode(v.input_q).decode(),
                          "expected": list(v.expected)} for v in m.test_vectors],
        "payload": {"format": m.payload_format.value, "bytes": m.payload_bytes,
                    "sha256": m.payload_sha256},
        "sparse_update": None if m.sparse_update is None else dict(m.sparse_update),
        # Only written when false: images checked in QEMU keep their canonical bytes.
        **({} if m.emulated else {"emulated": False}),
        # absent rather than null, so that manifests without one keep their bytes
        **({} if m.overlay is None else {"overlay": {
            "address": m.overlay.address, "region_bytes": m.overlay.region_bytes,
            "body_bytes": m.overlay.body_bytes, "layout_id": m.overlay.layout_id,
            "layers": list(m.overlay.layers)}}),
        **({} if m.int8_model is None else {
            "int8_model_b64": base64.b64encode(m.int8_model).decode()}),
    }


class _Fields:
    """Typed access to one JSON object; errors name the field's dotted path."""

    def __init__(self, obj: object, path: str) -> None:
        if not isinstance(obj, dict):
            raise ImageError(f"manifest field {path or '(root)'} must be an object")
        self.obj: dict[str, Any] = obj
        self.path = path

    def _get(self, key: str, kinds: tuple[type, ...], optional: bool = False) -> Any:
        where = f"{self.path}.{key}" if self.path else key
        if key not in self.obj:
            raise ImageError(f"manifest field {where} is missing")
        value = self.obj[key]
        if value is None and optional:
            return None
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ImageError(f"manifest field {where} has the wrong type "
                             f"({type(value).__name__})")
        return value

    def text(self, key: str) -> str:
        return str(self._get(key, (str,)))

    def opt_text(self, key: str) -> str | None:
        value = self._get(key, (str,), optional=True)
        return None if value is None else str(value)

    def integer(self, key: str) -> int:
        return int(self._get(key, (int,)))

    def number(self, key: str) -> float:
        return float(self._get(key, (int, float)))

    def integers(self, key: str, optional: bool = False) -> tuple[int, ...] | None:
        value = self._get(key, (list,), optional=optional)
        if value is None:
            return None
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ImageError(f"manifest field {self.path}.{key} must be a list of integers")
        return tuple(value)

    def sub(self, key: str, optional: bool = False) -> _Fields | None:
        value = self._get(key, (dict,), optional=optional)
        return None if value is None else _Fields(value, f"{self.path}.{key}".lstrip("."))

    def need(self, key: str) -> _Fields:
        sub = self.sub(key)
        assert sub is not None
        return sub


def _memory(f: _Fields | None) -> MemoryFigures | None:
    return None if f is None else MemoryFigures(f.integer("sram_bytes"), f.integer("flash_bytes"))


def _quant(f: _Fields) -> TensorQuant:
    shape = f.integers("shape")
    if shape is None or len(shape) != 3:
        raise ImageError(f"manifest field {f.path}.shape must be [channels, height, width]")
    return TensorQuant(f.number("scale"), f.integer("zero_point"), (shape[0], shape[1], shape[2]))


def _vectors(root: _Fields) -> tuple[TestVector, ...]:
    raw = root._get("test_vectors", (list,))
    vectors = []
    for i, item in enumerate(raw):
        f = _Fields(item, f"test_vectors[{i}]")
        try:
            data = base64.b64decode(f.text("input_b64"), validate=True)
        except ValueError as exc:
            raise ImageError(f"manifest field test_vectors[{i}].input_b64: {exc}") from exc
        expected = f.integers("expected")
        assert expected is not None
        vectors.append(TestVector(data, expected))
    return tuple(vectors)


def parse_manifest(body: bytes) -> Manifest:
    """Manifest JSON bytes -> Manifest; ImageError names the first bad field."""
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ImageError(f"manifest is not UTF-8 JSON: {exc}") from exc
    root = _Fields(obj, "")
    t, s, mem, p = root.need("target"), root.need("schedule"), root.need("memory"), root.need(
        "payload")
    patch = s.integers("input_patch", optional=True)
    predicted = _memory(mem.need("predicted"))
    assert predicted is not None
    try:
        payload_format = PayloadFormat(p.text("format"))
    except ValueError:
        raise ImageError(f"manifest field payload.format {p.obj['format']!r} is not one of "
                         f"{[f.value for f in PayloadFormat]}") from None
    sparse = root._get("sparse_update", (dict,), optional=True)
    emulated = root._get("emulated", (bool,)) if "emulated" in root.obj else True
    overlay = _overlay(root.sub("overlay", optional=True) if "overlay" in root.obj else None)
    int8_model = None
    if "int8_model_b64" in root.obj:
        try:
            int8_model = base64.b64decode(root.text("int8_model_b64"), validate=True)
        except ValueError as exc:
            raise ImageError(f"manifest field int8_model_b64: {exc}") from exc
    return Manifest(
        model_id=root.text("model_id"), model_version=root.text("model_version"),
        target=ImageTarget(t.text("name"), t.text("cpu"), t.integer("sram_bytes"),
                           t.integer("flash_bytes"), t.integer("slot_bytes")),
        schedule=ImageSchedule(s.integer("patches"), s.opt_text("split_after"),
                               None if patch is None else (patch[0], patch[1]),
                               s.text("memory_model")),
        predicted=predicted, measured=_memory(mem.sub("measured", optional=True)),
        input=_quant(root.need("input")), output=_quant(root.need("output")),
        test_vectors=_vectors(root), payload_format=payload_format,
        payload_bytes=p.integer("bytes"), payload_sha256=p.text("sha256"), sparse_update=sparse,
        emulated=bool(emulated), overlay=overlay, int8_model=int8_model,
    )


def _overlay(f: _Fields | None) -> OverlayRegion | None:
    if f is None:
        return None
    raw = f._get("layers", (list,))
    if not all(isinstance(v, str) for v in raw):
        raise ImageError("manifest field overlay.layers must be a list of layer names")
    region = OverlayRegion(f.integer("address"), f.integer("region_bytes"),
                           f.integer("body_bytes"), f.integer("layout_id"), tuple(raw))
    if min(region.address, region.region_bytes, region.body_bytes, region.layout_id) < 0:
        raise ImageError("manifest field overlay: address and sizes must be >= 0")
    if region.body_bytes + 24 > region.region_bytes:
        raise ImageError(f"manifest field overlay: a {region.body_bytes}-byte body does not "
                         f"fit its {region.region_bytes}-byte region")
    return region
