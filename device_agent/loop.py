"""Drive the MQTT clients of one or many agents on one thread: reconnects with back-off.

One selector watches every client's socket (paho's external-loop callbacks), as the
reference client's DeviceLoop does; what the agent adds is a reconnect delay that doubles
from `reconnect_min_s` to `reconnect_max_s` with full jitter (so that a fleet that lost its
broker does not come back in one wave), and a clean stop: each agent publishes its retained
`offline` presence and disconnects, so the broker does not fire its last will.
"""

from __future__ import annotations

import contextlib
import random
import selectors
import threading
import time
from collections.abc import Iterable
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

KEEPALIVE_S = 30


class LoopAgent(Protocol):
    """What the loop needs of an agent."""

    client: mqtt.Client

    def tick(self, now: float) -> None:
        """Timers and queued messages (called on the loop thread)."""

    def close(self) -> None:
        """Publish `offline`, disconnect, wait for running work."""


class AgentLoop:
    """Serves agents until stop() (module docstring)."""

    def __init__(self, host: str, port: int, *, reconnect_min_s: float = 0.5,
                 reconnect_max_s: float = 30.0, seed: int | None = None) -> None:
        self.host = host
        self.port = port
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.agents: list[LoopAgent] = []
        self.rng = random.Random(seed)
        self._selector = selectors.DefaultSelector()
        self._retry_at: dict[int, float] = {}
        self._failures: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending: list[LoopAgent] = []

    def add(self, agents: Iterable[LoopAgent]) -> None:
        """Agents to connect (from any thread)."""
        with self._lock:
            self._pending.extend(agents)

    def backoff_s(self, failures: int) -> float:
        """Delay before reconnect attempt `failures` (1, 2, ...): full jitter, capped."""
        cap = min(self.reconnect_max_s, self.reconnect_min_s * 2 ** max(failures - 1, 0))
        return self.rng.uniform(self.reconnect_min_s / 2, cap)

    def _attach(self, agent: LoopAgent) -> None:
        index = len(self.agents)
        self.agents.append(agent)
        client = agent.client
        client.on_socket_open = lambda _c, _u, sock: self._watch(sock, index, False)
        client.on_socket_close = lambda _c, _u, sock: self._unwatch(sock)
        client.on_socket_register_write = lambda _c, _u, sock: self._watch(sock, index, True)
        client.on_socket_unregister_write = lambda _c, _u, sock: self._watch(sock, index, False)
        self._connect(index)

    def _watch(self, sock: Any, index: int, write: bool) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        try:
            self._selector.modify(sock, events, index)
        except KeyError:
            self._selector.register(sock, events, index)

    def _unwatch(self, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(sock)

    def _connect(self, index: int) -> None:
        client = self.agents[index].client
        try:
            client.connect(self.host, self.port, keepalive=KEEPALIVE_S)
            self._retry_at.pop(index, None)
        except OSError:
            failures = self._failures.get(index, 0) + 1
            self._failures[index] = failures
            self._retry_at[index] = time.monotonic() + self.backoff_s(failures)

    def connected(self, index: int) -> None:
        """An agent's CONNACK arrived: its back-off starts again from the minimum."""
        self._failures.pop(index, None)

    def start(self) -> None:
        """Run on a background thread."""
        self._thread = threading.Thread(target=self.run, name="agent-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving; every agent says offline and disconnects (see run)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30.0)

    def run(self) -> None:
        """Serve every agent until stop()."""
        next_tick = 0.0
        while not self._stop.is_set():
            with self._lock:
                pending, self._pending = self._pending, []
            for agent in pending:
                self._attach(agent)
            for key, mask in self._selector.select(timeout=0.05):
                client = self.agents[key.data].client
                if mask & selectors.EVENT_READ:
                    client.loop_read()
                if mask & selectors.EVENT_WRITE and client.socket() is not None:
                    client.loop_write()
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + 0.05
                self._housekeeping(now)
        for agent in self.agents:
            agent.close()
            deadline = time.monotonic() + 2.0
            client = agent.client
            while client.socket() is not None and client.want_write() \
                    and time.monotonic() < deadline:
                client.loop_write()
            client.disconnect()
            with contextlib.suppress(Exception):
                client.loop_write()

    def _housekeeping(self, now: float) -> None:
        for index, agent in enumerate(self.agents):
            client = agent.client
            if client.socket() is None:
                if index not in self._retry_at:
                    failures = self._failures.get(index, 0) + 1
                    self._failures[index] = failures
                    self._retry_at[index] = now + self.backoff_s(failures)
                if now >= self._retry_at[index]:
                    self._connect(index)
                continue
            if client.is_connected():
                self._failures.pop(index, None)
            if client.loop_misc() is MQTTErrorCode.MQTT_ERR_SUCCESS:
                agent.tick(now)
                if client.want_write():
                    self._watch(client.socket(), index, True)
