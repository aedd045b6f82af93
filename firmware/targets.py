"""The MCU catalog: datasheet figures of real parts, as `TargetSpec` values.

SRAM is what one linker region can use for the model's arena, scratch, static data and stack
(what a model needs of it: `firmware.plan.account`): parts whose RAM is split into banks that
are not contiguous (STM32H743, i.MX RT1062) list the largest usable contiguous region and say
so in `note`. Flash of parts with external QSPI flash is the
size on the common board named in `note`. kB is 1024 bytes, as in the MCUNet papers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from firmware.errors import FirmwareError

KIB = 1024
MIB = 1024 * 1024

# Smallest and largest parts the registry accepts (sanity bounds, not catalog entries).
MIN_SRAM_BYTES = 2 * KIB
MAX_SRAM_BYTES = 64 * MIB
MIN_FLASH_BYTES = 16 * KIB
MAX_FLASH_BYTES = 1024 * MIB


class Cpu(enum.Enum):
    """The core, which picks the compiler flags and the QEMU board."""

    CORTEX_M0PLUS = "cortex-m0plus"
    CORTEX_M3 = "cortex-m3"
    CORTEX_M4 = "cortex-m4"
    CORTEX_M7 = "cortex-m7"
    CORTEX_M33 = "cortex-m33"
    XTENSA_LX7 = "xtensa-lx7"

    @property
    def is_arm(self) -> bool:
        """True for the Arm Cortex-M cores arm-none-eabi-gcc builds for."""
        return self is not Cpu.XTENSA_LX7

    @property
    def has_dsp(self) -> bool:
        """True where the core has the DSP extension (SMLAD and friends)."""
        return self in (Cpu.CORTEX_M4, Cpu.CORTEX_M7, Cpu.CORTEX_M33)


class OtaLayout(enum.Enum):
    """How Flash is split for over-the-air updates."""

    AB = "ab"  # two firmware slots: the running one and the one being written
    SINGLE = "single"  # one slot, overwritten in place (no rollback)


# The QEMU board that emulates each core (Flash at 0x0, RAM at 0x20000000, 4 MB each).
QEMU_BOARDS: dict[Cpu, str] = {
    Cpu.CORTEX_M3: "mps2-an385",
    Cpu.CORTEX_M4: "mps2-an386",
    Cpu.CORTEX_M7: "mps2-an500",
    Cpu.CORTEX_M33: "mps2-an505",
}

DEFAULT_BOOTLOADER_BYTES = 32 * KIB


@dataclass(frozen=True)
class TargetSpec:
    """One MCU: memory sizes, core and clock; `name` is the catalog key."""

    name: str
    vendor: str
    cpu: Cpu
    sram_bytes: int
    flash_bytes: int
    clock_hz: int
    fpu: bool
    note: str = ""
    bootloader_bytes: int = DEFAULT_BOOTLOADER_BYTES

    @property
    def dsp(self) -> bool:
        """True where the core has the DSP extension."""
        return self.cpu.has_dsp

    @property
    def qemu_board(self) -> str | None:
        """The QEMU machine that emulates this core, None where there is none."""
        return QEMU_BOARDS.get(self.cpu)

    def slot_bytes(self, layout: OtaLayout = OtaLayout.AB) -> int:
        """Flash one firmware image may occupy under an OTA layout."""
        usable = self.flash_bytes - self.bootloader_bytes
        return usable // 2 if layout is OtaLayout.AB else usable


def _t(name: str, vendor: str, cpu: Cpu, sram_kib: int, flash_kib: int, mhz: int, fpu: bool,
       note: str = "") -> TargetSpec:
    return TargetSpec(name=name, vendor=vendor, cpu=cpu, sram_bytes=sram_kib * KIB,
                      flash_bytes=flash_kib * KIB, clock_hz=mhz * 1_000_000, fpu=fpu, note=note)


CATALOG: dict[str, TargetSpec] = {
    t.name: t
    for t in (
        _t("stm32f412", "ST", Cpu.CORTEX_M4, 256, 1024, 100, True, "STM32F412ZG"),
        _t("stm32f746", "ST", Cpu.CORTEX_M7, 320, 1024, 216, True, "STM32F746NG"),
        _t("stm32h743", "ST", Cpu.CORTEX_M7, 512, 2048, 480, True,
           "1 MB RAM in banks; 512 kB AXI SRAM is the largest contiguous region"),
        _t("stm32l476", "ST", Cpu.CORTEX_M4, 128, 1024, 80, True,
           "96 kB SRAM1 + 32 kB SRAM2, contiguous through the alias"),
        _t("stm32u585", "ST", Cpu.CORTEX_M33, 768, 2048, 160, True, "STM32U585AI"),
        _t("stm32f103", "ST", Cpu.CORTEX_M3, 20, 128, 72, False, "STM32F103CB (Blue Pill)"),
        _t("nrf52840", "Nordic", Cpu.CORTEX_M4, 256, 1024, 64, True),
        _t("nrf5340", "Nordic", Cpu.CORTEX_M33, 512, 1024, 128, True, "application core"),
        _t("rp2040", "Raspberry Pi", Cpu.CORTEX_M0PLUS, 264, 2048, 133, False,
           "external QSPI flash, 2 MB on the Pico board"),
        _t("esp32s3", "Espressif", Cpu.XTENSA_LX7, 512, 8192, 240, True,
           "external flash, 8 MB on the DevKitC-1 N8"),
        _t("samd51", "Microchip", Cpu.CORTEX_M4, 192, 512, 120, True, "ATSAMD51J19A"),
        _t("imxrt1062", "NXP", Cpu.CORTEX_M7, 512, 8192, 600, True,
           "512 kB tightly coupled FlexRAM of 1 MB; 8 MB external flash on Teensy 4.1"),
    )
}


class UnknownMcuError(FirmwareError):
    """An MCU name is not in the catalog."""


def get_target(name: str) -> TargetSpec:
    """The catalog entry called `name` (case-insensitive)."""
    key = name.strip().lower()
    if key not in CATALOG:
        raise UnknownMcuError(
            f"unknown MCU {name!r}; known: {', '.join(sorted(CATALOG))}"
        )
    return CATALOG[key]


def custom_target(sram_bytes: int, flash_bytes: int, cpu: Cpu | str,
                  name: str = "custom") -> TargetSpec:
    """A target described by explicit sizes and core, checked against sane bounds."""
    core = Cpu(cpu) if isinstance(cpu, str) else cpu
    if not MIN_SRAM_BYTES <= sram_bytes <= MAX_SRAM_BYTES:
        raise FirmwareError(
            f"sram_bytes {sram_bytes} outside [{MIN_SRAM_BYTES}, {MAX_SRAM_BYTES}]"
        )
    if not MIN_FLASH_BYTES <= flash_bytes <= MAX_FLASH_BYTES:
        raise FirmwareError(
            f"flash_bytes {flash_bytes} outside [{MIN_FLASH_BYTES}, {MAX_FLASH_BYTES}]"
        )
    base = TargetSpec(name=name, vendor="custom", cpu=core, sram_bytes=sram_bytes,
                      flash_bytes=flash_bytes, clock_hz=0, fpu=False)
    return replace(base, bootloader_bytes=min(DEFAULT_BOOTLOADER_BYTES, flash_bytes // 8))


def parse_size(text: str | int) -> int:
    """Bytes from '256KiB', '256kB', '1MiB', '1MB' or '262144' (kB/MB are 1024-based)."""
    if isinstance(text, int):
        return text
    s = text.strip().replace(" ", "")
    units = {"kib": KIB, "kb": KIB, "k": KIB, "mib": MIB, "mb": MIB, "m": MIB, "b": 1, "": 1}
    num = s.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    unit = s[len(num):].lower()
    if unit not in units or not num:
        raise ValueError(f"not a size: {text!r} (use e.g. 262144, 256KiB, 1MiB)")
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (use e.g. 262144, 256KiB, 1MiB)") from None
    result = round(value * units[unit])
    if result <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return result
