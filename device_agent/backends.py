"""Inference backends: what computes the device's outputs from the installed image.

- `qemu`: the image's firmware (an ELF for the device's core) in the emulator of that core
  (firmware.toolchain.emulator): what an MCU of the fleet computes. Cores without a QEMU
  board (Cortex-M0+, Xtensa LX7) are refused with the reason when the backend is made.
- `host`: the same generated C as a shared library of this machine (an image whose manifest
  target is host-<arch>, built by firmware.pipeline.host_image), run in-process via ctypes.

Both take a weights overlay (firmware.codegen.overlay): the qemu backend loads it into the
Flash region the manifest names, the host backend passes it to the library. Files derived
from an image (the ELF, the .so) live in its slot directory and are rebuilt when missing or
stale, so they need no durability of their own.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from device_agent.errors import BackendError
from device_agent.profile import BackendKind, DeviceProfile
from firmware.errors import EmulationError
from firmware.image import FirmwareImage
from firmware.pipeline import image_target
from firmware.toolchain.emulator import board_for, run_firmware
from firmware.toolchain.host_run import HostModel

Int8Array = npt.NDArray[np.int8]


class Backend(Protocol):
    """Runs the image installed in a slot directory."""

    kind: BackendKind

    def run(self, slot_dir: Path, image: FirmwareImage, inputs: Int8Array,
            overlay: bytes | None = None) -> Int8Array:
        """int8 outputs (N, bytes) for int8 HWC inputs (N, H, W, C)."""
        ...


def vector_inputs(image: FirmwareImage) -> Int8Array:
    """The manifest's test vector inputs as int8 (N, H, W, C)."""
    m = image.manifest
    c, h, w = m.input.shape
    return np.stack([np.frombuffer(v.input_q, dtype=np.int8).reshape(h, w, c)
                     for v in m.test_vectors]) if m.test_vectors else np.zeros((0, h, w, c),
                                                                                np.int8)


def self_test(backend: Backend, slot_dir: Path, image: FirmwareImage,
              overlay: bytes | None = None,
              expected: Int8Array | None = None) -> str | None:
    """Run the test vectors; None when every output equals the expected one, else why not.

    `expected` defaults to the manifest's; a personalized device passes the outputs it
    recomputed for its overlay.
    """
    inputs = vector_inputs(image)
    if len(inputs) == 0:
        return "the image has no test vectors"
    want = (np.array([v.expected for v in image.manifest.test_vectors], dtype=np.int64)
            if expected is None else np.asarray(expected, dtype=np.int64))
    try:
        got = backend.run(slot_dir, image, inputs, overlay).astype(np.int64)
    except (EmulationError, BackendError) as exc:
        return f"the firmware did not run: {exc}"
    if got.shape != want.shape:
        return f"outputs of shape {got.shape}, expected {want.shape}"
    bad = np.flatnonzero(np.any(got != want, axis=1))
    if len(bad):
        return (f"{len(bad)} of {len(want)} test vectors differ (first: vector {bad[0]}, "
                f"{got[bad[0]].tolist()[:4]}... vs {want[bad[0]].tolist()[:4]}...)")
    return None


def _derived(slot_dir: Path, name: str, payload: bytes) -> Path:
    """The payload as a file of the slot, rewritten (temp + rename) when stale."""
    path = slot_dir / name
    digest = hashlib.sha256(payload).digest()
    if not path.exists() or hashlib.sha256(path.read_bytes()).digest() != digest:
        tmp = path.with_name(name + ".tmp")
        tmp.write_bytes(payload)
        tmp.replace(path)
    return path


class QemuBackend:
    """The firmware in QEMU (module docstring)."""

    kind = BackendKind.QEMU

    def __init__(self, device: DeviceProfile, timeout_s: float = 60.0) -> None:
        try:
            board_for(device.target())
        except EmulationError as exc:
            raise BackendError(f"qemu backend cannot run {device.device_id}: {exc} (cores "
                               "without a QEMU board: use the host backend)") from None
        self.device = device
        self.timeout_s = timeout_s

    def run(self, slot_dir: Path, image: FirmwareImage, inputs: Int8Array,
            overlay: bytes | None = None) -> Int8Array:
        """The firmware's outputs, the overlay (if any) loaded at the manifest's address."""
        m = image.manifest
        flash = None
        if overlay is not None:
            if m.overlay is None:
                raise BackendError(f"image {m.model_id} v{m.model_version} has no overlay region")
            flash = {m.overlay.address: overlay}
        elf = _derived(slot_dir, "firmware.elf", image.payload)
        result = run_firmware(elf, image_target(image), np.ascontiguousarray(inputs),
                              timeout_s=self.timeout_s, flash=flash)
        return result.outputs


class HostBackend:
    """The generated C as a host library (module docstring); one library per slot file."""

    kind = BackendKind.HOST

    def __init__(self, device: DeviceProfile) -> None:
        self.device = device
        self._loaded: dict[Path, HostModel] = {}
        self._lock = threading.Lock()

    def _model(self, slot_dir: Path, image: FirmwareImage) -> HostModel:
        # Named by content: the dynamic loader maps a path once per process, so a new image
        # needs a new name, and each slot (each simulated device) its own copy (own globals).
        digest = hashlib.sha256(image.payload).hexdigest()[:16]
        path = slot_dir / f"model-{digest}.so"
        if path not in self._loaded:
            _derived(slot_dir, path.name, image.payload)
            for stale in slot_dir.glob("model-*.so"):
                if stale != path:
                    stale.unlink()
            self._loaded = {p: m for p, m in self._loaded.items() if p.parent != slot_dir}
            self._loaded[path] = HostModel(path)
        return self._loaded[path]

    def run(self, slot_dir: Path, image: FirmwareImage, inputs: Int8Array,
            overlay: bytes | None = None) -> Int8Array:
        """The library's outputs with `overlay` applied (None: the built-in weights)."""
        with self._lock:
            model = self._model(slot_dir, image)
            try:
                model.use_overlay(overlay)
            except EmulationError as exc:
                raise BackendError(str(exc)) from None
            return model.run(inputs)


def make_backend(device: DeviceProfile) -> Backend:
    """The device's backend; BackendError when it cannot run here."""
    if device.backend is BackendKind.QEMU:
        return QemuBackend(device)
    return HostBackend(device)
