"""The MQTT bridge: serves OTA blocks to devices and passes their valid messages to a sink.

One process (`python -m workers.bridge`, or under `tinyfleet up`) holds one connection as the
service account and:

- serves blocks on `.../ota/{update}/req`: exactly the blocks the device asks for (so a
  device resumes by asking for what it lacks), each in a block frame with its CRC-32, from
  the artifact the sink names for that update; an artifact's frames are built once and
  cached, since they are the same bytes for every device, and written at QoS 1 on a second
  connection of raw MQTT packets (workers/block_publisher.py), one write per request;
- validates every device message (evt, metrics, presence, req) with device_agent.protocol;
  a rejected one is logged (device, channel, reason) and counted, and never reaches the sink;
- hands valid events, metrics and presence to a `BridgeSink`, in arrival order, on one
  thread of its own (never the network thread), the events that queued up meanwhile as one
  batch (`on_events`: the database sink's one transaction); a message is acknowledged to
  the broker only once the sink has taken it, so a bridge that dies holding one gets it
  again (persistent session, QoS 1);
- when a device comes online, re-sends the sink's pending commands for it.

`CommandPublisher` is the other direction: a long-lived, per-process connection that sends
cmd messages (QoS 1), for the Celery `offer` task and the service's rollback/personalize.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import queue
import signal
import socket
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from prometheus_client import CollectorRegistry, Counter, start_http_server

from device_agent import protocol as p
from service.broker_control import BrokerEndpoint
from service.broker_files import service_password
from service.config import load_config
from workers.artifacts import ArtifactError, ArtifactStore
from workers.block_publisher import BlockPublisher

log = logging.getLogger(__name__)

BRIDGE_CLIENT_ID = "tinyfleet-bridge"
CONNECT_TIMEOUT_S = 10.0
FRAME_CACHE_BYTES = 256 * 1024 * 1024
ASSIGNMENT_CACHE = 100_000  # (device, update) -> artifact entries kept
# QoS 1 publishes in flight to the broker: 0 is no limit. With any limit paho walks all of
# its queued messages on every PUBACK (O(n) each, 60 % of the bridge's CPU in
# bench/ota_delivery.py at 1,000 devices); the broker acknowledges as fast as it reads, so
# what is in flight stays near a socket buffer's worth.
INFLIGHT = 0
# Blocks one device may be served for one update, as a multiple of the image's block count:
# resuming after drops, CRC failures and reconnects stays far below it; a device that asks
# for the image again and again (amplifying its small requests) is refused past it.
SERVE_BUDGET = 4
# Device messages the sink thread takes from its queue at once: a run of events among them
# is one sink call (the database sink: one transaction), which is what lets the sink keep
# up with a thousand devices' events; bounded so a transaction stays short.
SINK_BATCH = 256

CommandMessage = p.OtaOffer | p.PersonalizeCommand | p.RollbackCommand


class BridgeSink(Protocol):
    """What the bridge hands valid device messages to (campaigns: the job state machine)."""

    def on_event(self, device_id: str, event: p.DeviceEvent) -> None:
        """A device reported a state change of an update. A sink may also have
        `on_events(events)`: a run of events in arrival order, applied together (all or
        none); the bridge calls it for the events that queued up while the last call ran."""

    def on_presence(self, device_id: str, online: bool, backend: str | None = None) -> None:
        """A device came online, or went offline (its last will, or a clean goodbye);
        `backend`: the images it runs when it said ("qemu", "host-x86_64"), else None."""

    def on_metrics(self, device_id: str, report: p.MetricsReport) -> None:
        """A device reported the numbers of a personalization round."""

    def artifact_for(self, device_id: str, update_id: str) -> str | None:
        """The sha256 of the artifact to serve for this device's update; None: none."""

    def pending_commands(self, device_id: str) -> Sequence[CommandMessage]:
        """Commands to (re)send to a device that just came online."""


class LogSink:
    """A sink that only logs: no update is known, nothing is pending (the bridge alone)."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        self.config = config

    def on_event(self, device_id: str, event: p.DeviceEvent) -> None:
        log.info("event device=%s update=%s state=%s", device_id, event.update_id,
                 event.state.value)

    def on_presence(self, device_id: str, online: bool, backend: str | None = None) -> None:
        log.info("presence device=%s online=%s backend=%s", device_id, online, backend)

    def on_metrics(self, device_id: str, report: p.MetricsReport) -> None:
        log.info("metrics device=%s round=%d", device_id, report.round)

    def artifact_for(self, device_id: str, update_id: str) -> str | None:
        return None

    def pending_commands(self, device_id: str) -> Sequence[CommandMessage]:
        return ()


class RejectKind:
    """Why a device message was dropped (a bounded label set for the counters)."""

    TOPIC = "topic"  # not a topic of the protocol
    TOO_LARGE = "too_large"  # over the channel's byte cap
    INVALID = "invalid"  # failed its schema
    UNKNOWN_UPDATE = "unknown_update"  # a block request for an update with no artifact
    OVER_BUDGET = "over_budget"  # a device asked for more than SERVE_BUDGET images' blocks


class BridgeMetrics:
    """The bridge's counters, in a prometheus-client registry of its own (export it with
    `prometheus_client.start_http_server(port, registry=metrics.registry)`)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.received = Counter("tinyfleet_bridge_messages", "Device messages received",
                                ["channel"], registry=self.registry)
        self.rejected = Counter("tinyfleet_bridge_rejected",
                                "Device messages rejected (logged, never passed on)",
                                ["channel", "kind"], registry=self.registry)
        self.blocks_sent = Counter("tinyfleet_bridge_blocks_sent", "Block frames published",
                                   registry=self.registry)
        self.blocks_dropped = Counter("tinyfleet_bridge_blocks_dropped",
                                      "Block frames not written: the broker was unreachable "
                                      "(the device asks again)", registry=self.registry)
        self.commands_sent = Counter("tinyfleet_bridge_commands_sent",
                                     "Pending commands re-sent on presence",
                                     registry=self.registry)
        self.sink_errors = Counter("tinyfleet_bridge_sink_errors", "Sink calls that raised",
                                   ["callback"], registry=self.registry)

    def value(self, name: str, **labels: str) -> float:
        """A counter's current value (0 when that label set never counted)."""
        found = self.registry.get_sample_value(f"{name}_total", labels)
        return 0.0 if found is None else found

    def rejections(self, channel: str | None = None) -> float:
        """Rejected messages so far, of one channel or all."""
        total = 0.0
        for family in self.registry.collect():
            if family.name != "tinyfleet_bridge_rejected":
                continue
            for sample in family.samples:
                if sample.name.endswith("_total") and (
                        channel is None or sample.labels["channel"] == channel):
                    total += sample.value
        return total


@dataclass(frozen=True)
class BrokerLogin:
    """Where and as whom the service's clients connect."""

    endpoint: BrokerEndpoint
    username: str
    password: str

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> BrokerLogin:
        """The service account on the configured broker (its Unix socket when there is one)."""
        from service.broker_files import SERVICE_USERNAME

        broker_dir = Path(str(config["BROKER_DIR"]))
        return cls(BrokerEndpoint.for_broker_dir(broker_dir, str(config["MQTT_HOST"]),
                                                 int(config["MQTT_PORT"])),
                   SERVICE_USERNAME, service_password(broker_dir))

    def client(self, client_id: str, clean_session: bool = True) -> mqtt.Client:
        """A paho client for this login (not yet connected)."""
        endpoint = self.endpoint
        transport = "unix" if endpoint.unix_path else "tcp"
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=mqtt.MQTTv311, transport=transport,  # type: ignore[arg-type]
                             clean_session=clean_session)
        client.username_pw_set(self.username, self.password)
        client.max_inflight_messages_set(INFLIGHT)
        client.max_queued_messages_set(0)  # unbounded: the caller paces itself
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        return client


class _FrameCache:
    """Block frames per (artifact, block size), built once, least recently used evicted."""

    def __init__(self, store: ArtifactStore, max_bytes: int) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.bytes = 0
        self._frames: OrderedDict[tuple[str, int], list[bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def frames(self, sha256: str, block_size: int) -> list[bytes]:
        key = (sha256, block_size)
        with self._lock:
            found = self._frames.get(key)
            if found is not None:
                self._frames.move_to_end(key)
                return found
        data = self.store.read(sha256)  # checks the bytes still hash to their name
        tag = p.image_tag(sha256)
        total = -(-len(data) // block_size)
        frames = [p.encode_block(tag, i, total, data[i * block_size:(i + 1) * block_size])
                  for i in range(total)]
        with self._lock:
            self._frames[key] = frames
            self.bytes += sum(map(len, frames))
            while self.bytes > self.max_bytes and len(self._frames) > 1:
                _, old = self._frames.popitem(last=False)
                self.bytes -= sum(map(len, old))
        return frames


@dataclass
class _Delivery:
    """A valid device message waiting for the sink; acknowledged once the sink took it."""

    device_id: str
    channel: p.Channel
    message: p.DeviceEvent | p.MetricsReport | p.Presence
    mid: int
    qos: int


class Bridge:
    """The bridge process's core: one MQTT connection, the block server and the sink thread."""

    def __init__(self, sink: BridgeSink, store: ArtifactStore, login: BrokerLogin, *,
                 block_size: int = p.DEFAULT_BLOCK_SIZE, client_id: str = BRIDGE_CLIENT_ID,
                 metrics: BridgeMetrics | None = None,
                 frame_cache_bytes: int = FRAME_CACHE_BYTES) -> None:
        self.sink = sink
        self.store = store
        self.login = login
        self.block_size = block_size
        self.metrics = metrics or BridgeMetrics()
        self.frames = _FrameCache(store, frame_cache_bytes)
        self._assigned: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._served: dict[tuple[str, str], int] = {}  # blocks served per (device, update)
        self._inbox: queue.Queue[_Delivery | None] = queue.Queue()
        self._subscribed = threading.Event()
        self._stopping = threading.Event()
        self.failure: BaseException | None = None
        # A persistent session: device messages that arrive while the bridge is down wait
        # for it at the broker (QoS 1), and so does one the sink had not taken yet.
        self.client = login.client(client_id, clean_session=False)
        self.client.manual_ack_set(True)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.blocks = BlockPublisher(login.endpoint, f"{client_id}-blocks", login.username,
                                     login.password, self.metrics.blocks_dropped.inc)
        self._sink_thread = threading.Thread(target=self._sink_loop, name="bridge-sink",
                                             daemon=True)

    # --- life cycle ---------------------------------------------------------------------

    def start(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Connect, subscribe and serve on background threads; returns once subscribed."""
        self._sink_thread.start()
        self.login.endpoint.connect(self.client)
        self.client.loop_start()
        if not self._subscribed.wait(timeout_s):
            self.stop()
            raise TimeoutError(f"the bridge got no SUBACK from {self.login.endpoint} within "
                               f"{timeout_s} s")

    def run_forever(self) -> None:
        """Serve in this thread until stop() or a sink failure (which is then raised)."""
        self._sink_thread.start()
        self.login.endpoint.connect(self.client)
        self.client.loop_forever(retry_first_connection=True)
        if self.failure is not None:
            raise self.failure

    def stop(self) -> None:
        """Disconnect and stop both threads."""
        self._stopping.set()
        self.client.disconnect()
        self.client.loop_stop()
        self._inbox.put(None)
        if self._sink_thread.is_alive():
            self._sink_thread.join(10.0)
        self.blocks.close()

    # --- MQTT callbacks (network thread) ------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("broker %s refused the bridge: %s", self.login.endpoint, reason)
            return
        log.info("bridge connected to %s", self.login.endpoint)
        client.subscribe([(topic, 1) for topic in p.DEVICE_TO_SERVER])

    def _on_subscribe(self, *_args: Any) -> None:
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._handle(client, msg)
        except Exception:
            # Not acknowledged: the broker gives it again after a reconnect. paho re-raises,
            # which ends this connection's loop (and `run_forever`, so the supervisor
            # restarts the bridge).
            log.exception("the bridge failed on a message on %s", msg.topic)
            raise

    def _handle(self, client: mqtt.Client, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = p.parse_topic(msg.topic)
        except (p.ProtocolError, UnicodeDecodeError) as exc:
            self._reject(None, "unknown", RejectKind.TOPIC, str(exc))
            client.ack(msg.mid, msg.qos)
            return
        channel = topic.channel
        self.metrics.received.labels(channel.value).inc()
        payload = bytes(msg.payload)
        try:
            if channel is p.Channel.REQ:
                assert topic.update_id is not None
                self._serve(topic.device_id, topic.update_id, payload)
                client.ack(msg.mid, msg.qos)
                return
            message: p.DeviceEvent | p.MetricsReport | p.Presence
            if channel is p.Channel.EVT:
                message = p.decode_event(payload)
            elif channel is p.Channel.METRICS:
                message = p.decode_metrics(payload)
            elif channel is p.Channel.PRESENCE:
                message = p.decode_presence_message(payload)
            else:  # cmd/blk are ours: echoes of our own publishes are not subscribed to
                raise p.ProtocolError(f"devices do not publish on {channel.value}")
        except p.ProtocolError as exc:
            kind = RejectKind.TOO_LARGE if "-byte cap" in str(exc) else RejectKind.INVALID
            self._reject(topic.device_id, channel.value, kind, str(exc))
            client.ack(msg.mid, msg.qos)
            return
        self._inbox.put(_Delivery(topic.device_id, channel, message, msg.mid, msg.qos))

    def _reject(self, device_id: str | None, channel: str, kind: str, reason: str) -> None:
        self.metrics.rejected.labels(channel, kind).inc()
        log.warning("rejected device=%s channel=%s kind=%s reason=%s", device_id, channel, kind,
                    reason, extra={"device_id": device_id, "channel": channel,
                                   "reject_kind": kind, "reason": reason})

    # --- blocks ---------------------------------------------------------------------------

    def _artifact(self, device_id: str, update_id: str) -> str | None:
        key = (device_id, update_id)
        found = self._assigned.get(key)
        if found is not None:
            return found
        sha256 = self.sink.artifact_for(device_id, update_id)
        if sha256 is not None:  # an update's artifact never changes: remember it
            self._assigned[key] = sha256
            if len(self._assigned) > ASSIGNMENT_CACHE:
                old, _ = self._assigned.popitem(last=False)
                self._served.pop(old, None)
        return sha256

    def _serve(self, device_id: str, update_id: str, payload: bytes) -> None:
        request = p.decode_block_request(payload)
        sha256 = self._artifact(device_id, update_id)
        if sha256 is None:
            self._reject(device_id, "req", RejectKind.UNKNOWN_UPDATE,
                         f"no artifact for update {update_id}")
            return
        try:
            frames = self.frames.frames(sha256, self.block_size)
        except ArtifactError as exc:
            self._reject(device_id, "req", RejectKind.UNKNOWN_UPDATE, str(exc))
            return
        indices = request.indices(len(frames))
        key = (device_id, update_id)
        served = self._served.get(key, 0) + len(indices)
        if served > SERVE_BUDGET * len(frames):
            self._reject(device_id, "req", RejectKind.OVER_BUDGET,
                         f"update {update_id}: {served} blocks asked in all, over "
                         f"{SERVE_BUDGET} x the image's {len(frames)}")
            return
        self._served[key] = served
        self.blocks.send(p.blk_topic(device_id, update_id), [frames[i] for i in indices])
        self.metrics.blocks_sent.inc(len(indices))

    # --- the sink (its own thread) --------------------------------------------------------

    def _sink_loop(self) -> None:
        while True:
            item = self._inbox.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < SINK_BATCH:  # what queued up meanwhile, without waiting
                try:
                    queued = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if queued is None:
                    self._inbox.put(None)  # stop after this batch
                    break
                batch.append(queued)
            for group in _runs(batch):
                try:
                    self._deliver(group)
                except BaseException as exc:
                    # Not acknowledged: the broker gives it to the next bridge. Stop this one.
                    self.metrics.sink_errors.labels(group[0].channel.value).inc()
                    log.exception("sink failed on %s from device %s; the bridge stops",
                                  group[0].channel.value, group[0].device_id)
                    self.failure = exc
                    self._stopping.set()
                    self.client.disconnect()
                    return

    def _ack(self, items: Sequence[_Delivery]) -> None:
        for item in items:  # each acknowledged only once the sink took it
            self.client.ack(item.mid, item.qos)

    def _deliver(self, group: list[_Delivery]) -> None:
        """Hand one group to the sink and acknowledge what it took."""
        item = group[0]
        if item.channel is p.Channel.EVT:
            on_events = getattr(self.sink, "on_events", None)
            if on_events is not None:
                try:
                    on_events([(d.device_id, d.message) for d in group])
                except Exception:
                    if len(group) == 1:
                        raise
                    # The run's one transaction failed and applied nothing: one at a time,
                    # so every good event lands and the bridge stops on the bad one.
                    log.exception("sink failed on a run of %d events; applying them one by "
                                  "one", len(group))
                else:
                    self._ack(group)
                    return
            for one in group:
                assert isinstance(one.message, p.DeviceEvent)
                self.sink.on_event(one.device_id, one.message)
                self._ack([one])
        elif item.channel is p.Channel.METRICS:
            assert isinstance(item.message, p.MetricsReport)
            self.sink.on_metrics(item.device_id, item.message)
            self._ack(group)
        else:
            assert isinstance(item.message, p.Presence)
            online = item.message.online
            self.sink.on_presence(item.device_id, online, item.message.backend)
            if online:
                for command in self.sink.pending_commands(item.device_id):
                    self.client.publish(p.cmd_topic(item.device_id), p.encode(command), 1)
                    self.metrics.commands_sent.inc()
            self._ack(group)


def _runs(batch: list[_Delivery]) -> list[list[_Delivery]]:
    """The batch cut into groups, in arrival order: each run of consecutive events is one
    group (one sink call, one transaction), any other message a group of its own."""
    groups: list[list[_Delivery]] = []
    for item in batch:
        if item.channel is p.Channel.EVT and groups and groups[-1][0].channel is p.Channel.EVT:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


class CommandPublisher:
    """A long-lived connection that publishes cmd messages at QoS 1 (one per process)."""

    _shared: ClassVar[dict[tuple[int, str], CommandPublisher]] = {}
    _shared_lock = threading.Lock()

    def __init__(self, login: BrokerLogin) -> None:
        self.login = login
        self._connected = threading.Event()
        self.client = login.client(
            f"tinyfleet-cmd-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_a: self._connected.clear()
        login.endpoint.connect(self.client)
        self.client.loop_start()
        if not self._connected.wait(CONNECT_TIMEOUT_S):
            self.close()
            raise TimeoutError(f"no CONNACK from {login.endpoint} within {CONNECT_TIMEOUT_S} s")

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("broker %s refused the command publisher: %s", self.login.endpoint,
                      reason)
            return
        self._connected.set()

    @classmethod
    def for_process(cls, config: Mapping[str, Any] | None = None) -> CommandPublisher:
        """This process's publisher for the configured broker (made on first use; a forked
        child, such as a Celery pool process, gets its own)."""
        login = BrokerLogin.from_config(config or load_config())
        key = (os.getpid(), str(login.endpoint))
        with cls._shared_lock:
            found = cls._shared.get(key)
            if found is None:
                found = cls._shared[key] = cls(login)
            return found

    def publish(self, device_id: str, command: CommandMessage,
                timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Send one command and wait for the broker's PUBACK."""
        self.publish_many([(device_id, command)], timeout_s)

    def publish_many(self, commands: Iterable[tuple[str, CommandMessage]],
                     timeout_s: float = CONNECT_TIMEOUT_S) -> int:
        """Send commands (QoS 1), then wait until the broker acknowledged all; their number."""
        infos = []
        for device_id, command in commands:
            info = self.client.publish(p.cmd_topic(device_id), p.encode(command), 1)
            if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
                raise ConnectionError(f"publishing to {device_id} failed: {info.rc!s}")
            infos.append(info)
        deadline = time.monotonic() + timeout_s
        for info in infos:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                raise TimeoutError(f"the broker did not acknowledge a command within "
                                   f"{timeout_s} s")
        return len(infos)

    def close(self) -> None:
        """Disconnect (paho 2.x order: disconnect, then stop the loop)."""
        self.client.disconnect()
        self.client.loop_stop()


# --- the process ---------------------------------------------------------------------------


def load_sink(spec: str, config: Mapping[str, Any]) -> BridgeSink:
    """`module:callable` -> callable(config), the sink the bridge hands messages to."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"sink {spec!r} is not MODULE:CALLABLE")
    factory: Callable[[Mapping[str, Any]], BridgeSink] = getattr(
        importlib.import_module(module_name), attr)
    return factory(config)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m workers.bridge`: run the bridge with the TINYFLEET_* settings."""
    parser = argparse.ArgumentParser(prog="python -m workers.bridge", description=__doc__.split(
        "\n")[0])
    parser.add_argument("--sink", default=os.environ.get("TINYFLEET_BRIDGE_SINK",
                                                         "workers.bridge:LogSink"),
                        help="MODULE:CALLABLE taking the settings, returning the BridgeSink "
                             "(default: $TINYFLEET_BRIDGE_SINK, else one that only logs)")
    parser.add_argument("--client-id", default=BRIDGE_CLIENT_ID,
                        help="MQTT client id (its persistent session): one per bridge")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = load_config()
    bridge = Bridge(load_sink(args.sink, config), ArtifactStore.from_config(config),
                    BrokerLogin.from_config(config), block_size=int(config["OTA_BLOCK_SIZE"]),
                    client_id=args.client_id)
    if config["BRIDGE_METRICS_PORT"]:
        start_http_server(int(config["BRIDGE_METRICS_PORT"]), addr="127.0.0.1",
                          registry=bridge.metrics.registry)
    signal.signal(signal.SIGTERM, lambda *_a: bridge.client.disconnect())
    log.info("bridge serving artifacts from %s, blocks of %d bytes", bridge.store.root,
             bridge.block_size)
    try:
        bridge.run_forever()
    except KeyboardInterrupt:
        bridge.client.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
