"""Signed firmware images: round trip, and every changed byte is rejected with a reason."""

from __future__ import annotations

import dataclasses
import struct

import pytest

from firmware.errors import ImageError
from firmware.image import (
    HEADER,
    MAGIC,
    ImageSchedule,
    ImageTarget,
    Manifest,
    MemoryFigures,
    PayloadFormat,
    TensorQuant,
    TestVector,
    generate_signing_key,
    key_id,
    load_private_key,
    load_public_key,
    make_manifest,
    parse_image,
    private_key_pem,
    public_key_pem,
    sign_image,
    verify_image,
)

pytestmark = pytest.mark.unit

PAYLOAD = b"\x7fELF" + bytes(range(256)) * 2


def manifest(payload: bytes = PAYLOAD) -> Manifest:
    return make_manifest(
        model_id="tinynet", model_version="3",
        target=ImageTarget("stm32f746", "cortex-m7", 320 * 1024, 1024 * 1024, 496 * 1024),
        schedule=ImageSchedule(4, "b3.project", (19, 19), "inplace"),
        predicted=MemoryFigures(10_000, 40_000), measured=MemoryFigures(10_240, 41_000),
        input=TensorQuant(0.0078, 0, (1, 4, 4)), output=TensorQuant(0.09, 14, (10, 1, 1)),
        test_vectors=(TestVector(bytes([1, 255, 0, 128] * 4), (3, -4, 127, -128)),),
        payload=payload, payload_format=PayloadFormat.ELF,
    )


def test_round_trip() -> None:
    key = generate_signing_key()
    data = sign_image(manifest(), PAYLOAD, key)
    image = verify_image(data, key.public_key())
    assert image.manifest == manifest()
    assert image.payload == PAYLOAD
    assert image.manifest.sparse_update is None
    assert image.manifest.test_vectors[0].expected == (3, -4, 127, -128)
    assert data[:8] == MAGIC


def test_every_changed_byte_is_rejected() -> None:
    key = generate_signing_key()
    data = sign_image(manifest(), PAYLOAD, key)
    reasons = set()
    for i in range(len(data)):
        tampered = bytearray(data)
        tampered[i] ^= 0x01
        with pytest.raises(ImageError, match="image rejected") as info:
            verify_image(bytes(tampered), key.public_key())
        reasons.add(str(info.value).split(":")[1].strip().split(" ")[0])
    # Header fields get their own reasons; manifest, payload and signature the signature's.
    assert {"bad", "format", "reserved", "header", "Ed25519"} <= reasons


def test_truncated_extended_and_wrong_key() -> None:
    key = generate_signing_key()
    data = sign_image(manifest(), PAYLOAD, key)
    with pytest.raises(ImageError, match="but the image has"):
        verify_image(data[:-1], key.public_key())
    with pytest.raises(ImageError, match="but the image has"):
        verify_image(data + b"\0", key.public_key())
    with pytest.raises(ImageError, match="shorter than"):
        verify_image(data[:10], key.public_key())
    other = generate_signing_key().public_key()
    with pytest.raises(ImageError, match=key_id(other)):
        verify_image(data, other)


def test_resigned_payload_swap_is_caught_by_digest() -> None:
    """Someone with the key who swaps the payload but keeps the manifest is still caught."""
    key = generate_signing_key()
    data = bytearray(sign_image(manifest(), PAYLOAD, key))
    start = HEADER.size + struct.unpack_from("<I", data, 12)[0]
    data[start] ^= 0xFF
    signed = bytes(data[:-64])
    forged = signed + key.sign(signed)
    with pytest.raises(ImageError, match="payload sha256"):
        verify_image(forged, key.public_key())


def test_sign_refuses_a_manifest_for_another_payload() -> None:
    with pytest.raises(ImageError, match="describes a payload"):
        sign_image(manifest(), PAYLOAD + b"x", generate_signing_key())


def test_bad_manifest_field_is_named() -> None:
    key = generate_signing_key()
    bad = dataclasses.replace(manifest(), target=ImageTarget("x", "y", -1, 0, 0))
    body = bad.to_json().replace(b'"sram_bytes":-1', b'"sram_bytes":"big"')
    signed = HEADER.pack(MAGIC, 1, 0, len(body), len(PAYLOAD)) + body + PAYLOAD
    with pytest.raises(ImageError, match=r"target\.sram_bytes"):
        parse_image(signed + key.sign(signed))


def test_keys_round_trip_through_pem() -> None:
    key = generate_signing_key()
    again = load_private_key(private_key_pem(key))
    pub = load_public_key(public_key_pem(key.public_key()))
    assert key_id(pub) == key_id(again.public_key())
    assert key_id(load_public_key(private_key_pem(key))) == key_id(pub)
    with pytest.raises(ImageError, match="PEM"):
        load_public_key(b"not a key")
