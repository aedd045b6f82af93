"""A small paho-mqtt 2.x client for tests: connect, subscribe, publish, collect messages."""

from __future__ import annotations

import queue
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Message:
    """One received message."""

    topic: str
    payload: bytes


class MqttProbe:
    """A connected (or refused) MQTT client whose received messages land in a queue."""

    def __init__(self, host: str, port: int, username: str, password: str) -> None:
        self.messages: queue.Queue[Message] = queue.Queue()
        self.connack: ReasonCode | None = None
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2,
                                  client_id=f"probe-{username}-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311)
        self.client.username_pw_set(username, password)
        # paho retries a refused CONNECT after reconnect_delay; closing waits for that sleep.
        self.client.reconnect_delay_set(min_delay=0.05, max_delay=0.05)  # type: ignore[arg-type]
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(TIMEOUT_S):
            self.close()
            raise TimeoutError(f"no CONNACK from {host}:{port} within {TIMEOUT_S} s")
        if self.connack is not None and self.connack.is_failure:
            # paho would retry a refused connection forever: stop it here.
            self.close()

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: ReasonCode, _p: Any) -> None:
        self.connack = reason
        self._connected.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(Message(msg.topic, bytes(msg.payload)))

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, _codes: Any, _p: Any) -> None:
        self._subscribed.set()

    @property
    def accepted(self) -> bool:
        """Whether the broker accepted the connection."""
        return self.connack is not None and not self.connack.is_failure

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe and wait for the SUBACK (Mosquitto acks even a subscribe its ACL denies)."""
        self._subscribed.clear()
        self.client.subscribe(topic, qos)
        if not self._subscribed.wait(TIMEOUT_S):
            raise TimeoutError(f"no SUBACK for {topic} within {TIMEOUT_S} s")

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Publish and wait until the broker acknowledged it (PUBACK for QoS 1)."""
        info = self.client.publish(topic, payload, qos)
        info.wait_for_publish(TIMEOUT_S)

    def next_message(self, timeout_s: float = TIMEOUT_S) -> Message | None:
        """The next message received within `timeout_s`, or None."""
        try:
            return self.messages.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def close(self) -> None:
        """Disconnect, then stop the network thread (paho 2.x order)."""
        self.client.disconnect()
        self.client.loop_stop()


def connack(host: str, port: int, username: str, password: str) -> ReasonCode | None:
    """The broker's answer to one CONNECT with these credentials."""
    probe = MqttProbe(host, port, username, password)
    code = probe.connack
    probe.close()
    return code
