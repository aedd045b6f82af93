"""The raw MQTT packets of the bridge's block connection, checked against paho's decoder."""

from __future__ import annotations

import pytest
from paho.mqtt import _packet  # paho's own packet decoder: an independent reading

from workers.block_publisher import _remaining_length, connect_packet, publish_packets

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("n", "encoded"), [
    (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16383, b"\xff\x7f"),
    (16384, b"\x80\x80\x01"), (2097151, b"\xff\xff\x7f"),
])
def test_remaining_length_is_mqtt_varint(n: int, encoded: bytes) -> None:
    assert _remaining_length(n) == encoded


def _split(data: bytes) -> list[tuple[int, bytes]]:
    """MQTT packets -> (first byte, body) each."""
    out = []
    i = 0
    while i < len(data):
        command, length, shift, i = data[i], 0, 0, i + 1
        while True:
            byte = data[i]
            i += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        out.append((command, data[i:i + length]))
        i += length
    return out


def test_publish_packets_decode_as_qos1_publishes_with_wrapping_ids() -> None:
    frames = [b"a" * 4096, b"b" * 200, b"c"]
    data, next_mid = publish_packets("tinyfleet/v1/dev-1/ota/u/blk", frames, 65534)
    assert next_mid == 2
    packets = _split(data)
    assert len(packets) == 3
    for (command, body), frame, mid in zip(packets, frames, (65534, 65535, 1), strict=True):
        decoded = _packet.decode_publish(command, body, 4)
        assert decoded.topic == b"tinyfleet/v1/dev-1/ota/u/blk"
        assert (decoded.qos, decoded.mid, decoded.payload) == (1, mid, frame)


def test_connect_packet() -> None:
    ((command, body),) = _split(connect_packet("bridge-blocks", "svc", "pw", 60))
    assert command == 0x10
    assert body[:7] == b"\x00\x04MQTT\x04" and body[7] == 0xC2  # user, password, clean
    assert body[8:10] == b"\x00\x3c"
    assert body[10:] == b"\x00\x0dbridge-blocks\x00\x03svc\x00\x02pw"
