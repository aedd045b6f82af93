"""Blocks of an update being downloaded, kept on disk so that a restarted agent resumes.

    SLOTS/staging/<update>/offer.json        the offer (protocol JSON)
    SLOTS/staging/<update>/b00012-1a2b3c4d   block 12, named with its CRC-32

A block file whose content does not match the CRC in its name (a write cut short) is
deleted and asked for again; nothing here needs fsync: the image's sha256 and signature are
checked when it is complete, and the install itself is journaled (device_agent.slots).
"""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path

from device_agent import protocol as p


class Staging:
    """The staged download of at most one update under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def _dir(self, update_id: str) -> Path:
        return self.root / update_id

    def begin(self, offer: p.OtaOffer) -> dict[int, bytes]:
        """Stage `offer` (dropping any other update's blocks); the blocks already held."""
        for other in self.root.iterdir():
            if other.name != offer.update_id:
                shutil.rmtree(other, ignore_errors=True)
        d = self._dir(offer.update_id)
        d.mkdir(exist_ok=True)
        path = d / "offer.json"
        data = p.encode(offer)
        if not path.exists() or path.read_bytes() != data:
            for stale in d.glob("b*"):
                stale.unlink()
            tmp = d / "offer.json.tmp"
            tmp.write_bytes(data)
            tmp.replace(path)
        return self.blocks(offer)

    def blocks(self, offer: p.OtaOffer) -> dict[int, bytes]:
        """The intact blocks staged for `offer` (damaged ones are deleted)."""
        held: dict[int, bytes] = {}
        for f in self._dir(offer.update_id).glob("b*-*"):
            try:
                index, crc = int(f.name[1:6]), int(f.name[7:], 16)
            except ValueError:
                f.unlink()
                continue
            data = f.read_bytes()
            if (zlib.crc32(data) != crc or index >= offer.block_count
                    or len(data) != offer.block_length(index)):
                f.unlink()
                continue
            held[index] = data
        return held

    def put(self, update_id: str, index: int, data: bytes) -> None:
        """Keep one verified block."""
        d = self._dir(update_id)
        name = f"b{index:05d}-{zlib.crc32(data):08x}"
        tmp = d / (name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(d / name)

    def offer(self) -> p.OtaOffer | None:
        """The staged offer, if any (decoded strictly; a bad one is dropped)."""
        for d in self.root.iterdir():
            path = d / "offer.json"
            if path.exists():
                try:
                    command = p.decode_command(path.read_bytes())
                except p.ProtocolError:
                    shutil.rmtree(d, ignore_errors=True)
                    continue
                if isinstance(command, p.OtaOffer) and command.update_id == d.name:
                    return command
            shutil.rmtree(d, ignore_errors=True)
        return None

    def drop(self, update_id: str) -> None:
        """Forget an update's blocks."""
        shutil.rmtree(self._dir(update_id), ignore_errors=True)
