"""What the device is (MCU, core, memory, backend) and the checks an image must pass for it.

`check_image` is the whole refusal policy: a wrong signature or payload hash
(`firmware.image.verify_image`), an image for another core or another backend, and an image
that does not fit (the manifest's predicted SRAM, its Flash figures and the slot it was
linked for, against the device's). Each refusal is an `InstallRefused` naming the numbers.
"""

from __future__ import annotations

import enum
import platform
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from device_agent.errors import InstallRefused
from firmware.errors import ImageError
from firmware.image import FirmwareImage, verify_image
from firmware.targets import OtaLayout, TargetSpec, custom_target, get_target

KIB = 1024


def host_target_name(machine: str | None = None) -> str:
    """The manifest target of host shared-library images for this machine: host-x86_64."""
    return f"host-{machine or platform.machine()}"


class BackendKind(enum.Enum):
    """How the device computes inferences (see device_agent.backends)."""

    QEMU = "qemu"  # the firmware in the emulator of the device's core
    HOST = "host"  # the same generated C as a shared library of the host


@dataclass(frozen=True)
class DeviceProfile:
    """One device: its MCU's core and memory, and the backend that runs its images."""

    device_id: str
    mcu: str
    cpu: str
    sram_bytes: int
    flash_bytes: int
    slot_bytes: int
    backend: BackendKind

    @classmethod
    def for_mcu(cls, device_id: str, mcu: str, backend: BackendKind | str,
                layout: OtaLayout = OtaLayout.AB) -> DeviceProfile:
        """A profile from the MCU catalog (its A/B slot size)."""
        spec = get_target(mcu)
        return cls.for_target(device_id, spec, backend, layout)

    @classmethod
    def for_target(cls, device_id: str, spec: TargetSpec, backend: BackendKind | str,
                   layout: OtaLayout = OtaLayout.AB) -> DeviceProfile:
        """A profile from a TargetSpec."""
        return cls(device_id=device_id, mcu=spec.name, cpu=spec.cpu.value,
                   sram_bytes=spec.sram_bytes, flash_bytes=spec.flash_bytes,
                   slot_bytes=spec.slot_bytes(layout), backend=BackendKind(backend))

    def target(self) -> TargetSpec:
        """The TargetSpec of the device's MCU (catalog entry, or one from its sizes)."""
        try:
            spec = get_target(self.mcu)
            if (spec.cpu.value, spec.sram_bytes, spec.flash_bytes) == (
                    self.cpu, self.sram_bytes, self.flash_bytes):
                return spec
        except Exception:
            pass
        return custom_target(self.sram_bytes, self.flash_bytes, self.cpu, name=self.mcu)


def _kb(n: int) -> str:
    return f"{n / KIB:.1f} kB"


def check_target(image: FirmwareImage, device: DeviceProfile) -> None:
    """InstallRefused unless the image was built for this device's core and backend."""
    t = image.manifest.target
    if device.backend is BackendKind.HOST:
        want = host_target_name()
        if t.name != want:
            raise InstallRefused(f"image is built for {t.name} ({t.cpu}); the host backend of "
                                 f"{device.device_id} runs {want} images")
        return
    if t.cpu != device.cpu:
        raise InstallRefused(f"image is built for {t.name} ({t.cpu}); {device.device_id} is "
                             f"{device.mcu} ({device.cpu})")


def check_fits(image: FirmwareImage, device: DeviceProfile) -> None:
    """InstallRefused unless the manifest's SRAM and Flash figures fit the device."""
    m = image.manifest
    sram = max(m.predicted.sram_bytes, m.measured.sram_bytes if m.measured else 0)
    if sram > device.sram_bytes:
        raise InstallRefused(f"image needs {_kb(sram)} of SRAM, {device.device_id} "
                             f"({device.mcu}) has {_kb(device.sram_bytes)}")
    flash = max(m.predicted.flash_bytes, m.measured.flash_bytes if m.measured else 0)
    if flash > device.slot_bytes:
        raise InstallRefused(f"image needs {_kb(flash)} of Flash, one slot of "
                             f"{device.device_id} ({device.mcu}) holds {_kb(device.slot_bytes)}")
    if m.target.slot_bytes > device.slot_bytes:
        raise InstallRefused(f"image is linked for a {_kb(m.target.slot_bytes)} slot, the "
                             f"slots of {device.device_id} ({device.mcu}) hold "
                             f"{_kb(device.slot_bytes)}")
    if device.backend is BackendKind.QEMU and m.payload_bytes > device.slot_bytes * 4:
        # the ELF carries symbols beside what is flashed; 4x the slot is no firmware of ours
        raise InstallRefused(f"payload of {_kb(m.payload_bytes)} is no firmware for a "
                             f"{_kb(device.slot_bytes)} slot")


def check_image(data: bytes, public_key: Ed25519PublicKey,
                device: DeviceProfile) -> FirmwareImage:
    """The verified image, or InstallRefused with the reason (signature, hash, MCU, size)."""
    try:
        image = verify_image(data, public_key)
    except ImageError as exc:
        raise InstallRefused(str(exc)) from None
    check_target(image, device)
    check_fits(image, device)
    return image
