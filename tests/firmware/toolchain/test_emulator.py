"""firmware.toolchain.emulator: QEMU runs with semihosting: exit codes, files, timeout, counters."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from firmware.targets import get_target
from firmware.toolchain.build import BuildResult, build_program
from firmware.toolchain.emulator import EmulationError, run_qemu, ticks_to_instructions

pytestmark = pytest.mark.toolchain

PROGRAM = r"""
#include <stdint.h>
#include <string.h>
#include "tinyfleet_platform.h"

static uint8_t region[4096] TF_NOINIT;

static uint32_t deep(uint32_t n)
{
    volatile uint8_t frame[2048];
    memset((void *)frame, 1, sizeof frame);
    return frame[n % 2048];
}

int main(void)
{
    uint8_t in[16];
    int32_t got = tf_io_read("in.bin", in, sizeof in);
    if (got < 1) {
        return 2;
    }
    if (in[0] == 1) {
        for (;;) {
        }
    }
    if (in[0] == 2) {
        return *(volatile int32_t *)0xFFFFFFF0u; /* bus fault -> hard fault handler */
    }
    memset(region, 7, 100);
    uint32_t n = 1000000;
    const uint64_t t0 = tf_clock_ticks();
    __asm__ volatile("1: subs %0, %0, #1\n bne 1b\n" : "+r"(n)::"cc");
    const uint64_t ticks = tf_clock_ticks() - t0;
    uint32_t out[4] = {(uint32_t)ticks, tf_painted_high_water(region, sizeof region),
                       deep(in[1]), tf_stack_high_water()};
    if (tf_io_write("out.bin", out, sizeof out) != 0 || tf_io_append("out.bin", in, 4) != 0) {
        return 3;
    }
    return 40 + in[0];
}
"""


@pytest.fixture(scope="module", params=["stm32f412", "stm32f746", "stm32u585"])
def program(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
            ) -> BuildResult:
    tmp = tmp_path_factory.mktemp(request.param)
    src = tmp / "main.c"
    src.write_text(PROGRAM)
    return build_program([src], get_target(request.param), tmp / "out")


def test_exit_code_files_counters_and_high_water_marks(program: BuildResult) -> None:
    run = run_qemu(program.elf_path, program.target, {"in.bin": bytes([0, 5, 0, 0])},
                   ("out.bin",), timeout_s=20)
    assert run.exit_code == 40
    ticks, region_used, _, stack_used = struct.unpack("<4I", run.files["out.bin"][:16])
    assert run.files["out.bin"][16:] == bytes([0, 5, 0, 0])  # appended, not overwritten
    # The loop is exactly 2,000,000 instructions (subs + bne per iteration).
    assert abs(ticks_to_instructions(ticks, program.target) - 2_000_000) < 2_000_000 * 0.001
    assert region_used == 100
    assert 2048 <= stack_used < 2048 + 512


def test_exit_codes_of_faults_and_other_returns(program: BuildResult) -> None:
    assert run_qemu(program.elf_path, program.target, {"in.bin": b"\x02"}).exit_code == 127
    assert run_qemu(program.elf_path, program.target, {}).exit_code == 2  # no in.bin


def test_a_hung_program_is_stopped_at_the_timeout(program: BuildResult) -> None:
    with pytest.raises(EmulationError, match=r"timeout"):
        run_qemu(program.elf_path, program.target, {"in.bin": b"\x01"}, timeout_s=1.5)


@pytest.mark.unit
def test_no_board_for_cores_qemu_cannot_emulate(tmp_path: Path) -> None:
    with pytest.raises(EmulationError, match="no QEMU board"):
        run_qemu(tmp_path / "x.elf", get_target("rp2040"))
