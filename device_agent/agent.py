"""The device agent: MQTT commands in, events and metrics out, installs and rounds in between.

One `DeviceAgent` is one device (its own MQTT connection, slots, data and backend); an
`AgentLoop` (device_agent.loop) drives one or many of them on one thread. What it does:

- on connect: subscribe (QoS 1), publish the retained `online` presence naming the images its
  backend runs ("qemu" or "host-x86_64": the service offers that artifact; the last will says
  `offline`), report the last update outcome the service has not heard, resume a staged
  download by asking only for the blocks it lacks;
- `ota_offer`: check the summary (core, backend, SRAM), stage it, fetch blocks in a window,
  check each block's CRC, tag and length; when complete, on the worker thread: sha256 against
  the offer, then the slot store's install (signature, hash, target and size refusals, write
  the inactive slot, self-test, atomic switch), reporting every state;
- `rollback`: the previous slot; `personalize`: a round (device_agent.personalization) whose
  MetricsReport is the only thing it publishes about the data.
Installs and rounds run one at a time on a worker thread; everything published goes through
an outbox that the loop thread drains (paho's client is driven by that thread alone).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from device_agent import protocol as p
from device_agent.backends import make_backend, self_test
from device_agent.config import AgentConfig
from device_agent.durable import Hook
from device_agent.errors import AgentError, InstallRefused, SlotError
from device_agent.mqtt_device import (
    Command,
    blocks_to_ask,
    device_client,
    device_event,
    dispatch,
    on_connected,
)
from device_agent.personalization import Personalizer
from device_agent.profile import BackendKind, host_target_name
from device_agent.slots import Outcome, SlotStore
from device_agent.staging import Staging
from firmware.image import FirmwareImage, load_public_key
from firmware.training.scheme import SparseUpdateScheme

log = logging.getLogger(__name__)

WINDOW_BLOCKS = 64
RETRY_S = 2.0
_OUTCOME_STATE = {Outcome.INSTALLED: p.UpdateState.INSTALLED,
                  Outcome.FAILED: p.UpdateState.FAILED,
                  Outcome.REFUSED: p.UpdateState.REFUSED,
                  Outcome.ROLLED_BACK: p.UpdateState.ROLLED_BACK}


def _slot_number(slot: str | None) -> int | None:
    return None if slot is None else "ab".index(slot)


@dataclass
class _Download:
    offer: p.OtaOffer
    blocks: dict[int, bytes] = field(default_factory=dict)
    outstanding: set[int] = field(default_factory=set)
    last_block_at: float = 0.0
    progress_sent: float = 0.0


class DeviceAgent:
    """One device (module docstring)."""

    def __init__(self, config: AgentConfig, *, boundary: Hook | None = None,
                 window: int = WINDOW_BLOCKS, retry_s: float = RETRY_S,
                 progress_every: float = 0.25) -> None:
        self.config = config
        self.device_id = config.device_id
        self.profile = config.profile()
        self.backend = make_backend(self.profile)
        # Online, and which images this backend runs: the service offers the matching
        # artifact (the MCU image, or the host library of this machine).
        self._presence = p.encode_presence(True, "qemu" if self.backend.kind is BackendKind.QEMU
                                           else host_target_name())
        self.store = SlotStore(config.slot_dir, self.profile,
                               load_public_key(config.public_key_pem), boundary)
        self.personalizer = Personalizer(self.store, self.backend, config.data_dir)
        self.staging = Staging(config.slot_dir / "staging")
        self.window = window
        self.retry_s = retry_s
        self.progress_every = progress_every
        self.download: _Download | None = None
        self.installing: str | None = None  # update id handed to the worker
        self.rounds_done: dict[int, p.MetricsReport] = {}
        self.next_round_at = (time.monotonic() + config.personalize_every_s
                              if config.personalize_every_s else None)
        self._outbox: collections.deque[tuple[str, bytes, bool]] = collections.deque()
        self._work = ThreadPoolExecutor(1, thread_name_prefix=f"agent-{self.device_id}")
        self._closing = False
        self._lock = threading.Lock()
        self.ready = threading.Event()
        self.client = device_client(self.device_id, config.password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: self.ready.set()
        self.boot()

    # -- start -----------------------------------------------------------------------------

    def _check(self, slot_dir: Path, image: FirmwareImage) -> str | None:
        return self_test(self.backend, slot_dir, image)

    def boot(self) -> None:
        """Settle an interrupted install, check the overlay, pick up a staged download."""
        self.store.recover(self._check)
        if self.store.state.active is not None:
            try:
                failure = self.personalizer.boot_check()
            except AgentError as exc:
                failure = str(exc)
            if failure is not None:
                log.warning("device %s: the kept overlay fails its self-test (%s); serving "
                            "the image's own weights", self.device_id, failure)
                (self.store.active_dir() / "overlay.json").unlink(missing_ok=True)
        offer = self.staging.offer()
        out = self.store.state.outcome
        if offer is not None and out is not None and out.update_id == offer.update_id:
            # killed between the install's end and dropping its blocks (recover() may just
            # have settled it): the update is over, its outcome is what gets reported
            self.staging.drop(offer.update_id)
            offer = None
        if offer is not None:
            self.download = _Download(offer, self.staging.blocks(offer))
            log.info("device %s resumes update %s with %d of %d blocks", self.device_id,
                     offer.update_id, len(self.download.blocks), offer.block_count)

    # -- outgoing --------------------------------------------------------------------------

    def _send(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self._outbox.append((topic, payload, retain))

    def _event(self, update_id: str | None, state: p.UpdateState, *,
               progress: float | None = None, reason: str | None = None,
               slot: int | None = None) -> None:
        event = device_event(update_id, state, progress=progress, reason=reason, slot=slot)
        self._send(p.evt_topic(self.device_id), p.encode(event))

    def _report_outcome(self) -> None:
        out = self.store.state.outcome
        if out is None or out.reported:
            return
        self._event(out.update_id, _OUTCOME_STATE[out.state], reason=out.reason or None,
                    slot=_slot_number(out.slot))
        self.store.mark_reported()

    def tick(self, now: float) -> None:
        """Loop thread: publish the outbox, re-ask for late blocks, scheduled rounds."""
        while self._outbox and self.client.is_connected():
            topic, payload, retain = self._outbox.popleft()
            self.client.publish(topic, payload, qos=1, retain=retain)
        d = self.download
        if d is not None and d.outstanding and now - d.last_block_at > self.retry_s \
                and self.client.is_connected():
            self._request(d, sorted(d.outstanding))
        if self.next_round_at is not None and now >= self.next_round_at:
            self.next_round_at = now + self.config.personalize_every_s
            self._submit(self._round, p.PersonalizeCommand(round=int(time.time())))

    def close(self) -> None:
        """Clean shutdown: finish running work, say offline (retained), flush."""
        self._closing = True
        self._work.shutdown(wait=True, cancel_futures=True)
        self.tick(time.monotonic())
        if self.client.is_connected():
            self.client.publish(p.presence_topic(self.device_id), p.OFFLINE, qos=1,
                                retain=True)

    # -- MQTT ------------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not on_connected(client, self.device_id, reason, self._presence):
            return
        self._submit(lambda _: self._report_outcome(), None)  # the store: worker thread only
        d = self.download
        if d is not None and self.installing is None:
            d.outstanding.clear()
            self._top_up(d)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        dispatch(self.device_id, msg, self._on_command, self._on_block)

    def _on_command(self, command: Command) -> None:
        if isinstance(command, p.OtaOffer):
            self._on_offer(command)
        elif isinstance(command, p.RollbackCommand):
            self._submit(self._rollback, command)
        else:
            self._submit(self._round, command)

    def _submit(self, fn: Any, arg: Any) -> None:
        def run() -> None:
            try:
                fn(arg)
            except Exception:
                log.exception("device %s: %s failed", self.device_id, fn.__name__)
                raise

        if self._closing:
            log.info("device %s is stopping: %s not started", self.device_id, fn.__name__)
            return
        self._work.submit(run)

    # -- OTA -------------------------------------------------------------------------------

    def _summary_refusal(self, offer: p.OtaOffer) -> str | None:
        dev = self.profile
        if dev.backend is BackendKind.HOST:
            if offer.target_mcu != host_target_name():
                return (f"offer is for {offer.target_mcu} ({offer.target_cpu}); the host "
                        f"backend runs {host_target_name()} images")
        elif offer.target_cpu != dev.cpu:
            return (f"offer is for {offer.target_mcu} ({offer.target_cpu}); {dev.device_id} "
                    f"is {dev.mcu} ({dev.cpu})")
        if offer.predicted_sram_bytes > dev.sram_bytes:
            return (f"image needs {offer.predicted_sram_bytes / 1024:.1f} kB of SRAM, "
                    f"{dev.mcu} has {dev.sram_bytes / 1024:.1f} kB")
        if offer.predicted_flash_bytes > dev.slot_bytes:
            return (f"image needs {offer.predicted_flash_bytes / 1024:.1f} kB of Flash, one "
                    f"slot holds {dev.slot_bytes / 1024:.1f} kB")
        if offer.offer_deadline is not None and time.time() > offer.offer_deadline:
            return "the offer's deadline has passed"
        return None

    def _on_offer(self, offer: p.OtaOffer) -> None:
        out = self.store.state.outcome
        if out is not None and out.update_id == offer.update_id:  # re-sent: say how it ended
            self._event(out.update_id, _OUTCOME_STATE[out.state], reason=out.reason or None,
                        slot=_slot_number(out.slot))
            return
        if self.installing == offer.update_id:
            return
        if self.download is not None and self.download.offer.update_id == offer.update_id:
            self._top_up(self.download)
            return
        refusal = self._summary_refusal(offer)
        if refusal is not None:
            self._event(offer.update_id, p.UpdateState.REFUSED, reason=refusal)
            return
        held = self.staging.begin(offer)
        self.download = d = _Download(offer, held, last_block_at=time.monotonic())
        self._event(offer.update_id, p.UpdateState.ACCEPTED)
        self._event(offer.update_id, p.UpdateState.DOWNLOADING,
                    progress=round(len(held) / offer.block_count, 3))
        if len(held) == offer.block_count:
            self._complete(d)
        else:
            self._top_up(d)

    def _on_block(self, update_id: str, frame: bytes) -> None:
        d = self.download
        if d is None or d.offer.update_id != update_id:
            return
        offer = d.offer
        try:
            block = p.decode_block(frame)
        except p.ProtocolError as exc:  # damaged: ask again
            log.info("device %s: %s", self.device_id, exc)
            d.outstanding.clear()
            self._top_up(d)
            return
        if (block.image_tag != offer.image_tag or block.total != offer.block_count
                or len(block.data) != offer.block_length(block.index)):
            self.download = None
            self.staging.drop(update_id)
            self._event(update_id, p.UpdateState.REFUSED,
                        reason=f"block {block.index} does not belong to the offered image")
            return
        if block.index in d.blocks:
            return
        self.staging.put(update_id, block.index, block.data)
        d.blocks[block.index] = block.data
        d.outstanding.discard(block.index)
        d.last_block_at = time.monotonic()
        if len(d.blocks) == offer.block_count:
            self._complete(d)
            return
        fraction = len(d.blocks) / offer.block_count
        if fraction - d.progress_sent >= self.progress_every:
            d.progress_sent = fraction
            self._event(update_id, p.UpdateState.DOWNLOADING, progress=round(fraction, 3))
        self._top_up(d)

    def _top_up(self, d: _Download) -> None:
        wanted = blocks_to_ask(d.offer.block_count, d.blocks, d.outstanding, self.window)
        if wanted:
            self._request(d, wanted)

    def _request(self, d: _Download, indices: list[int]) -> None:
        d.outstanding.update(indices)
        d.last_block_at = time.monotonic()
        self._send(p.req_topic(self.device_id, d.offer.update_id),
                   p.encode(p.BlockRequest.for_blocks(indices)))

    def _complete(self, d: _Download) -> None:
        self.download = None
        self.installing = d.offer.update_id
        image = b"".join(d.blocks[i] for i in range(d.offer.block_count))
        self._submit(self._install, (d.offer, image))

    def _install(self, job: tuple[p.OtaOffer, bytes]) -> None:
        offer, image = job
        update_id = offer.update_id
        try:
            self._event(update_id, p.UpdateState.VERIFYING, progress=1.0)
            digest = hashlib.sha256(image).hexdigest()
            if digest != offer.image_sha256:
                self._event(update_id, p.UpdateState.REFUSED,
                            reason=f"image sha256 {digest[:16]}... is not the offer's "
                                   f"{offer.image_sha256[:16]}...")
                return
            self._event(update_id, p.UpdateState.INSTALLING)

            def check(slot_dir: Path, parsed: FirmwareImage) -> str | None:
                self._event(update_id, p.UpdateState.SELF_TEST,
                            slot=_slot_number(self.store.state.pending.slot
                                              if self.store.state.pending else None))
                return self._check(slot_dir, parsed)

            try:
                self.store.install(update_id, image, check)
            except InstallRefused:
                pass  # the store recorded the refusal as the outcome
            except SlotError as exc:
                self._event(update_id, p.UpdateState.FAILED, reason=str(exc))
                return
            self._report_outcome()
        finally:
            self.staging.drop(update_id)
            self.installing = None

    def _rollback(self, command: p.RollbackCommand) -> None:
        try:
            out = self.store.rollback(command.reason or "rollback command")
        except SlotError as exc:
            self._event(command.update_id, p.UpdateState.FAILED, reason=str(exc))
            return
        self._event(command.update_id, p.UpdateState.ROLLED_BACK, reason=out.reason,
                    slot=_slot_number(out.slot))
        self.store.mark_reported()

    # -- personalization ---------------------------------------------------------------------

    def _round(self, command: p.PersonalizeCommand) -> None:
        if command.round in self.rounds_done:  # a re-sent command: the same numbers again
            self._send(p.metrics_topic(self.device_id),
                       p.encode(self.rounds_done[command.round]))
            return
        scheme = None if command.scheme is None else SparseUpdateScheme.from_dict(command.scheme)
        try:
            result = self.personalizer.run_round(command.round, scheme)
        except (AgentError, SlotError) as exc:
            log.warning("device %s: round %d not run: %s", self.device_id, command.round, exc)
            return
        self.rounds_done[command.round] = result.metrics
        self._send(p.metrics_topic(self.device_id), p.encode(result.metrics))
