"""firmware.toolchain.build: host and Cortex-M builds, linker scripts, size reports, overflow."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from firmware.targets import KIB, OtaLayout, get_target
from firmware.toolchain.build import (
    BuildError,
    LinkOverflowError,
    build_host_library,
    build_program,
    linker_script,
)

pytestmark = pytest.mark.toolchain

TRIVIAL = """
#include "tinyfleet_platform.h"
int main(void) { return 3; }
"""


def _src(tmp_path: Path, text: str, name: str = "main.c") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.unit
def test_linker_script_takes_its_sizes_from_the_target() -> None:
    f746 = get_target("stm32f746")
    script = linker_script(f746, OtaLayout.AB)
    assert f"LENGTH = {f746.slot_bytes(OtaLayout.AB)}" in script
    assert f"LENGTH = {320 * KIB}" in script
    assert "ORIGIN = 0x20000000" in script and "ORIGIN = 0x00000000" in script
    assert f"LENGTH = {f746.slot_bytes(OtaLayout.SINGLE)}" in linker_script(f746,
                                                                          OtaLayout.SINGLE)


@pytest.mark.parametrize("mcu", ["rp2040", "stm32f412", "stm32f746", "stm32u585"])
def test_trivial_program_builds_for_each_core(tmp_path: Path, mcu: str) -> None:
    result = build_program([_src(tmp_path, TRIVIAL)], get_target(mcu), tmp_path / "out")
    assert result.elf_path.exists() and result.bin_path.stat().st_size > 0
    assert result.sections[".isr_vector"] == 64
    assert result.flash_bytes == sum(result.sections.get(s, 0) for s in
                                     (".isr_vector", ".text", ".ARM.exidx", ".data"))
    assert result.dsp == get_target(mcu).dsp
    assert "flash" in result.size_report() and ".text" in result.size_report()


def test_weights_too_big_for_the_slot_fail_with_the_linkers_numbers(tmp_path: Path) -> None:
    f412 = get_target("stm32f412")  # 1 MB flash, A/B slots of 496 kB
    src = _src(tmp_path, """
const signed char weights[600 * 1024] = {1};
volatile int index_;
int main(void) { return weights[index_]; }
""")
    with pytest.raises(LinkOverflowError) as info:
        build_program([src], f412, tmp_path / "out")
    over = info.value.overflow_bytes["FLASH"]
    slot = f412.slot_bytes(OtaLayout.AB)
    assert 600 * KIB - slot < over < 600 * KIB - slot + 8 * KIB  # + code and vectors
    assert f"FLASH overflowed by {over} bytes" in str(info.value)
    assert str(slot) in str(info.value) and "stm32f412" in str(info.value)


def test_arena_too_big_for_sram_fails_with_the_linkers_numbers(tmp_path: Path) -> None:
    f412 = get_target("stm32f412")  # 256 kB SRAM, 16 kB kept for the stack
    src = _src(tmp_path, """
#include "tinyfleet_platform.h"
static signed char arena[250 * 1024] TF_NOINIT;
volatile int index_;
int main(void) { arena[index_] = 1; return arena[index_ + 1]; }
""")
    with pytest.raises(LinkOverflowError) as info:
        build_program([src], f412, tmp_path / "out")
    assert info.value.overflow_bytes["RAM"] >= 250 * KIB + 16 * KIB - 256 * KIB
    assert info.value.region_bytes["RAM"] == 256 * KIB


def test_warnings_are_errors(tmp_path: Path) -> None:
    src = _src(tmp_path, "int main(void) { int unused; return 0; }\n")
    with pytest.raises(BuildError, match="unused"):
        build_program([src], get_target("stm32f412"), tmp_path / "out")


def test_host_library_exports_every_kernel(tmp_path: Path) -> None:
    lib = ctypes.CDLL(str(build_host_library(tmp_path)))
    for name in ("tf_conv2d_s8", "tf_conv2d_1x1_s8", "tf_conv2d_1x1_add_s8",
                 "tf_depthwise_conv2d_s8", "tf_fully_connected_s8", "tf_add_s8",
                 "tf_avg_pool_s8", "tf_global_avg_pool_s8", "tf_patch_load_s8",
                 "tf_patch_store_s8", "tf_conv2d_get_buffer_size",
                 "tf_depthwise_conv2d_get_buffer_size"):
        assert hasattr(lib, name), name
