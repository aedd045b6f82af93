"""Many simulated devices (ReferenceDevice) on one thread: one selector over their sockets."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

from paho.mqtt.enums import MQTTErrorCode

from device_agent.reference_client import KEEPALIVE_S, RECONNECT_S, ReferenceDevice


class _BufferedSocket:
    """A client's socket with read and write buffers, so that its packets cost few syscalls.

    paho reads a packet with three `recv` calls (type, length, body) and writes each packet
    with its own `send`; on a loaded VM those syscalls were most of a simulated device's
    CPU. Reads here take up to 64 kB at once and serve paho from the buffer; writes collect
    until the loop flushes them in one `send`. The loop keeps reading while data is buffered
    (the selector cannot see it).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.rbuf = bytearray()
        self.wbuf = bytearray()

    def recv(self, n: int) -> bytes:
        if not self.rbuf:
            data = self.sock.recv(65536)  # BlockingIOError when empty: what paho expects
            if not data:
                return b""
            self.rbuf += data
        out = bytes(self.rbuf[:n])
        del self.rbuf[:n]
        return out

    def send(self, data: bytes | bytearray) -> int:
        self.wbuf += data
        return len(data)

    def flush(self) -> bool:
        """Write what is buffered; False while the kernel's buffer is full."""
        while self.wbuf:
            try:
                sent = self.sock.send(self.wbuf)
            except BlockingIOError:
                return False
            except OSError:  # the connection is gone: paho's next read finds out
                self.wbuf.clear()
                return True
            del self.wbuf[:sent]
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class DeviceLoop:
    """Drives many ReferenceDevices' MQTT clients on one thread with one selector.

    Each client's socket is buffered (_BufferedSocket): a ready socket is read until its
    buffer is empty, then everything the client queued (PUBACKs, requests, events) leaves in
    one write. A socket is watched for writability only while the kernel's buffer is full.
    The buffering reaches into paho's `_sock` (paho 2.x, pinned in requirements.lock); a
    single device can run on paho's own loop instead.
    """

    def __init__(self, host: str, port: int, *, reconnect_s: float = RECONNECT_S) -> None:
        self.host = host
        self.port = port
        self.reconnect_s = reconnect_s
        self.devices: list[ReferenceDevice] = []
        self._selector = selectors.DefaultSelector()
        self._retry_at: dict[int, float] = {}  # device index -> when to reconnect
        self._dirty: set[int] = set()  # devices with packets queued to write
        self._blocked: set[int] = set()  # devices watched for writability
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending: list[ReferenceDevice] = []

    def add(self, devices: Iterable[ReferenceDevice]) -> None:
        """Devices to connect (from any thread); the loop connects them."""
        with self._lock:
            self._pending.extend(devices)

    def _attach(self, device: ReferenceDevice) -> None:
        index = len(self.devices)
        self.devices.append(device)
        client = device.client
        client.on_socket_open = lambda _c, _u, sock: self._open(sock, index)
        client.on_socket_close = lambda _c, _u, sock: self._close(sock, index)
        client.on_socket_register_write = lambda _c, _u, _s: self._dirty.add(index)
        client.on_socket_unregister_write = lambda _c, _u, _s: None
        self._connect(index)

    def _open(self, sock: Any, index: int) -> None:
        client = self.devices[index].client
        if isinstance(sock, socket.socket):
            sock = _BufferedSocket(sock)
            client._sock = sock  # see the class docstring
        self._selector.register(sock, selectors.EVENT_READ, index)
        self._blocked.discard(index)
        self._dirty.add(index)  # the CONNECT packet

    def _close(self, sock: Any, index: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)
        self._blocked.discard(index)
        self._dirty.discard(index)
        # Reconnect later: housekeeping notices the client has no socket.

    def _connect(self, index: int) -> None:
        client = self.devices[index].client
        try:
            client.connect(self.host, self.port, keepalive=KEEPALIVE_S)
            self._retry_at.pop(index, None)
        except OSError:
            self._retry_at[index] = time.monotonic() + self.reconnect_s

    def start(self) -> None:
        """Run the loop on a background thread."""
        self._thread = threading.Thread(target=self.run, name="device-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop and disconnect every device."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10.0)

    def run(self) -> None:
        """Serve every device until stop()."""
        next_tick = 0.0
        while not self._stop.is_set():
            with self._lock:
                pending, self._pending = self._pending, []
            for device in pending:
                self._attach(device)
            for key, mask in self._selector.select(timeout=0.05):
                client = self.devices[key.data].client
                if mask & selectors.EVENT_READ:
                    client.loop_read()
                    sock = client.socket()
                    while isinstance(sock, _BufferedSocket) and sock.rbuf:
                        client.loop_read()
                        sock = client.socket()
                if mask & selectors.EVENT_WRITE:
                    self._dirty.add(key.data)
            self._flush()
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + 0.1
                self._housekeeping(now)
                self._flush()
        for device in self.devices:
            device.client.disconnect()
            device.client.loop_write()
            sock = device.client.socket()
            if isinstance(sock, _BufferedSocket):
                sock.flush()

    def _flush(self) -> None:
        """Write what every dirty client has queued, one send each."""
        dirty, self._dirty = self._dirty, set()
        for index in dirty:
            client = self.devices[index].client
            sock = client.socket()
            if sock is None:
                continue
            if client.want_write():
                client.loop_write()  # into the buffer
            sock = client.socket()
            if sock is None:
                continue
            blocked = isinstance(sock, _BufferedSocket) and not sock.flush()
            if blocked != (index in self._blocked):
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if blocked else 0)
                self._selector.modify(sock, events, index)
                if blocked:
                    self._blocked.add(index)
                else:
                    self._blocked.discard(index)

    def _housekeeping(self, now: float) -> None:
        for index, device in enumerate(self.devices):
            client = device.client
            if client.socket() is None:
                self._retry_at.setdefault(index, now + self.reconnect_s)
                if now >= self._retry_at[index]:
                    self._connect(index)
                continue
            if client.loop_misc() is MQTTErrorCode.MQTT_ERR_SUCCESS:
                device.tick(now)
            if client.want_write():
                self._dirty.add(index)
