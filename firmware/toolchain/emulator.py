"""Run Cortex-M firmware in QEMU (mps2 boards) with semihosting, always under a timeout.

Public functions:
- `run_qemu(elf, target, files_in, outputs, timeout_s)` -> `QemuRun`: boots the ELF on the
  target core's board (`mps2-an386` M4, `mps2-an500` M7, `mps2-an505` M33, `mps2-an385` M3)
  with `-semihosting-config enable=on,target=native -icount shift=0`, in a fresh directory
  holding `files_in`; returns the exit code (SYS_EXIT_EXTENDED), the wall time and the bytes
  of each file named in `outputs` that the firmware wrote. A run past `timeout_s` raises
  EmulationError (without semihosting a BKPT would hang QEMU forever).
- `run_firmware(elf, target, inputs)` -> `EmulationResult`: runs a generated model
  (firmware.codegen's main.c) on a batch of int8 inputs (N, H, W, C) and returns its int8
  outputs (N, classes), the exit code (checked: 0, or EmulationError naming it), the measured
  peak RAM, the instructions executed by inference and the wall time.

The model I/O protocol (little-endian, shared with firmware.codegen's main.c):
  input.bin:  "TFIN", u32 n, u32 input_bytes, then n images of input_bytes (HWC int8).
  output.bin: "TFOU", u32 n, u32 output_bytes, then n outputs, then the trailer
              "TFST", u32 status, u64 ticks, u32 arena_high_water, u32 scratch_high_water,
              u32 stack_high_water, u32 arena_bytes, u32 scratch_bytes, u32 static_bytes.
  Exit code 0, or 20 + tf_status when a kernel failed (the trailer is written either way).
Measured peak RAM = .data + .bss (static_bytes, from the linker's symbols) + the arena and
scratch high-water marks (the reset handler paints them; the highest byte that differs from
the paint bounds what a run touched) + the deepest stack use (painted likewise).

Instructions: with `-icount shift=0` each guest instruction advances virtual time by 1 ns,
and SysTick counts the board's core clock, so instructions = ticks * 1e9 / clock (40 per
tick on the 25 MHz mps2 boards): exact to within one tick, and reported as instructions,
not cycles (QEMU models no pipeline; DWT->CYCCNT reads 0).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from firmware.errors import EmulationError
from firmware.targets import TargetSpec

QEMU = "qemu-system-arm"
DEFAULT_TIMEOUT_S = 60.0
INPUT_MAGIC = b"TFIN"
OUTPUT_MAGIC = b"TFOU"
TRAILER_MAGIC = b"TFST"
TRAILER = struct.Struct("<4sIQIIIIII")
EXIT_HARD_FAULT = 127
EXIT_KERNEL_BASE = 20
EXIT_BAD_OVERLAY = 6  # main.c: an overlay in Flash that fails its checks

# The SysTick clock of each board (QEMU hw/arm/mps2.c, mps2-tz.c): the divisor from ticks to
# instructions under -icount shift=0. Boards come from firmware.targets (TargetSpec.qemu_board).
BOARD_CLOCK_HZ: dict[str, int] = {
    "mps2-an385": 25_000_000,
    "mps2-an386": 25_000_000,
    "mps2-an500": 25_000_000,
    "mps2-an505": 20_000_000,
}


@dataclass(frozen=True)
class QemuRun:
    """What one QEMU run left: exit code, files written, console text, wall time."""

    exit_code: int
    files: Mapping[str, bytes]
    console: str
    wall_s: float


@dataclass(frozen=True)
class EmulationResult:
    """A model run in QEMU: its outputs and what it cost."""

    outputs: npt.NDArray[np.int8]  # (N, output bytes per image)
    exit_code: int
    peak_ram_bytes: int  # static + arena high water + scratch high water + stack
    static_ram_bytes: int  # .data + .bss + the arena and scratch (all static RAM)
    static_other_bytes: int  # .data + .bss, the arena and scratch not included
    arena_used_bytes: int
    arena_bytes: int
    scratch_used_bytes: int
    scratch_bytes: int
    stack_bytes: int
    instructions: int  # all N inferences (tf_model_run, its row-by-row input reads included)
    wall_s: float

    @property
    def instructions_per_image(self) -> int:
        """Instructions of one inference (the mean over the batch)."""
        return self.instructions // max(len(self.outputs), 1)


def board_for(target: TargetSpec) -> tuple[str, int]:
    """(QEMU machine, SysTick clock Hz) for the target's core; EmulationError if none."""
    board = target.qemu_board
    if board is None or board not in BOARD_CLOCK_HZ:
        raise EmulationError(f"no QEMU board for {target.name} ({target.cpu.value}); "
                             f"supported boards: {', '.join(sorted(BOARD_CLOCK_HZ))}")
    return board, BOARD_CLOCK_HZ[board]


def ticks_to_instructions(ticks: int, target: TargetSpec) -> int:
    """Instructions executed during `ticks` SysTick ticks under -icount shift=0."""
    _, clock_hz = board_for(target)
    return ticks * 1_000_000_000 // clock_hz


def run_qemu(elf: Path, target: TargetSpec, files_in: Mapping[str, bytes] | None = None,
             outputs: Sequence[str] = (), timeout_s: float = DEFAULT_TIMEOUT_S,
             flash: Mapping[int, bytes] | None = None) -> QemuRun:
    """Boot `elf` on the target's board in a scratch directory; see the module docstring.

    `flash` maps addresses to bytes written there after the ELF is loaded (QEMU's generic
    loader, raw): e.g. a weights overlay in its Flash region.
    """
    if shutil.which(QEMU) is None:
        raise EmulationError(f"{QEMU} not found on PATH")
    board, _ = board_for(target)
    with tempfile.TemporaryDirectory(prefix="tf-qemu-") as tmp:
        work = Path(tmp)
        for name, data in (files_in or {}).items():
            (work / name).write_bytes(data)
        loads = []
        for n, (address, data) in enumerate(sorted((flash or {}).items())):
            blob = work / f".flash-{n}.bin"
            blob.write_bytes(data)
            loads += ["-device", f"loader,file={blob},addr={address:#x},force-raw=on"]
        cmd = [QEMU, "-M", board, "-nographic", "-monitor", "none", "-serial", "none",
               "-semihosting-config", "enable=on,target=native", "-icount", "shift=0",
               "-kernel", str(Path(elf).resolve()), *loads]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=work, capture_output=True, timeout=timeout_s,
                                  check=False)
        except subprocess.TimeoutExpired as exc:
            raise EmulationError(
                f"{Path(elf).name} on {board} ran past the {timeout_s:g} s timeout"
            ) from exc
        wall_s = time.perf_counter() - start
        got = {name: (work / name).read_bytes() for name in outputs if (work / name).exists()}
    console = (proc.stdout + proc.stderr).decode(errors="replace")
    return QemuRun(exit_code=proc.returncode, files=MappingProxyType(got), console=console,
                   wall_s=wall_s)


def encode_inputs(inputs: npt.NDArray[np.int8]) -> bytes:
    """input.bin for a batch (N, H, W, C) of int8 images."""
    batch = np.ascontiguousarray(inputs, dtype=np.int8)
    n = batch.shape[0]
    per = int(np.prod(batch.shape[1:]))
    return INPUT_MAGIC + struct.pack("<II", n, per) + batch.tobytes()


def decode_outputs(data: bytes, n: int) -> tuple[npt.NDArray[np.int8], tuple[int, ...]]:
    """(outputs (N, bytes), trailer fields) from output.bin; EmulationError if malformed."""
    if len(data) < 12 or data[:4] != OUTPUT_MAGIC:
        raise EmulationError(f"output.bin malformed ({len(data)} bytes, header {data[:4]!r})")
    count, per = struct.unpack_from("<II", data, 4)
    body_end = 12 + count * per
    if count != n or len(data) != body_end + TRAILER.size:
        raise EmulationError(f"output.bin holds {count} outputs of {per} bytes in {len(data)} "
                             f"bytes; expected {n} outputs and a {TRAILER.size}-byte trailer")
    outputs = np.frombuffer(data[12:body_end], dtype=np.int8).reshape(count, per).copy()
    trailer = TRAILER.unpack_from(data, body_end)
    if trailer[0] != TRAILER_MAGIC:
        raise EmulationError(f"output.bin trailer magic {trailer[0]!r} != {TRAILER_MAGIC!r}")
    return outputs, tuple(int(v) for v in trailer[1:])


def run_firmware(elf: Path, target: TargetSpec, inputs: npt.NDArray[np.int8],
                 static_ram_bytes: int | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S,
                 flash: Mapping[int, bytes] | None = None) -> EmulationResult:
    """Run a generated model on a batch of int8 HWC inputs in QEMU; checked exit code 0.

    The firmware reports its own static RAM; `static_ram_bytes` (BuildResult.ram_bytes) is
    accepted for callers that pass it and only checked against that report.
    """
    if inputs.ndim != 4 or inputs.dtype != np.int8:
        raise EmulationError(f"inputs must be int8 (N, H, W, C), got {inputs.dtype} "
                             f"{inputs.shape}")
    run = run_qemu(elf, target, {"input.bin": encode_inputs(inputs)}, ("output.bin",),
                   timeout_s, flash)
    if run.exit_code != 0:
        why = " (hard fault)" if run.exit_code == EXIT_HARD_FAULT else ""
        if run.exit_code == EXIT_BAD_OVERLAY:
            why = " (the weights overlay in Flash is torn or for another build)"
        if run.exit_code > EXIT_KERNEL_BASE and run.exit_code < EXIT_HARD_FAULT - 1:
            why = f" (a kernel returned tf_status {run.exit_code - EXIT_KERNEL_BASE})"
        raise EmulationError(f"{Path(elf).name} on {target.name} exited with code "
                             f"{run.exit_code}{why}, expected 0; console: {run.console[-500:]}")
    if "output.bin" not in run.files:
        raise EmulationError(f"{Path(elf).name} exited 0 but wrote no output.bin")
    outputs, trailer = decode_outputs(run.files["output.bin"], inputs.shape[0])
    (status, ticks, arena_hw, scratch_hw, stack_hw, arena_bytes, scratch_bytes,
     static_other) = trailer
    if status != 0:
        raise EmulationError(f"model returned kernel status {status} (tf_status)")
    total_static = static_other + arena_bytes + scratch_bytes
    if static_ram_bytes is not None and static_ram_bytes < total_static:
        raise EmulationError(f"firmware reports {total_static} bytes of static RAM, the "
                             f"build {static_ram_bytes}: is this the ELF that was built?")
    return EmulationResult(
        outputs=outputs, exit_code=run.exit_code,
        peak_ram_bytes=static_other + arena_hw + scratch_hw + stack_hw,
        static_ram_bytes=total_static, static_other_bytes=static_other,
        arena_used_bytes=arena_hw, arena_bytes=arena_bytes,
        scratch_used_bytes=scratch_hw, scratch_bytes=scratch_bytes, stack_bytes=stack_hw,
        instructions=ticks_to_instructions(ticks, target), wall_s=run.wall_s,
    )
