"""The wire protocol: topics, strict JSON messages and block frames, every rejection named."""

from __future__ import annotations

import base64
import json
import zlib
from typing import Any

import pytest

from device_agent import protocol as p

pytestmark = pytest.mark.unit

SHA = "ab" * 32
SIG = "cd" * 64


def offer(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "ota_offer", "update_id": "u-1", "model_id": "kws", "model_version": "3",
        "target_mcu": "stm32f746", "target_cpu": "cortex-m7", "predicted_sram_bytes": 180000,
        "predicted_flash_bytes": 600000, "image_bytes": 10000, "image_sha256": SHA,
        "signature": SIG, "block_size": 4096, "block_count": 3,
        "offer_deadline": 1_800_000_000.0,
    }
    base.update(over)
    return base


def raw(obj: Any) -> bytes:
    return json.dumps(obj).encode()


# --- topics ----------------------------------------------------------------------------------


def test_topics_round_trip() -> None:
    assert p.cmd_topic("dev-1") == "tinyfleet/v1/dev-1/cmd"
    assert p.parse_topic(p.evt_topic("dev-1")) == p.Topic("dev-1", p.Channel.EVT)
    assert p.parse_topic(p.metrics_topic("d")) == p.Topic("d", p.Channel.METRICS)
    assert p.parse_topic(p.presence_topic("d")) == p.Topic("d", p.Channel.PRESENCE)
    assert p.parse_topic(p.req_topic("d", "u7")) == p.Topic("d", p.Channel.REQ, "u7")
    assert p.parse_topic(p.blk_topic("d", "u7")) == p.Topic("d", p.Channel.BLK, "u7")
    assert p.device_subscriptions("d") == ("tinyfleet/v1/d/cmd", "tinyfleet/v1/d/ota/+/blk")


@pytest.mark.parametrize("topic", [
    "tinyfleet/v2/d/evt", "tinyfleet/v1/d", "tinyfleet/v1/d/evt/x", "tinyfleet/v1/d/other",
    "tinyfleet/v1/d/ota/u/put", "tinyfleet/v1/+/evt", "tinyfleet/v1/d/ota/#/req",
    "tinyfleet/v1//evt", "other/v1/d/evt",
])
def test_foreign_topics_are_refused(topic: str) -> None:
    with pytest.raises(p.ProtocolError):
        p.parse_topic(topic)


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "", "x" * 65, "$SYS", "-lead"])
def test_ids_that_would_break_a_topic_are_refused(bad: str) -> None:
    with pytest.raises(p.ProtocolError, match="device id"):
        p.cmd_topic(bad)
    with pytest.raises(p.ProtocolError, match="update id"):
        p.blk_topic("dev", bad)


# --- commands --------------------------------------------------------------------------------


def test_offer_round_trips_and_knows_its_blocks() -> None:
    cmd = p.decode_command(raw(offer()))
    assert isinstance(cmd, p.OtaOffer)
    assert p.decode_command(p.encode(cmd)) == cmd
    assert [cmd.block_length(i) for i in range(3)] == [4096, 4096, 10000 - 8192]
    assert cmd.image_tag == bytes.fromhex("ab" * 8)
    with pytest.raises(p.ProtocolError, match="outside"):
        cmd.block_length(3)


def test_other_commands_round_trip() -> None:
    for message in (p.PersonalizeCommand(round=2, scheme={"layers": [1, 2]}),
                    p.PersonalizeCommand(round=0),
                    p.RollbackCommand(update_id="u-1", reason="operator"),
                    p.RollbackCommand()):
        assert p.decode_command(p.encode(message)) == message


@pytest.mark.parametrize(("over", "field"), [
    ({"type": "format_disk"}, "type"),
    ({"extra": 1}, "extra: unknown field"),
    ({"image_bytes": "10000"}, "image_bytes"),
    ({"image_bytes": 10000.0}, "image_bytes"),
    ({"block_size": 100}, "block_size"),
    ({"block_count": 4}, "block_count 4 does not cut"),
    ({"image_sha256": "AB" * 32}, "image_sha256"),
    ({"signature": "00"}, "signature"),
    ({"update_id": "a/b"}, "update_id"),
    ({"predicted_sram_bytes": -1}, "predicted_sram_bytes"),
    ({"offer_deadline": True}, "offer_deadline"),
    ({"model_id": ""}, "model_id"),
])
def test_bad_offers_are_refused_naming_the_field(over: dict[str, Any], field: str) -> None:
    with pytest.raises(p.ProtocolError, match=field):
        p.decode_command(raw(offer(**over)))


def test_missing_offer_field_is_named() -> None:
    body = offer()
    del body["image_sha256"]
    with pytest.raises(p.ProtocolError, match="image_sha256"):
        p.decode_command(raw(body))


@pytest.mark.parametrize("payload", [b"", b"{", b"[]", b"\xff\xfe", b"null", b'"ota_offer"'])
def test_non_objects_are_refused(payload: bytes) -> None:
    with pytest.raises(p.ProtocolError, match="cmd"):
        p.decode_command(payload)


def test_oversized_payloads_are_refused_before_parsing() -> None:
    big = raw(offer(model_id="x" * (70 * 1024)))
    with pytest.raises(p.ProtocolError, match="over the 65536-byte cap"):
        p.decode_command(big)
    event = raw({"update_id": "u", "state": "failed", "reason": "r", "pad": "x" * 2000})
    with pytest.raises(p.ProtocolError, match=r"evt payload is .* over the 1024-byte cap"):
        p.decode_event(event)


# --- events and metrics ----------------------------------------------------------------------


def test_event_round_trip() -> None:
    event = p.DeviceEvent(update_id="u-1", state=p.UpdateState.DOWNLOADING, progress=0.5,
                          slot=1, time=1_800_000_000.5)
    assert p.decode_event(p.encode(event)) == event
    assert p.UpdateState.INSTALLED.terminal and not p.UpdateState.VERIFYING.terminal


@pytest.mark.parametrize(("body", "field"), [
    ({"update_id": "u", "state": "exploded"}, "state"),
    ({"update_id": "u", "state": "installed", "progress": 1.5}, "progress"),
    ({"update_id": "u", "state": "installed", "progress": "half"}, "progress"),
    ({"update_id": "u", "state": "refused"}, "needs a reason"),
    ({"update_id": "u", "state": "failed", "reason": "x" * 257}, "reason"),
    ({"update_id": "u", "state": "installed", "slot": 2}, "slot"),
    ({"update_id": "u", "state": "installed", "time": -1}, "time"),
    ({"update_id": "u", "state": "installed", "raw_samples": [1, 2]}, "raw_samples: unknown"),
    ({"state": "installed"}, "update_id"),
])
def test_bad_events_are_refused_naming_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(p.ProtocolError, match=field):
        p.decode_event(raw(body))


def metrics(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"round": 1, "samples_used": 120, "accuracy_before": 0.6,
                            "accuracy_after": 0.8, "loss_before": 1.2, "loss_after": 0.5,
                            "loss_curve": [1.2, 0.9, 0.5], "training_memory_bytes": 150_000,
                            "duration_s": 12.5}
    base.update(over)
    return base


def test_metrics_round_trip() -> None:
    report = p.decode_metrics(raw(metrics()))
    assert report.loss_curve == (1.2, 0.9, 0.5)
    assert p.decode_metrics(p.encode(report)) == report


@pytest.mark.parametrize(("over", "field"), [
    ({"labels": [1, 0]}, "labels: unknown field"),
    ({"features": "base64..."}, "features: unknown field"),
    ({"accuracy_after": 1.01}, "accuracy_after"),
    ({"loss_curve": [0.1] * 51}, "loss_curve"),
    ({"loss_curve": [0.1, "x"]}, "loss_curve.1"),
    ({"samples_used": 1.5}, "samples_used"),
    ({"duration_s": "12"}, "duration_s"),
])
def test_metrics_are_an_allow_list_of_numbers(over: dict[str, Any], field: str) -> None:
    with pytest.raises(p.ProtocolError, match=field):
        p.decode_metrics(raw(metrics(**over)))


def test_non_finite_numbers_are_refused() -> None:
    with pytest.raises(p.ProtocolError, match="loss_after"):
        p.decode_metrics(json.dumps(metrics(loss_after=float("nan"))).encode())


# --- presence --------------------------------------------------------------------------------


def test_presence() -> None:
    assert p.decode_presence(b"online") is True
    assert p.decode_presence(b"offline") is False
    for bad in (b"Online", b"", b"online\n", b"x" * 17):
        with pytest.raises(p.ProtocolError):
            p.decode_presence(bad)


def test_presence_may_name_the_backend_strictly() -> None:
    assert p.encode_presence(True) == p.ONLINE and p.encode_presence(False) == p.OFFLINE
    for backend in ("qemu", "host-x86_64", "host-aarch64"):
        message = p.decode_presence_message(p.encode_presence(True, backend))
        assert message == p.Presence(online=True, backend=backend)
    assert p.decode_presence_message(b"online").backend is None
    assert p.decode_presence(b'{"online":true,"backend":"host-x86_64"}') is True
    bad = {b'{"online":true,"backend":"host-"}': "backend",
           b'{"online":true,"backend":"cortex-m0plus"}': "backend",
           b'{"online":"yes"}': "online", b'{"backend":"qemu"}': "online",
           b'{"online":true,"data":[1]}': "data: unknown field",
           b'{"online":true,"backend":"' + b"host-" + b"x" * 120 + b'"}': "128-byte cap"}
    for payload, reason in bad.items():
        with pytest.raises(p.ProtocolError, match=reason):
            p.decode_presence_message(payload)


# --- block requests --------------------------------------------------------------------------


def test_block_request_as_ranges_and_bitmap() -> None:
    few = p.BlockRequest.for_blocks([0, 1, 2, 7, 9, 10])
    assert few.ranges == ((0, 3), (7, 8), (9, 11))
    assert few.indices(11) == [0, 1, 2, 7, 9, 10]
    assert p.decode_block_request(p.encode(few)) == few
    many = p.BlockRequest.for_blocks(range(0, 400, 2))  # 200 runs: a bitmap
    assert many.bitmap is not None and many.ranges is None
    assert many.indices(400) == list(range(0, 400, 2))
    assert p.decode_block_request(p.encode(many)) == many


@pytest.mark.parametrize(("body", "field"), [
    ({}, "exactly one"),
    ({"ranges": [[0, 2]], "bitmap": "AAAA"}, "exactly one"),
    ({"ranges": [[3, 3]]}, "empty"),
    ({"ranges": [[0, 1, 2]]}, "ranges.0"),
    ({"ranges": [["0", 1]]}, "ranges.0.0"),
    ({"ranges": [[0, 1]] * 65}, "ranges"),
    ({"ranges": []}, "ranges"),
    ({"bitmap": "not base64!"}, "bitmap"),
    ({"blocks": [1]}, "blocks: unknown field"),
])
def test_bad_block_requests_are_refused(body: dict[str, Any], field: str) -> None:
    with pytest.raises(p.ProtocolError, match=field):
        p.decode_block_request(raw(body))


def test_block_request_past_the_image_is_refused() -> None:
    with pytest.raises(p.ProtocolError, match="past the image's 5 blocks"):
        p.BlockRequest(ranges=((3, 6),)).indices(5)
    bitmap = base64.b64encode(bytes([0, 0b100])).decode()  # block 10
    with pytest.raises(p.ProtocolError, match="block 10, past"):
        p.BlockRequest(bitmap=bitmap).indices(8)
    with pytest.raises(p.ProtocolError, match="no block"):
        p.BlockRequest(bitmap="AAAA").indices(8)
    with pytest.raises(p.ProtocolError, match="at least one"):
        p.BlockRequest.for_blocks([])


# --- block frames ----------------------------------------------------------------------------


def test_block_frame_round_trip() -> None:
    tag = p.image_tag(SHA)
    frame = p.encode_block(tag, 2, 3, b"hello")
    assert len(frame) == p.FRAME_HEADER.size + 5
    assert p.decode_block(frame) == p.Block(tag, 2, 3, b"hello")


def test_corrupt_frames_are_refused() -> None:
    tag = p.image_tag(SHA)
    frame = bytearray(p.encode_block(tag, 0, 1, b"payload"))
    flipped = bytearray(frame)
    flipped[-1] ^= 1
    with pytest.raises(p.ProtocolError, match="CRC-32"):
        p.decode_block(bytes(flipped))
    with pytest.raises(p.ProtocolError, match="header says 7 bytes"):
        p.decode_block(bytes(frame[:-1]))
    with pytest.raises(p.ProtocolError, match="shorter than its 32-byte header"):
        p.decode_block(bytes(frame[:10]))
    bad_magic = b"XXXX" + bytes(frame[4:])
    with pytest.raises(p.ProtocolError, match="magic"):
        p.decode_block(bad_magic)
    bad_version = bytes(frame[:4]) + b"\x02" + bytes(frame[5:])
    with pytest.raises(p.ProtocolError, match="version 2"):
        p.decode_block(bad_version)
    header = p.FRAME_HEADER.pack(p.FRAME_MAGIC, 1, b"\0\0\0", tag, 5, 5, 1, zlib.crc32(b"x"))
    with pytest.raises(p.ProtocolError, match="index 5 of 5"):
        p.decode_block(header + b"x")
    with pytest.raises(p.ProtocolError, match="over the"):
        p.decode_block(b"\0" * (p.MAX_PAYLOAD_BYTES[p.Channel.BLK] + 1))


def test_frames_are_checked_when_built() -> None:
    with pytest.raises(p.ProtocolError, match="tag"):
        p.encode_block(b"short", 0, 1, b"x")
    with pytest.raises(p.ProtocolError, match="out of range"):
        p.encode_block(p.image_tag(SHA), 1, 1, b"x")
    with pytest.raises(p.ProtocolError, match=r"1\.\.65536"):
        p.encode_block(p.image_tag(SHA), 0, 1, b"")
