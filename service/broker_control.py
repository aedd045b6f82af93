"""A client for Mosquitto's dynamic-security plugin: commands over `$CONTROL/dynamic-security/v1`.

One `DynsecSession` is one MQTT connection as the broker-admin account; `run` publishes a
batch of commands in one message and returns the plugin's per-command answers. The plugin
applies a message's commands in order, in the broker's single thread, so a batch is atomic
with respect to every other client.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from service.broker_files import CONTROL_TOPIC, RESPONSE_TOPIC, SOCKET_FILE

log = logging.getLogger(__name__)

TIMEOUT_S = 10.0


class BrokerControlError(Exception):
    """A dynamic-security command could not be delivered or was not answered."""


class BrokerUnreachable(BrokerControlError):
    """Nothing accepts MQTT connections where the broker should be."""


class BrokerRefused(BrokerControlError):
    """The broker refused the broker-admin login: it does not use our files (or lost them)."""


@dataclass(frozen=True)
class BrokerEndpoint:
    """Where the service's own clients reach the broker: its Unix socket, else host:port."""

    host: str
    port: int
    unix_path: Path | None = None

    @classmethod
    def for_broker_dir(cls, broker_dir: Path, host: str, port: int) -> BrokerEndpoint:
        """The socket in `broker_dir` when the broker made one, else TCP."""
        path = Path(broker_dir) / SOCKET_FILE
        try:
            is_socket = path.is_socket()
        except OSError:  # a folder we may not enter (Mosquitto's, as another user)
            is_socket = False
        return cls(host, port, path if is_socket else None)

    def __str__(self) -> str:
        return str(self.unix_path) if self.unix_path else f"{self.host}:{self.port}"

    def client(self, client_id: str) -> mqtt.Client:
        """A paho client (MQTT 3.1.1) for this endpoint, not yet connected."""
        if self.unix_path:
            return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                               protocol=mqtt.MQTTv311, transport="unix")
        return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                           protocol=mqtt.MQTTv311)

    def connect(self, client: mqtt.Client, keepalive_s: int = 30) -> None:
        """Connect `client` here (OSError when nothing listens)."""
        if self.unix_path:
            client.connect(str(self.unix_path), keepalive=keepalive_s)
        else:
            client.connect(self.host, self.port, keepalive=keepalive_s)


# MQTT 3.1.1 CONNACK return codes (spec 3.2.2.3).
CONNACK_ACCEPTED = 0
CONNACK_BAD_CREDENTIALS = 4
CONNACK_NOT_AUTHORIZED = 5


def _mqtt_string(text: bytes) -> bytes:
    return struct.pack("!H", len(text)) + text


def remaining_length(n: int) -> bytes:
    """MQTT's variable-length integer (spec 2.2.3): 7 bits a byte, high bit = more follows."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt_connack(endpoint: BrokerEndpoint, credentials: tuple[str, str] | None = None,
                 timeout_s: float = 2.0) -> int:
    """Send one MQTT 3.1.1 CONNECT (with `credentials` if given); the broker's CONNACK code.

    A bare socket, not paho: paho retries a refused login on its own and needs a thread.
    """
    # A fresh client id: two probes with one id would make the broker drop the older one.
    client_id = f"tinyfleet-probe-{os.urandom(4).hex()}".encode()
    flags = 0x02  # clean session
    payload = _mqtt_string(client_id)
    if credentials is not None:
        flags |= 0xC0  # user name and password present
        payload += _mqtt_string(credentials[0].encode()) + _mqtt_string(credentials[1].encode())
    body = b"\x00\x04MQTT" + bytes([4, flags]) + struct.pack("!H", 10) + payload
    packet = b"\x10" + remaining_length(len(body)) + body
    with _open_socket(endpoint, timeout_s) as sock:
        sock.sendall(packet)
        reply = b""
        while len(reply) < 4:
            chunk = sock.recv(4 - len(reply))
            if not chunk:
                raise ConnectionError(f"MQTT broker {endpoint} closed without a CONNACK")
            reply += chunk
        if reply[0] != 0x20 or reply[1] != 2:
            raise ConnectionError(f"MQTT broker {endpoint} sent {reply!r}, not a CONNACK")
        if reply[3] == CONNACK_ACCEPTED:
            sock.sendall(b"\xe0\x00")  # DISCONNECT
        return reply[3]


def _open_socket(endpoint: BrokerEndpoint, timeout_s: float) -> socket.socket:
    if endpoint.unix_path is None:
        return socket.create_connection((endpoint.host, endpoint.port), timeout=timeout_s)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(str(endpoint.unix_path))
    except BaseException:
        sock.close()
        raise
    return sock


class DynsecSession:
    """One connection as the broker-admin account, subscribed to the plugin's answers."""

    def __init__(self, endpoint: BrokerEndpoint, username: str, password: str,
                 timeout_s: float = TIMEOUT_S) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._answered = threading.Condition(self._lock)
        self._answers: dict[str, dict[str, Any]] = {}
        self._connack: ReasonCode | None = None
        self._client = endpoint.client(f"tinyfleet-admin-{secrets.token_hex(4)}")
        self._client.username_pw_set(username, password)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *_args: self._subscribed.set()
        self._client.on_message = self._on_message
        try:
            endpoint.connect(self._client)
        except OSError as exc:
            raise BrokerUnreachable(f"MQTT broker at {endpoint}: {exc}") from exc
        self._client.loop_start()
        try:
            self._handshake(username)
        except BaseException:
            self.close()
            raise

    def _handshake(self, username: str) -> None:
        if not self._connected.wait(self.timeout_s):
            raise BrokerUnreachable(f"no CONNACK from the MQTT broker at {self.endpoint} "
                                    f"within {self.timeout_s:.0f} s")
        assert self._connack is not None
        if self._connack.is_failure:
            raise BrokerRefused(f"the MQTT broker at {self.endpoint} refused {username!r} "
                                f"({self._connack})")
        self._client.subscribe(RESPONSE_TOPIC, qos=0)
        if not self._subscribed.wait(self.timeout_s):
            raise BrokerControlError(f"no SUBACK for {RESPONSE_TOPIC} from {self.endpoint}")

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self._connack = reason
        self._connected.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            responses = json.loads(msg.payload)["responses"]
        except (ValueError, KeyError, TypeError):
            log.warning("dynamic-security answer is not JSON with responses: %r",
                        bytes(msg.payload[:200]))
            return
        with self._lock:
            for answer in responses:
                key = answer.get("correlationData") if isinstance(answer, dict) else None
                if isinstance(key, str):
                    self._answers[key] = answer
            self._answered.notify_all()

    def run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send `commands` in one message; the plugin's answer to each, in order.

        An answer is `{"command": ..., "error": "..."}` when that command failed (the others
        still ran) and may carry `data`.
        """
        if not commands:
            return []
        batch = secrets.token_hex(6)
        keys = [f"{batch}-{i}" for i in range(len(commands))]
        payload = json.dumps({"commands": [dict(c, correlationData=k)
                                           for c, k in zip(commands, keys, strict=True)]})
        info = self._client.publish(CONTROL_TOPIC, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerControlError(f"publishing to {CONTROL_TOPIC} failed: "
                                     f"{mqtt.error_string(info.rc)}")
        # The plugin rewrites its file after each changing command: allow time per command.
        timeout_s = self.timeout_s + 0.1 * len(commands)
        with self._lock:
            done = self._answered.wait_for(lambda: all(k in self._answers for k in keys),
                                           timeout_s)
            if not done:
                missing = sum(k not in self._answers for k in keys)
                raise BrokerControlError(
                    f"the dynamic-security plugin at {self.endpoint} answered "
                    f"{len(keys) - missing} of {len(keys)} commands within "
                    f"{timeout_s:.0f} s (is the plugin loaded?)")
            return [self._answers.pop(k) for k in keys]

    def close(self) -> None:
        """Disconnect, then stop the network thread (paho 2.x order)."""
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> DynsecSession:
        return self

    def __exit__(self, _t: type[BaseException] | None, _e: BaseException | None,
                 _tb: TracebackType | None) -> None:
        self.close()
