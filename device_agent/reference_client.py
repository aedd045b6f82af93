"""The protocol reference client: a simulated device that takes an OTA update end to end.

It does what device_agent.protocol asks of a device, and nothing a real agent adds (no
inference, no training): on an `ota_offer` it checks the target, asks for the blocks it
lacks (a window at a time), checks each block's CRC-32 and image tag, and once it holds them
all checks the image's sha256 and Ed25519 signature against the fleet key
(firmware.image.verify_image) and that its core and SRAM are the device's (not the MCU's
name: parts of one hardware class share one build); then it writes the image into
its inactive slot, re-reads it as a self-test and reports `installed` with the slot, or
reports the refusal with its reason. After a disconnect it reconnects and asks only for
the blocks it still lacks.

Faults can be injected for tests: `drop` (a block is lost once), `corrupt` (a block arrives
once with a byte flipped, and is refused by its CRC), `stall` (after some blocks the device
asks for nothing more for a while).

Many devices run in one process on one thread (device_agent.device_loop.DeviceLoop, a
selector over their paho sockets): the benchmark simulates a thousand devices in a few
processes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_agent import protocol as p
from device_agent.mqtt_device import (
    Command,
    blocks_to_ask,
    device_client,
    device_event,
    dispatch,
    on_connected,
)
from firmware.errors import ImageError
from firmware.image import verify_image
from firmware.targets import TargetSpec, get_target

log = logging.getLogger(__name__)

WINDOW_BLOCKS = 64  # blocks asked for and not yet received, at most
# Re-ask for outstanding blocks when none arrived for this long. QoS 1 loses nothing on a
# live connection (a reconnect re-asks at once), so this only catches a broker that dropped
# a queued message; short, it would re-ask for blocks still queued behind other devices'.
RETRY_S = 15.0
RECONNECT_S = 0.5
KEEPALIVE_S = 30


@dataclass(frozen=True)
class Faults:
    """Faults to inject, by block index (each fires on the block's first arrival only)."""

    drop: frozenset[int] = frozenset()
    corrupt: frozenset[int] = frozenset()
    stall_after_blocks: int | None = None  # after this many blocks, ask for nothing ...
    stall_s: float = 0.0  # ... for this long


@dataclass(frozen=True)
class DeviceIdentity:
    """Who the simulated device is: its MQTT login and the MCU it claims."""

    device_id: str
    password: str
    mcu: str
    slot_bytes: int | None = None  # None: any image size fits


def target_refusal(name: str, cpu: str, sram_bytes: int, device: TargetSpec,
                   what: str) -> str | None:
    """Why an image for `name` (core `cpu`, needing `sram_bytes` of SRAM) cannot run on
    `device`, or None: the core must be the device's, the SRAM within the device's."""
    if cpu != device.cpu.value:
        return (f"{what} {name}, this device is {device.name}: core {cpu}, not "
                f"{device.cpu.value}")
    if sram_bytes > device.sram_bytes:
        return (f"{what} {name}, this device is {device.name}: {sram_bytes} bytes of SRAM, "
                f"the device has {device.sram_bytes}")
    return None


@dataclass
class Outcome:
    """How an update ended on this device."""

    update_id: str
    state: p.UpdateState
    reason: str | None = None
    slot: int | None = None


@dataclass
class _Download:
    offer: p.OtaOffer
    blocks: dict[int, bytes] = field(default_factory=dict)
    outstanding: set[int] = field(default_factory=set)  # asked for, not yet received
    arrivals: set[int] = field(default_factory=set)  # indices seen at least once (faults)
    last_block_at: float = 0.0
    stalled_until: float = 0.0
    stalled: bool = False
    progress_sent: float = 0.0
    retry_after_s: float = RETRY_S  # doubles after each retry that brought nothing


class ReferenceDevice:
    """One simulated device; its MQTT client is driven by a DeviceLoop (or any paho loop)."""

    def __init__(self, identity: DeviceIdentity, fleet_key: Ed25519PublicKey, *,
                 slot_dir: Path | None = None, faults: Faults | None = None,
                 window: int = WINDOW_BLOCKS, retry_s: float = RETRY_S,
                 progress_every: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.identity = identity
        self.spec = get_target(identity.mcu)  # UnknownMcuError for a name not in the catalog
        self.fleet_key = fleet_key
        self.slot_dir = slot_dir
        self.faults = faults or Faults()
        self.window = window
        self.retry_s = retry_s
        self.progress_every = progress_every
        self.clock = clock
        self.slots: list[bytes | None] = [None, None]  # images, when no slot_dir is given
        self.active_slot: int | None = None
        self.download: _Download | None = None
        self.outcomes: dict[str, Outcome] = {}
        # What tests look at: every block request as (indices asked, indices held then).
        self.requests: list[tuple[list[int], frozenset[int]]] = []
        self.crc_refusals: list[str] = []
        self.connects = 0
        self.events_sent: list[p.DeviceEvent] = []
        self.finished = threading.Event()
        self.ready = threading.Event()  # connected and subscribed at least once
        self.client = device_client(identity.device_id, identity.password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: self.ready.set()

    @property
    def device_id(self) -> str:
        """The device's id (its MQTT username and client id)."""
        return self.identity.device_id

    # --- MQTT ---------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not on_connected(client, self.device_id, reason):
            return
        self.connects += 1
        download = self.download
        if download is not None and not download.stalled:
            # Resume: whatever was in flight may be lost; ask again for what is missing.
            download.outstanding.clear()
            self._top_up(download)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        dispatch(self.device_id, msg, self._on_command, self._on_block)

    def _send_event(self, update_id: str | None, state: p.UpdateState, *,
                    progress: float | None = None, reason: str | None = None,
                    slot: int | None = None) -> None:
        event = device_event(update_id, state, progress=progress, reason=reason, slot=slot)
        self.events_sent.append(event)
        self.client.publish(p.evt_topic(self.device_id), p.encode(event), qos=1)

    def _finish(self, update_id: str, state: p.UpdateState, reason: str | None = None,
                slot: int | None = None) -> None:
        self.outcomes[update_id] = Outcome(update_id, state, reason, slot)
        if self.download is not None and self.download.offer.update_id == update_id:
            self.download = None
        self._send_event(update_id, state, reason=reason, slot=slot)
        self.finished.set()

    # --- commands -----------------------------------------------------------------------

    def _on_command(self, command: Command) -> None:
        if isinstance(command, p.OtaOffer):
            self._on_offer(command)
        elif isinstance(command, p.RollbackCommand):
            self._rollback(command)
        else:
            log.info("device %s: the reference client does not personalize (round %d)",
                     self.device_id, command.round)

    def _on_offer(self, offer: p.OtaOffer) -> None:
        done = self.outcomes.get(offer.update_id)
        if done is not None:  # a re-sent offer: say again how it ended
            self._send_event(done.update_id, done.state, reason=done.reason, slot=done.slot)
            return
        if self.download is not None and self.download.offer.update_id == offer.update_id:
            return  # already downloading it
        refusal = self._refusal(offer)
        if refusal is not None:
            self._finish(offer.update_id, p.UpdateState.REFUSED, refusal)
            return
        self.download = download = _Download(offer, last_block_at=self.clock(),
                                             retry_after_s=self.retry_s)
        self._send_event(offer.update_id, p.UpdateState.ACCEPTED)
        self._send_event(offer.update_id, p.UpdateState.DOWNLOADING, progress=0.0)
        self._top_up(download)

    def _refusal(self, offer: p.OtaOffer) -> str | None:
        # What decides is the core and the sizes, not the MCU's name: parts of one hardware
        # class (nrf52840 and stm32f412: Cortex-M4, 256 kB SRAM, 1 MB Flash) share a build
        # named after one of them.
        refusal = target_refusal(offer.target_mcu, offer.target_cpu,
                                 offer.predicted_sram_bytes, self.spec, "offer is for")
        if refusal is not None:
            return refusal
        slot = self.identity.slot_bytes
        if slot is not None and offer.image_bytes > slot:
            return f"image is {offer.image_bytes} bytes, the slot holds {slot}"
        if offer.offer_deadline is not None and time.time() > offer.offer_deadline:
            return "the offer's deadline has passed"
        return None

    def _rollback(self, command: p.RollbackCommand) -> None:
        previous = None if self.active_slot is None else 1 - self.active_slot
        if previous is None or not self._slot_holds_image(previous):
            self._send_event(command.update_id, p.UpdateState.FAILED,
                             reason="no previous image to roll back to")
            return
        self.active_slot = previous
        self._send_event(command.update_id, p.UpdateState.ROLLED_BACK,
                         reason=command.reason or "rollback requested", slot=previous)

    # --- blocks -------------------------------------------------------------------------

    def _on_block(self, update_id: str, frame: bytes) -> None:
        download = self.download
        if download is None or download.offer.update_id != update_id:
            return  # a late duplicate of a finished update
        offer = download.offer
        index = _peek_index(frame)
        if index is not None and index not in download.arrivals:
            download.arrivals.add(index)
            if index in self.faults.drop:
                return  # lost: the retry timer asks again
            if index in self.faults.corrupt:
                frame = frame[:-1] + bytes([frame[-1] ^ 0xFF])
        try:
            block = p.decode_block(frame)
        except p.ProtocolError as exc:  # damaged on the way: ask again at once
            self.crc_refusals.append(str(exc))
            if index is not None:
                download.outstanding.discard(index)
                self._top_up(download)
            return
        mismatch = self._mismatch(offer, block)
        if mismatch is not None:  # not what was offered: asking again would not help
            self._finish(update_id, p.UpdateState.REFUSED, mismatch)
            return
        if block.index in download.blocks:
            return  # a duplicate (QoS 1 redelivery, or a re-asked block arriving twice)
        download.blocks[block.index] = block.data
        download.outstanding.discard(block.index)
        download.last_block_at = self.clock()
        download.retry_after_s = self.retry_s
        received = len(download.blocks)
        if received == offer.block_count:
            self._complete(download)
            return
        fraction = received / offer.block_count
        if fraction - download.progress_sent >= self.progress_every:
            download.progress_sent = fraction
            self._send_event(update_id, p.UpdateState.DOWNLOADING, progress=round(fraction, 3))
        stall_after = self.faults.stall_after_blocks
        if stall_after is not None and received == stall_after and not download.stalled:
            download.stalled = True
            download.stalled_until = self.clock() + self.faults.stall_s
            download.outstanding.clear()
            return
        self._top_up(download)

    @staticmethod
    def _mismatch(offer: p.OtaOffer, block: p.Block) -> str | None:
        if block.image_tag != offer.image_tag:
            return (f"block {block.index} is of image {block.image_tag.hex()}..., the offer's "
                    f"sha256 is {offer.image_sha256[:16]}...")
        if block.total != offer.block_count:
            return (f"block {block.index} says the image has {block.total} blocks, the offer "
                    f"says {offer.block_count}")
        if len(block.data) != offer.block_length(block.index):
            return (f"block {block.index} is {len(block.data)} bytes, the offer says "
                    f"{offer.block_length(block.index)}")
        return None

    def _top_up(self, download: _Download) -> None:
        """Ask for missing blocks until `window` are outstanding (when half are left)."""
        if download.stalled:
            return
        wanted = blocks_to_ask(download.offer.block_count, download.blocks,
                               download.outstanding, self.window)
        if wanted:
            self._request(download, wanted)

    def _request(self, download: _Download, indices: list[int]) -> None:
        self.requests.append((indices, frozenset(download.blocks)))
        download.outstanding.update(indices)
        download.last_block_at = self.clock()
        self.client.publish(p.req_topic(self.device_id, download.offer.update_id),
                            p.encode(p.BlockRequest.for_blocks(indices)), qos=1)

    def tick(self, now: float) -> None:
        """Timers: the end of a stall, and re-asking for blocks that did not come."""
        download = self.download
        if download is None or not self.client.is_connected():
            return
        if download.stalled:
            if now >= download.stalled_until:
                download.stalled = False
                self._top_up(download)
            return
        if download.outstanding and now - download.last_block_at > download.retry_after_s:
            # Backing off: under load, silence is more often a queue than a loss.
            download.retry_after_s *= 2
            self._request(download, sorted(download.outstanding))

    # --- verify and install -------------------------------------------------------------

    def _complete(self, download: _Download) -> None:
        offer = download.offer
        update_id = offer.update_id
        self._send_event(update_id, p.UpdateState.VERIFYING, progress=1.0)
        image = b"".join(download.blocks[i] for i in range(offer.block_count))
        refusal = self._verify(offer, image)
        if refusal is not None:
            self._finish(update_id, p.UpdateState.REFUSED, refusal)
            return
        self._send_event(update_id, p.UpdateState.INSTALLING)
        slot = 0 if self.active_slot is None else 1 - self.active_slot
        try:
            self._write_slot(slot, image)
        except OSError as exc:
            self._finish(update_id, p.UpdateState.FAILED, f"writing slot {slot} failed: {exc}")
            return
        self._send_event(update_id, p.UpdateState.SELF_TEST, slot=slot)
        if not self._slot_holds(slot, offer.image_sha256):
            self._finish(update_id, p.UpdateState.FAILED,
                         f"self-test: slot {slot} does not read back the image")
            return
        self.active_slot = slot
        self._finish(update_id, p.UpdateState.INSTALLED, slot=slot)

    def _verify(self, offer: p.OtaOffer, image: bytes) -> str | None:
        digest = hashlib.sha256(image).hexdigest()
        if digest != offer.image_sha256:
            return (f"image sha256 {digest[:16]}... does not match the offer's "
                    f"{offer.image_sha256[:16]}...")
        if image[-64:].hex() != offer.signature:
            return "image signature differs from the offer's"
        try:
            parsed = verify_image(image, self.fleet_key)
        except ImageError as exc:
            return str(exc)
        # The signed manifest, not the offer's summary: the SRAM the image was linked for.
        t = parsed.manifest.target
        return target_refusal(t.name, t.cpu, t.sram_bytes, self.spec, "image is built for")

    def _slot_path(self, slot: int) -> Path:
        assert self.slot_dir is not None
        return self.slot_dir / self.device_id / f"slot-{'ab'[slot]}.img"

    def _write_slot(self, slot: int, image: bytes) -> None:
        if self.slot_dir is None:
            self.slots[slot] = image
            return
        path = self._slot_path(slot)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".slot-")
        with os.fdopen(fd, "wb") as out:
            out.write(image)
        os.replace(tmp, path)

    def _read_slot(self, slot: int) -> bytes | None:
        if self.slot_dir is None:
            return self.slots[slot]
        try:
            return self._slot_path(slot).read_bytes()
        except FileNotFoundError:
            return None

    def _slot_holds(self, slot: int, sha256: str) -> bool:
        data = self._read_slot(slot)
        return data is not None and hashlib.sha256(data).hexdigest() == sha256

    def _slot_holds_image(self, slot: int) -> bool:
        data = self._read_slot(slot)
        if data is None:
            return False
        try:
            verify_image(data, self.fleet_key)
        except ImageError:
            return False
        return True


def _peek_index(frame: bytes) -> int | None:
    """The block index in a frame's header, before it is checked (for fault injection)."""
    if len(frame) < p.FRAME_HEADER.size:
        return None
    index: int = p.FRAME_HEADER.unpack_from(frame)[4]
    return index
