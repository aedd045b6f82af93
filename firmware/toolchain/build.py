"""Compile the C runtime and generated models: host gcc builds and Cortex-M cross builds.

Public functions:
- `build_host_library(out_dir, dsp=False)` -> Path of a shared library with every kernel
  (`tf_*` symbols of firmware/runtime/include/tinyfleet_nn.h), for ctypes and the device
  agent's host backend.
- `build_host_program(sources, out_dir, name)` -> Path of a host executable linking the
  kernels, the host platform layer and `sources` (e.g. a generated model and its main.c).
- `build_firmware(model_c_dir, target, layout=OtaLayout.AB, out_dir=None, dsp=True,
  extra_sources=(), stack_bytes=None)` -> `BuildResult`: every .c file of `model_c_dir` (a
  generated model: model.c, model.h, main.c) plus the runtime cross-compiled with
  arm-none-eabi-gcc for the target's core, linked with a script generated from the target
  (FLASH = one OTA slot at 0x0, RAM = the SRAM at 0x20000000 (M33: their secure aliases
  0x10000000 / 0x38000000), `stack_bytes` kept free for the stack: by default the stack
  figure of the SRAM account, `firmware.plan.account`). Cores: M0+, M3, M4, M7, M33. A model
  that does not fit raises `LinkOverflowError` (a `BuildError`) carrying the linker's
  numbers. The image's stack is bounded from gcc's call graph (`firmware.toolchain.stack`):
  a bound above the reserved stack is a BuildError (the account would under-count).
  `BuildResult` holds the ELF and raw binary paths, the size of every section and the bound.
- `build_program(sources, target, out_dir, ...)`: the same for arbitrary sources (tests).

Flags: always `-Wall -Wextra -Werror -std=c11`; Cortex-M4/M7/M33 builds use the SMLAD path
unless `dsp=False` (which defines TF_NO_DSP). Floats use the soft ABI: the kernels have none.
This module and `firmware.toolchain.emulator` are the only ones in `firmware` that run processes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from firmware.errors import BuildError
from firmware.plan.account import runtime_footprint
from firmware.targets import KIB, Cpu, OtaLayout, TargetSpec
from firmware.toolchain.stack import StackBound, read_callgraph, stack_bound

RUNTIME_DIR = Path(__file__).resolve().parents[1] / "runtime"
INCLUDE_DIR = RUNTIME_DIR / "include"
SRC_DIR = RUNTIME_DIR / "src"
WARNINGS = ("-Wall", "-Wextra", "-Werror", "-std=c11")
HOST_CC = "gcc"
ARM_CC = "arm-none-eabi-gcc"
ARM_OBJCOPY = "arm-none-eabi-objcopy"
ARM_SIZE = "arm-none-eabi-size"
FLASH_ORIGIN = 0x0000_0000
RAM_ORIGIN = 0x2000_0000
# The M33 board (mps2-an505) boots in the Secure state: code and RAM at the secure aliases of
# its SSRAM (the addresses at 0x0 / 0x20000000 are Non-secure there and fault).
_SECURE_ORIGINS = {Cpu.CORTEX_M33: (0x1000_0000, 0x3800_0000)}
COMPILE_TIMEOUT_S = 120.0
PLATFORM_SOURCES = ("tf_platform_host.c", "tf_semihost.c", "tf_startup_cm.c")
FLASH_SECTIONS = (".isr_vector", ".text", ".ARM.exidx", ".data")
RAM_SECTIONS = (".data", ".bss", ".noinit")
STATIC_SECTIONS = (".data", ".bss")
# Stack reserved for arbitrary programs (kernel test runners); models get the account's.
PROGRAM_STACK_BYTES = 16 * KIB

_CPU_FLAGS: dict[Cpu, tuple[str, ...]] = {
    Cpu.CORTEX_M0PLUS: ("-mcpu=cortex-m0plus",),
    Cpu.CORTEX_M3: ("-mcpu=cortex-m3",),
    Cpu.CORTEX_M4: ("-mcpu=cortex-m4", "-mfloat-abi=soft"),
    Cpu.CORTEX_M7: ("-mcpu=cortex-m7", "-mfloat-abi=soft"),
    Cpu.CORTEX_M33: ("-mcpu=cortex-m33", "-mfloat-abi=soft"),
}
_OVERFLOW = re.compile(r"region `(\w+)' overflowed by (\d+) bytes")


@dataclass(frozen=True)
class BuildResult:
    """A linked Cortex-M image and its sizes (bytes per section, as arm-none-eabi-size -A)."""

    elf_path: Path
    bin_path: Path
    target: TargetSpec
    dsp: bool
    sections: Mapping[str, int]
    flash_bytes: int  # vectors + code + const data + .data initialisers
    ram_bytes: int  # .data + .bss + .noinit (static RAM, the stack not included)
    slot_bytes: int  # the FLASH region's length (one OTA slot)
    stack_reserve_bytes: int = 0  # what the linker script keeps free for the stack
    stack_bound: StackBound | None = None  # from gcc's call graph (models; None otherwise)

    @property
    def static_bytes(self) -> int:
        """.data + .bss: static RAM besides the .noinit arena and scratch."""
        return sum(self.sections.get(s, 0) for s in STATIC_SECTIONS)

    def size_report(self) -> str:
        """One line per section, then the Flash and RAM totals against the target."""
        lines = [f"{name:<14}{size:>10}" for name, size in self.sections.items()]
        lines.append(f"{'flash':<14}{self.flash_bytes:>10} of {self.slot_bytes} (OTA slot)")
        lines.append(f"{'ram':<14}{self.ram_bytes:>10} of {self.target.sram_bytes} (SRAM)")
        return "\n".join(lines)


class LinkOverflowError(BuildError):
    """The image does not fit the target: `overflow_bytes` per linker region (FLASH, RAM)."""

    def __init__(self, message: str, overflow_bytes: Mapping[str, int],
                 region_bytes: Mapping[str, int]) -> None:
        super().__init__(message)
        self.overflow_bytes = MappingProxyType(dict(overflow_bytes))
        self.region_bytes = MappingProxyType(dict(region_bytes))


def kernel_sources() -> tuple[Path, ...]:
    """The runtime's kernel sources (no platform layer)."""
    return tuple(p for p in sorted(SRC_DIR.glob("tf_*.c")) if p.name not in PLATFORM_SOURCES)


def missing_toolchain(cpu: Cpu) -> str | None:
    """Why no image can be built for `cpu` here (no compiler for the core), or None."""
    if cpu in _CPU_FLAGS:
        return None
    return (f"no toolchain for {cpu.value}: firmware is built with {ARM_CC}, for Arm "
            f"Cortex-M cores only; not built, not emulated")


def cpu_flags(cpu: Cpu) -> tuple[str, ...]:
    """arm-none-eabi-gcc flags for a core; BuildError for cores it cannot build."""
    if cpu not in _CPU_FLAGS:
        raise BuildError(f"no arm-none-eabi-gcc build for cpu {cpu.value} "
                         f"(supported: {', '.join(c.value for c in _CPU_FLAGS)})")
    return ("-mthumb", *_CPU_FLAGS[cpu])


def _run(cmd: Sequence[str], what: str, cwd: Path | None = None) -> str:
    if shutil.which(cmd[0]) is None:
        raise BuildError(f"{what}: compiler {cmd[0]!r} not found on PATH")
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, cwd=cwd,
                              timeout=COMPILE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"{what}: {cmd[0]} ran past {COMPILE_TIMEOUT_S:.0f} s") from exc
    if proc.returncode != 0:
        raise BuildError(f"{what} failed ({cmd[0]} exit {proc.returncode}):\n"
                         f"{proc.stderr.strip()[-4000:]}")
    return proc.stdout


def _defines(defines: Mapping[str, str | int] | None) -> list[str]:
    return [f"-D{k}" if v == "" else f"-D{k}={v}" for k, v in (defines or {}).items()]


def build_host_library(out_dir: Path, dsp: bool = False, name: str = "libtinyfleet_nn.so",
                       extra_sources: Iterable[Path] = ()) -> Path:
    """Compile the kernels (plus `extra_sources`) into a host shared library; its path."""
    del dsp  # the host has no SMLAD; kept so that callers can pass the target's setting
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / name
    cmd = [HOST_CC, "-O2", "-shared", "-fPIC", *WARNINGS, f"-I{INCLUDE_DIR}",
           *map(str, kernel_sources()), *map(str, extra_sources), "-o", str(out)]
    _run(cmd, f"host build of {name}")
    return out


def build_host_program(sources: Iterable[Path], out_dir: Path, name: str = "runner",
                       include_dirs: Iterable[Path] = (),
                       defines: Mapping[str, str | int] | None = None) -> Path:
    """Compile `sources` with the kernels and the stdio platform layer into a host program."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / name
    cmd = [HOST_CC, "-O2", *WARNINGS, f"-I{INCLUDE_DIR}",
           *(f"-I{d}" for d in include_dirs), *_defines(defines),
           *map(str, kernel_sources()), str(SRC_DIR / "tf_platform_host.c"),
           *map(str, sources), "-o", str(out)]
    _run(cmd, f"host build of {name}")
    return out


def memory_origins(cpu: Cpu) -> tuple[int, int]:
    """(FLASH origin, RAM origin): 0x0 / 0x20000000, the M33's secure aliases on its board."""
    return _SECURE_ORIGINS.get(cpu, (FLASH_ORIGIN, RAM_ORIGIN))


def overlay_address(target: TargetSpec, layout: OtaLayout, overlay_bytes: int) -> int:
    """Where a slot's weights overlay region starts: its last `overlay_bytes` of Flash."""
    flash_origin, _ = memory_origins(target.cpu)
    return flash_origin + target.slot_bytes(layout) - overlay_bytes


def linker_script(target: TargetSpec, layout: OtaLayout = OtaLayout.AB,
                  stack_bytes: int | None = None, overlay_bytes: int = 0) -> str:
    """The GNU ld script for a target: FLASH = one OTA slot at 0x0, RAM = SRAM at 0x20000000.

    (Cortex-M33: 0x10000000 and 0x38000000, see `memory_origins`.)

    `stack_bytes` (default PROGRAM_STACK_BYTES) is reserved at the top of RAM so that an
    image leaving less than that for the stack fails to link. `overlay_bytes` at the end of
    the slot are kept out of FLASH for the weights overlay (firmware.codegen.overlay).
    """
    stack = PROGRAM_STACK_BYTES if stack_bytes is None else stack_bytes
    slot = target.slot_bytes(layout) - overlay_bytes
    flash_origin, ram_origin = memory_origins(target.cpu)
    return f"""/* Generated by firmware.toolchain.build for {target.name} ({target.cpu.value}). */
MEMORY
{{
  FLASH (rx)  : ORIGIN = {flash_origin:#010x}, LENGTH = {slot}
  RAM   (rwx) : ORIGIN = {ram_origin:#010x}, LENGTH = {target.sram_bytes}
}}
ENTRY(Reset_Handler)
SECTIONS
{{
  .isr_vector : {{ KEEP(*(.isr_vector)) }} > FLASH
  .text : {{ *(.text*) *(.rodata*) . = ALIGN(4); }} > FLASH
  .ARM.exidx : {{ *(.ARM.exidx*) }} > FLASH
  _sidata = LOADADDR(.data);
  .data : {{ _sdata = .; *(.data*) . = ALIGN(4); _edata = .; }} > RAM AT > FLASH
  .bss (NOLOAD) : {{ _sbss = .; *(.bss*) *(COMMON) . = ALIGN(4); _ebss = .; }} > RAM
  .noinit (NOLOAD) : {{ __noinit_start = .; *(.noinit*) . = ALIGN(4); __noinit_end = .; }} > RAM
  .stack (NOLOAD) : {{ . = ALIGN(8); __stack_reserve = .; . = . + {stack}; }} > RAM
  _estack = ORIGIN(RAM) + LENGTH(RAM);
  /DISCARD/ : {{ *(.ARM.attributes) *(.comment) }}
}}
"""


def _section_sizes(elf: Path) -> dict[str, int]:
    out = _run([ARM_SIZE, "-A", str(elf)], f"size report of {elf.name}")
    sizes: dict[str, int] = {}
    for line in out.splitlines():
        parts = line.split()
        if (len(parts) >= 2 and parts[0].startswith(".") and parts[1].isdigit()
                and not parts[0].startswith((".debug", ".stack"))):
            sizes[parts[0]] = int(parts[1])
    return sizes


def _overflow_error(stderr: str, target: TargetSpec, slot_bytes: int) -> LinkOverflowError:
    overflow = {m.group(1): int(m.group(2)) for m in _OVERFLOW.finditer(stderr)}
    regions = {"FLASH": slot_bytes, "RAM": target.sram_bytes}
    parts = [f"{name} overflowed by {n} bytes ({name} region {regions.get(name, 0)} bytes)"
             for name, n in sorted(overflow.items())]
    return LinkOverflowError(f"image does not fit {target.name}: " + "; ".join(parts),
                             overflow, regions)


def build_program(sources: Iterable[Path], target: TargetSpec, out_dir: Path,
                  name: str = "firmware", layout: OtaLayout = OtaLayout.AB, dsp: bool = True,
                  include_dirs: Iterable[Path] = (), opt: str = "-O2",
                  defines: Mapping[str, str | int] | None = None,
                  stack_bytes: int | None = None, analyze_stack: bool = False,
                  overlay_bytes: int = 0) -> BuildResult:
    """Cross-compile `sources` + runtime + start-up for the target; a BuildResult.

    With `analyze_stack` the image's stack is bounded from gcc's call graph and a bound above
    the reserved stack raises BuildError.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    ld = out_dir / f"{name}.ld"
    reserve = PROGRAM_STACK_BYTES if stack_bytes is None else stack_bytes
    ld.write_text(linker_script(target, layout, reserve, overlay_bytes))
    if overlay_bytes:
        defines = {**(defines or {}),
                   "TF_OVERLAY_ADDR": f"{overlay_address(target, layout, overlay_bytes):#x}u",
                   "TF_OVERLAY_REGION_BYTES": f"{overlay_bytes}u"}
    elf = out_dir / f"{name}.elf"
    for stale in out_dir.glob(f"{name}.elf-*.ci"):
        stale.unlink()
    use_dsp = dsp and target.cpu.has_dsp
    cmd = [ARM_CC, *cpu_flags(target.cpu), opt, *WARNINGS, "-ffunction-sections",
           *(["-fcallgraph-info=su"] if analyze_stack else []),
           "-fdata-sections", "-nostartfiles", "--specs=nano.specs", "--specs=nosys.specs",
           f"-T{ld}", "-Wl,--gc-sections", f"-I{INCLUDE_DIR}",
           *(f"-I{d}" for d in include_dirs), *_defines(defines),
           *([] if use_dsp else ["-DTF_NO_DSP"]),
           *map(str, kernel_sources()), str(SRC_DIR / "tf_semihost.c"),
           str(SRC_DIR / "tf_startup_cm.c"), *map(str, sources), "-o", str(elf)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S,
                          check=False) if shutil.which(ARM_CC) else None
    if proc is None:
        raise BuildError(f"cross build of {name}: {ARM_CC!r} not found on PATH")
    slot = target.slot_bytes(layout) - overlay_bytes
    if proc.returncode != 0:
        if _OVERFLOW.search(proc.stderr):
            raise _overflow_error(proc.stderr, target, slot)
        raise BuildError(f"cross build of {name} for {target.name} failed:\n"
                         f"{proc.stderr.strip()[-4000:]}")
    bin_path = out_dir / f"{name}.bin"
    _run([ARM_OBJCOPY, "-O", "binary", str(elf), str(bin_path)], f"objcopy of {name}")
    sections = _section_sizes(elf)
    bound = None
    if analyze_stack:
        bound = stack_bound(read_callgraph(sorted(out_dir.glob(f"{name}.elf-*.ci"))))
        if bound.total_bytes > reserve:
            raise BuildError(
                f"{name} for {target.name}: the stack may reach {bound.total_bytes} B "
                f"({bound.describe()}), more than the {reserve} B reserved for it")
    return BuildResult(
        elf_path=elf, bin_path=bin_path, target=target, dsp=use_dsp,
        sections=MappingProxyType(sections),
        flash_bytes=sum(sections.get(s, 0) for s in FLASH_SECTIONS),
        ram_bytes=sum(sections.get(s, 0) for s in RAM_SECTIONS),
        slot_bytes=slot, stack_reserve_bytes=reserve, stack_bound=bound,
    )


def build_firmware(model_c_dir: Path, target: TargetSpec, layout: OtaLayout = OtaLayout.AB,
                   out_dir: Path | None = None, dsp: bool = True,
                   extra_sources: Iterable[Path] = (),
                   stack_bytes: int | None = None, overlay_bytes: int = 0) -> BuildResult:
    """Cross-compile a generated model directory (model.c, model.h, main.c) for a target.

    The stack reserve defaults to the SRAM account's stack figure for the target's core; the
    image's call-graph bound must not exceed it. `overlay_bytes` (a model generated with a
    weights overlay) are reserved at the end of the slot; main.c finds the overlay there.
    """
    sources = sorted(model_c_dir.glob("*.c"))
    if not sources:
        raise BuildError(f"no .c files in {model_c_dir}")
    stack = runtime_footprint(target.cpu).stack_bytes if stack_bytes is None else stack_bytes
    return build_program([*sources, *extra_sources], target, out_dir or model_c_dir / "build",
                         name="firmware", layout=layout, dsp=dsp, include_dirs=[model_c_dir],
                         stack_bytes=stack, analyze_stack=True, overlay_bytes=overlay_bytes)


HOST_MODEL_SOURCE = RUNTIME_DIR / "host" / "tf_model_host.c"


def build_host_model(model_c_dir: Path, out_dir: Path, name: str = "model.so") -> Path:
    """A generated model (model.c, model.h) as a host shared library for ctypes.

    It exports `tf_host_run(input, output)` (one HWC int8 image in, the outputs out; the
    tf_status) and `tf_host_use_overlay(overlay, nbytes)` (firmware/runtime/host/
    tf_model_host.c), beside the kernels. The same C the cross build compiles, built with
    the host gcc: the device agent's `host` backend loads it.
    """
    if not (model_c_dir / "model.c").is_file():
        raise BuildError(f"no model.c in {model_c_dir}")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / name
    has_overlay = "tf_model_use_overlay" in (model_c_dir / "model.h").read_text()
    cmd = [HOST_CC, "-O2", "-shared", "-fPIC", *WARNINGS, f"-I{INCLUDE_DIR}",
           f"-I{model_c_dir}", *(["-DTF_HAS_OVERLAY"] if has_overlay else []),
           *map(str, kernel_sources()), str(model_c_dir / "model.c"),
           str(HOST_MODEL_SOURCE), "-o", str(out)]
    _run(cmd, f"host build of {name}")
    return out
