"""The MQTT side every simulated or real device shares: the agent (device_agent.agent) and the
protocol reference client (device_agent.reference_client).

- `device_client`: a paho 2.x client logged in as the device (client id = username = device
  id), persistent session, the retained `offline` last will, 100 messages in flight;
- `on_connected`: after a CONNACK, subscribe to the device's topics (QoS 1) and publish the
  retained `online` presence (False when the broker refused the login);
- `dispatch`: a received message to the device's command or block handler, a bad topic or
  command logged and dropped;
- `device_event`: an event with its reason cut to the protocol's limit;
- `blocks_to_ask`: which missing blocks to ask for to keep a window of them in flight.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from device_agent import protocol as p

log = logging.getLogger(__name__)

MAX_INFLIGHT = 100
Command = p.OtaOffer | p.PersonalizeCommand | p.RollbackCommand


def device_client(device_id: str, password: str) -> mqtt.Client:
    """A client for the device (module docstring); the caller sets its callbacks."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id,
                         protocol=mqtt.MQTTv311, clean_session=False)
    client.username_pw_set(device_id, password)
    client.will_set(p.presence_topic(device_id), p.OFFLINE, qos=1, retain=True)
    client.max_inflight_messages_set(MAX_INFLIGHT)
    return client


def on_connected(client: mqtt.Client, device_id: str, reason: Any,
                 presence: bytes = p.ONLINE) -> bool:
    """Subscribe and say `online` (`presence`: b"online", or the JSON presence naming the
    device's backend) after a CONNACK; False (logged) when it refused us."""
    if reason.is_failure:
        log.warning("device %s refused by the broker: %s", device_id, reason)
        return False
    client.subscribe([(topic, 1) for topic in p.device_subscriptions(device_id)])
    client.publish(p.presence_topic(device_id), presence, qos=1, retain=True)
    return True


def dispatch(device_id: str, msg: mqtt.MQTTMessage, on_command: Callable[[Command], None],
             on_block: Callable[[str, bytes], None]) -> None:
    """Hand a received message to the command or block handler; log what is not one."""
    try:
        topic = p.parse_topic(msg.topic)
    except p.ProtocolError as exc:
        log.warning("device %s ignores a message: %s", device_id, exc)
        return
    if topic.channel is p.Channel.CMD:
        try:
            command = p.decode_command(bytes(msg.payload))
        except p.ProtocolError as exc:
            log.warning("device %s ignores a command: %s", device_id, exc)
            return
        on_command(command)
    elif topic.channel is p.Channel.BLK and topic.update_id is not None:
        on_block(topic.update_id, bytes(msg.payload))


def device_event(update_id: str | None, state: p.UpdateState, *, progress: float | None = None,
                 reason: str | None = None, slot: int | None = None) -> p.DeviceEvent:
    """An event stamped now, its reason cut to the protocol's limit."""
    return p.DeviceEvent(update_id=update_id, state=state, progress=progress,
                         reason=None if reason is None else reason[:p.MAX_REASON_CHARS],
                         slot=slot, time=time.time())


def blocks_to_ask(block_count: int, held: Collection[int], outstanding: Collection[int],
                  window: int) -> list[int]:
    """The first missing blocks not yet asked for, up to `window` in flight; none while more
    than half the window is still outstanding (ask in batches, not one block at a time)."""
    if len(outstanding) > window // 2:
        return []
    room = window - len(outstanding)
    wanted: list[int] = []
    for i in range(block_count):
        if i not in held and i not in outstanding:
            wanted.append(i)
            if len(wanted) == room:
                break
    return wanted
