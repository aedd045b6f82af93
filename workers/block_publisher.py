"""The bridge's block connection: block frames written as raw MQTT 3.1.1 PUBLISH packets.

Serving a block request is the bridge's hot path (a 200 kB image is 51 frames per device).
paho spends ~100 us of Python per QoS 1 publish (message objects, a condition variable, three
`recv` calls and a Properties object per PUBACK); this connection writes all the frames of
one request in one `sendall` and reads PUBACKs in bulk. It only publishes: it subscribes to
nothing and keeps no session (clean session). Unacknowledged frames are not re-sent after a
reconnect; the devices ask again for what they lack, which is what the protocol is for.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from service.broker_control import BrokerEndpoint

log = logging.getLogger(__name__)

PUBLISH_QOS1 = 0x32
PUBACK = 0x40
PINGREQ = b"\xc0\x00"
PINGRESP = 0xD0
CONNACK = 0x20
KEEPALIVE_S = 60
MAX_UNACKED = 30_000  # packet ids are 16-bit: stay well inside them
CONNECT_TIMEOUT_S = 10.0


class BlockConnectionError(ConnectionError):
    """The block connection could not be made or broke."""


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: bytes) -> bytes:
    return struct.pack("!H", len(text)) + text


def connect_packet(client_id: str, username: str, password: str,
                   keepalive_s: int = KEEPALIVE_S) -> bytes:
    """An MQTT 3.1.1 CONNECT: clean session, username and password."""
    variable = _string(b"MQTT") + bytes([4, 0xC2]) + struct.pack("!H", keepalive_s)
    payload = _string(client_id.encode()) + _string(username.encode()) + _string(
        password.encode())
    body = variable + payload
    return bytes([0x10]) + _remaining_length(len(body)) + body


def publish_packets(topic: str, frames: Sequence[bytes], first_mid: int) -> tuple[bytes, int]:
    """QoS 1 PUBLISH packets of `frames` on `topic`, packet ids from `first_mid` (1..65535,
    wrapping); the bytes and the next packet id."""
    head = _string(topic.encode())
    parts = []
    mid = first_mid
    for frame in frames:
        parts.append(bytes([PUBLISH_QOS1]) + _remaining_length(len(head) + 2 + len(frame)) +
                     head + mid.to_bytes(2, "big"))
        parts.append(frame)
        mid = mid % 65535 + 1
    return b"".join(parts), mid


@dataclass
class _Send:
    topic: str
    frames: Sequence[bytes]


class BlockPublisher:
    """Publishes block frames at QoS 1 on its own connection, from a writer thread."""

    def __init__(self, endpoint: BrokerEndpoint, client_id: str, username: str,
                 password: str, on_dropped: Callable[[int], None] | None = None) -> None:
        self.endpoint = endpoint
        self.client_id = client_id
        self.username = username
        self.password = password
        self.sent = 0
        self.acked = 0
        self.dropped = 0  # frames not written because the broker was unreachable
        self.on_dropped = on_dropped
        self._sock: socket.socket | None = None
        self._mid = 1
        self._queue: queue.Queue[_Send | None] = queue.Queue()
        self._acks = threading.Condition()
        self._closing = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="bridge-blocks",
                                        daemon=True)
        self._writer.start()

    def send(self, topic: str, frames: Sequence[bytes]) -> None:
        """Queue `frames` for `topic` (returns at once; written in order)."""
        self._queue.put(_Send(topic, frames))

    def close(self) -> None:
        """Stop the writer and close the connection."""
        self._closing.set()
        self._queue.put(None)
        self._writer.join(10.0)
        self._disconnect()

    def wait_acked(self, timeout_s: float) -> bool:
        """Wait until every queued frame was written and acknowledged (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._acks:
                if self._queue.empty() and self.acked >= self.sent:
                    return True
                self._acks.wait(0.05)
        return False

    # --- connection ---------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        endpoint = self.endpoint
        if endpoint.unix_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: str | tuple[str, int] = str(endpoint.unix_path)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            address = (endpoint.host, endpoint.port)
        sock.settimeout(CONNECT_TIMEOUT_S)
        try:
            sock.connect(address)
            sock.sendall(connect_packet(self.client_id, self.username, self.password))
            connack = _read_exactly(sock, 4)
        except OSError:
            sock.close()
            raise
        if connack[0] != CONNACK or connack[3] != 0:
            sock.close()
            raise BlockConnectionError(f"broker {endpoint} refused the block connection "
                                       f"(CONNACK return code {connack[3]})")
        sock.settimeout(None)
        reader = threading.Thread(target=self._read_loop, args=(sock,), name="bridge-acks",
                                  daemon=True)
        reader.start()
        log.info("block connection to %s open", endpoint)
        return sock

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _read_loop(self, sock: socket.socket) -> None:
        """Count PUBACKs (4 bytes each) and PINGRESPs until the connection ends."""
        pending = b""
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                if not self._closing.is_set():
                    log.warning("block connection to %s closed by the broker", self.endpoint)
                if self._sock is sock:  # the next write reconnects
                    self._sock = None
                    sock.close()
                return
            pending += data
            acks = 0
            offset = 0
            while len(pending) - offset >= 2:
                kind, length = pending[offset], pending[offset + 1]
                if len(pending) - offset < 2 + length:
                    break
                if kind == PUBACK:
                    acks += 1
                elif kind != PINGRESP:
                    log.error("block connection got packet type 0x%02x: closing it", kind)
                    sock.close()
                    return
                offset += 2 + length
            pending = pending[offset:]
            if acks:
                with self._acks:
                    self.acked += acks
                    self._acks.notify_all()

    # --- writing ------------------------------------------------------------------------

    def _write_loop(self) -> None:
        last_write = time.monotonic()
        while True:
            try:
                item = self._queue.get(timeout=KEEPALIVE_S / 2)
            except queue.Empty:
                item = _Send("", ())  # idle: a PINGREQ keeps the connection
            if item is None:
                return
            if time.monotonic() - last_write > KEEPALIVE_S / 2 and self._sock is not None:
                self._write(PINGREQ)
            if not item.frames:
                continue
            with self._acks:  # flow control: at most MAX_UNACKED frames unacknowledged
                while self.sent - self.acked > MAX_UNACKED and self._sock is not None:
                    self._acks.wait(0.5)
            data, self._mid = publish_packets(item.topic, item.frames, self._mid)
            if self._write(data):
                with self._acks:
                    self.sent += len(item.frames)
            else:
                self.dropped += len(item.frames)
                if self.on_dropped is not None:
                    self.on_dropped(len(item.frames))
            last_write = time.monotonic()

    def _write(self, data: bytes) -> bool:
        """Write `data`, (re)connecting first if needed; False if the broker is unreachable."""
        for _attempt in range(2):
            if self._sock is None:
                try:
                    self._sock = self._connect()
                except (OSError, BlockConnectionError) as exc:
                    log.warning("block connection to %s failed: %s", self.endpoint, exc)
                    return False
                with self._acks:  # frames of the old connection will never be acked
                    self.acked = self.sent
            try:
                self._sock.sendall(data)
                return True
            except OSError:
                self._disconnect()
        return False


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise BlockConnectionError("the broker closed the connection during CONNECT")
        data += chunk
    return data
