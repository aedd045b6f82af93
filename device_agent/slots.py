"""A/B firmware slots on disk: install into the inactive slot, self-test, switch atomically.

    SLOTS/state.json       which slot boots, the previous one, a pending install, the last
                           outcome (and whether it was reported); only ever replaced whole
                           (temp file, fsync, rename, fsync of the directory)
    SLOTS/slot-a/image.tfimg  the signed image as received (verified again at every boot)
    SLOTS/slot-b/...          (plus files the backends derive from it, and the weights overlay)

An install never touches the active slot. Its steps, each durable before the next:
  1. `state.pending` = (update, inactive slot, sha256, phase "writing"); the inactive slot
     stops being a rollback target in the same write;
  2. the image is written to the slot (temp, fsync, rename, fsync dir);
  3. `pending.phase` = "self_test"; the backend runs the image's test vectors;
  4. commit: `active` = the new slot, `previous` = the old one, outcome "installed".
A self-test failure records outcome "failed" and leaves the old slot active. Killed at any
point, `recover()` on restart finds the old slot (or the committed new one) bootable, and the
pending install either finishes (its image is complete and verifies: self-test, commit) or is
reported failed with the phase it died in. `rollback()` boots the previous slot again.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_agent.durable import Disk, Hook
from device_agent.errors import InstallRefused, SlotError
from device_agent.profile import DeviceProfile, check_image
from firmware.errors import ImageError
from firmware.image import FirmwareImage, verify_image

STATE = "state.json"
IMAGE = "image.tfimg"
STATE_FORMAT = "tinyfleet.slots"
STATE_VERSION = 1
SLOT_NAMES = ("a", "b")

# Runs an image installed in a slot directory on its test vectors; None, or why it failed.
SelfTest = Callable[[Path, FirmwareImage], str | None]


class Outcome(enum.Enum):
    """How the last update ended (reported to the service once)."""

    INSTALLED = "installed"
    FAILED = "failed"
    REFUSED = "refused"
    ROLLED_BACK = "rolled_back"


@dataclass(frozen=True)
class SlotInfo:
    """What a slot holds."""

    sha256: str  # of the whole signed image file
    model_id: str
    model_version: str
    update_id: str


@dataclass(frozen=True)
class Pending:
    """An install in progress."""

    update_id: str
    slot: str
    sha256: str
    phase: str  # writing | self_test


@dataclass(frozen=True)
class LastOutcome:
    """The result of the last update and whether the service has heard it."""

    update_id: str
    state: Outcome
    reason: str
    slot: str | None
    reported: bool = False


@dataclass(frozen=True)
class SlotState:
    """state.json, parsed."""

    active: str | None = None
    previous: str | None = None
    slots: tuple[tuple[str, SlotInfo | None], ...] = (("a", None), ("b", None))
    pending: Pending | None = None
    outcome: LastOutcome | None = None

    def slot(self, name: str) -> SlotInfo | None:
        """What slot `name` holds (None: empty or being written)."""
        return dict(self.slots)[name]

    def with_slot(self, name: str, info: SlotInfo | None) -> SlotState:
        """A copy with slot `name` set to `info`."""
        return replace(self, slots=tuple((n, info if n == name else i) for n, i in self.slots))

    def to_json(self) -> bytes:
        """The state file's bytes."""
        doc = {
            "format": STATE_FORMAT, "version": STATE_VERSION, "active": self.active,
            "previous": self.previous,
            "slots": {n: None if i is None else asdict(i) for n, i in self.slots},
            "pending": None if self.pending is None else asdict(self.pending),
            "outcome": None if self.outcome is None else {
                **asdict(self.outcome), "state": self.outcome.state.value},
        }
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> SlotState:
        """Parse state.json; SlotError names what is wrong."""
        try:
            doc = json.loads(data)
            if doc.get("format") != STATE_FORMAT or doc.get("version") != STATE_VERSION:
                raise SlotError(f"{STATE}: format {doc.get('format')!r} version "
                                f"{doc.get('version')!r} is not {STATE_FORMAT} {STATE_VERSION}")
            slots = tuple((n, None if doc["slots"][n] is None else SlotInfo(**doc["slots"][n]))
                          for n in SLOT_NAMES)
            out = doc["outcome"]
            return cls(active=doc["active"], previous=doc["previous"], slots=slots,
                       pending=None if doc["pending"] is None else Pending(**doc["pending"]),
                       outcome=None if out is None else LastOutcome(
                           update_id=out["update_id"], state=Outcome(out["state"]),
                           reason=out["reason"], slot=out["slot"], reported=out["reported"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise SlotError(f"{STATE} is unreadable: {exc!r}") from None


def other(slot: str) -> str:
    """The other slot of the pair."""
    return "b" if slot == "a" else "a"


def sha256_hex(data: bytes) -> str:
    """Hex sha256."""
    return hashlib.sha256(data).hexdigest()


class SlotStore:
    """The A/B slots of one device under `root` (see the module docstring)."""

    def __init__(self, root: Path, device: DeviceProfile, public_key: Ed25519PublicKey,
                 boundary: Hook | None = None) -> None:
        self.root = root
        self.device = device
        self.public_key = public_key
        self.disk = Disk(root, boundary)
        root.mkdir(parents=True, exist_ok=True)
        for name in SLOT_NAMES:
            self.slot_dir(name).mkdir(exist_ok=True)
        self.state = self._load()

    # -- state ------------------------------------------------------------------------------

    def slot_dir(self, name: str) -> Path:
        """The directory of slot `name`."""
        return self.root / f"slot-{name}"

    def _load(self) -> SlotState:
        path = self.root / STATE
        if not path.exists():
            return SlotState()
        return SlotState.from_json(path.read_bytes())

    def _save(self, state: SlotState) -> None:
        self.disk.atomic_write(self.root / STATE, state.to_json())
        self.state = state

    # -- reading slots ----------------------------------------------------------------------

    def image(self, name: str) -> FirmwareImage:
        """The verified image of slot `name`; SlotError if it is missing or altered."""
        info = self.state.slot(name)
        if info is None:
            raise SlotError(f"slot {name} of {self.device.device_id} holds no image")
        path = self.slot_dir(name) / IMAGE
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SlotError(f"slot {name}: {path} unreadable: {exc.strerror}") from None
        if sha256_hex(data) != info.sha256:
            raise SlotError(f"slot {name}: image sha256 {sha256_hex(data)[:16]}... differs from "
                            f"the recorded {info.sha256[:16]}...")
        try:
            return verify_image(data, self.public_key)
        except ImageError as exc:
            raise SlotError(f"slot {name}: {exc}") from None

    def active_image(self) -> FirmwareImage:
        """The image the device boots; SlotError if no slot is active."""
        if self.state.active is None:
            raise SlotError(f"{self.device.device_id} has no active slot (nothing installed)")
        return self.image(self.state.active)

    def active_dir(self) -> Path:
        """The directory of the active slot."""
        if self.state.active is None:
            raise SlotError(f"{self.device.device_id} has no active slot (nothing installed)")
        return self.slot_dir(self.state.active)

    # -- install ----------------------------------------------------------------------------

    def install(self, update_id: str, data: bytes, self_test: SelfTest) -> LastOutcome:
        """Install a signed image (module docstring); the outcome, or InstallRefused."""
        if self.state.pending is not None:
            raise SlotError(f"update {self.state.pending.update_id} is still pending; "
                            "recover() first")
        try:
            image = check_image(data, self.public_key, self.device)
        except InstallRefused as exc:
            self._save(replace(self.state, outcome=LastOutcome(
                update_id, Outcome.REFUSED, exc.reason[:256], None)))
            raise
        target = other(self.state.active) if self.state.active else SLOT_NAMES[0]
        digest = sha256_hex(data)
        previous = self.state.previous if self.state.previous != target else None
        self._save(replace(self.state.with_slot(target, None), previous=previous,
                           pending=Pending(update_id, target, digest, "writing")))
        self.disk.atomic_write(self.slot_dir(target) / IMAGE, data)
        return self._finish(image, self_test)

    def _finish(self, image: FirmwareImage, self_test: SelfTest) -> LastOutcome:
        pending = self.state.pending
        assert pending is not None
        if pending.phase != "self_test":
            self._save(replace(self.state, pending=replace(pending, phase="self_test")))
        failure = self_test(self.slot_dir(pending.slot), image)
        if failure is not None:
            return self._fail(pending, f"self-test failed: {failure}")
        m = image.manifest
        info = SlotInfo(pending.sha256, m.model_id, m.model_version, pending.update_id)
        outcome = LastOutcome(pending.update_id, Outcome.INSTALLED, "", pending.slot)
        self._save(replace(self.state.with_slot(pending.slot, info), active=pending.slot,
                           previous=self.state.active, pending=None, outcome=outcome))
        return outcome

    def _fail(self, pending: Pending, reason: str) -> LastOutcome:
        outcome = LastOutcome(pending.update_id, Outcome.FAILED, reason[:256], pending.slot)
        self._save(replace(self.state, pending=None, outcome=outcome))
        self.disk.unlink(self.slot_dir(pending.slot) / IMAGE)
        return outcome

    # -- restart, rollback, reporting -------------------------------------------------------

    def recover(self, self_test: SelfTest) -> LastOutcome | None:
        """At start: finish or fail an interrupted install; SlotError if nothing can boot.

        Returns the outcome of a pending install it settled (None when there was none).
        """
        for name in SLOT_NAMES:  # a temp file of a write that never reached its rename
            for tmp in self.slot_dir(name).glob("*.tmp"):
                tmp.unlink()
        stale = self.root / (STATE + ".tmp")
        if stale.exists():
            stale.unlink()
        settled = None
        pending = self.state.pending
        if pending is not None:
            settled = self._settle(pending, self_test)
        if self.state.active is not None:
            try:
                self.active_image()
            except SlotError:
                if self.state.previous is None:
                    raise
                self._save(replace(self.state, active=self.state.previous, previous=None))
                self.active_image()
        return settled

    def _settle(self, pending: Pending, self_test: SelfTest) -> LastOutcome:
        path = self.slot_dir(pending.slot) / IMAGE
        data = path.read_bytes() if path.exists() else b""
        if sha256_hex(data) != pending.sha256:
            return self._fail(pending, f"interrupted while {pending.phase.replace('_', '-')}"
                                       " (the agent stopped); the image was incomplete")
        try:
            image = check_image(data, self.public_key, self.device)
        except InstallRefused as exc:
            return self._fail(pending, exc.reason)
        return self._finish(image, self_test)

    def rollback(self, reason: str = "rollback command") -> LastOutcome:
        """Boot the previous slot again; SlotError if there is none or it is not intact."""
        prev = self.state.previous
        if prev is None or self.state.slot(prev) is None:
            raise SlotError(f"{self.device.device_id} has no previous slot to roll back to")
        self.image(prev)
        info = self.state.slot(prev)
        assert info is not None
        outcome = LastOutcome(info.update_id, Outcome.ROLLED_BACK, reason[:256], prev)
        self._save(replace(self.state, active=prev, previous=self.state.active,
                           outcome=outcome))
        return outcome

    def mark_reported(self) -> None:
        """The service has the last outcome: do not report it again after a restart."""
        out = self.state.outcome
        if out is not None and not out.reported:
            self._save(replace(self.state, outcome=replace(out, reported=True)))

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary (status output, tests)."""
        described: dict[str, Any] = json.loads(self.state.to_json())
        return described
