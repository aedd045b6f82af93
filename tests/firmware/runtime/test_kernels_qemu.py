"""C kernels cross-compiled for Cortex-M (plain and SMLAD paths) and run in QEMU, batched.

Each QEMU run executes a whole batch of Hypothesis-generated cases (one boot is ~50 ms), so
hundreds of kernel calls per build cost about a second.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from firmware.targets import Cpu, custom_target
from firmware.toolchain.build import BuildResult, build_program
from firmware.toolchain.emulator import run_qemu
from tests.firmware.runtime import kernel_cases as kc

pytestmark = pytest.mark.toolchain

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "m4-dsp": (Cpu.CORTEX_M4, True),
    "m4-plain": (Cpu.CORTEX_M4, False),
    "m7-dsp": (Cpu.CORTEX_M7, True),
    "m33-dsp": (Cpu.CORTEX_M33, True),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def runner(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> BuildResult:
    cpu, dsp = VARIANTS[request.param]
    target = custom_target(sram_bytes=2 * 1024 * 1024, flash_bytes=4 * 1024 * 1024, cpu=cpu,
                           name=f"test-{request.param}")
    return build_program([HERE / "kernel_runner.c", HERE / "kernel_runner_main.c"], target,
                         tmp_path_factory.mktemp(request.param), name="kernels", dsp=dsp,
                         stack_bytes=8192)


def run_batch(runner: BuildResult, cases: list[kc.Case]) -> list[tuple[int, bytes]]:
    run = run_qemu(runner.elf_path, runner.target, {"cases.bin": kc.encode(cases)},
                   ("results.bin",), timeout_s=30)
    assert run.exit_code == 0, f"runner exit {run.exit_code}: {run.console[-300:]}"
    return kc.decode(run.files["results.bin"], len(cases))


def test_the_dsp_build_really_uses_smlad(runner: BuildResult) -> None:
    import subprocess

    disasm = subprocess.run(["arm-none-eabi-objdump", "-d", str(runner.elf_path)],
                            capture_output=True, text=True, check=True).stdout
    assert ("smlad" in disasm) == runner.dsp


@settings(max_examples=8, deadline=None, phases=[Phase.generate],  # no shrinking: slow in QEMU
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(kc.any_case(max_hw=9, max_c=20), min_size=60, max_size=60))
def test_kernels_in_qemu_are_bit_exact_against_the_reference(runner: BuildResult,
                                                             cases: list[kc.Case]) -> None:
    for (status, got), case in zip(run_batch(runner, cases), cases, strict=True):
        assert status == 0, f"{case.name}: status {status}"
        assert got == case.expected, f"{case.name} ({runner.target.name}): differs"


@settings(max_examples=3, deadline=None, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(kc.dw_fast_case(), min_size=40, max_size=40))
def test_specialized_depthwise_in_qemu_is_bit_exact(runner: BuildResult,
                                                    cases: list[kc.Case]) -> None:
    for (status, got), case in zip(run_batch(runner, cases), cases, strict=True):
        assert status == 0, f"{case.name}: status {status}"
        assert got == case.expected, f"{case.name} ({runner.target.name}): differs"


def test_mobilenet_like_shapes_in_qemu(runner: BuildResult) -> None:
    cases = [kc.conv_case(60, 17, 15, 3, 16, 3, 2, (1, 1, 1, 1), fast=True),
             kc.conv_case(61, 9, 8, 5, 7, 3, 1, (1, 0, 1, 2), fast=True),
             *kc.rgb_conv_cases(),
             kc.conv_case(1, 20, 20, 3, 16, 3, 2, (1, 1, 1, 1)),
             kc.dw_case(2, 20, 20, 32, 3, 1, True), kc.dw_case(3, 20, 20, 32, 3, 2, True),
             *[kc.dw_case(20 + k + s, 19, 17, 20, k, s, True, fast=True)
               for k in (3, 5, 7) for s in (1, 2)],
             kc.dw_case(30, 12, 13, 24, 3, 1, True, fast=True, wide_quant=True),
             # MCUNet's small planes (smaller than the window) with many, odd channels, and
             # stride 2 with every padding: outputs in groups of four, three, two and one.
             kc.dw_case(31, 2, 2, 67, 5, 1, True, (2, 2, 2, 2), fast=True),
             kc.dw_case(32, 2, 2, 45, 3, 1, True, (1, 1, 1, 1), fast=True),
             kc.dw_case(33, 3, 3, 37, 7, 1, False, (3, 3, 3, 3), fast=True),
             *[kc.dw_case(34 + i, 9 + i, 11 - i, 13, 3, 2, True, pad, fast=True)
               for i, pad in enumerate([(0, 0, 0, 0), (1, 1, 1, 1), (1, 0, 0, 1), (0, 1, 1, 0)])],
             kc.pointwise_case(5, 10, 10, 16, 96, False),
             kc.pointwise_case(6, 10, 10, 96, 16, True), kc.pointwise_huge_bias_case(11),
             kc.pointwise_huge_bias_case(12, fast=True),
             *[kc.pointwise_case(40 + i, 7, 5, cin, cout, False, fast=True)
               # k = 12 and 4: an odd number of 4-deep steps (the unrolled loop's lone step);
               # odd channel counts and 35 pixels: the one-step loop of the last channel, pixel
               for i, (cin, cout) in enumerate([(16, 96), (32, 64), (96, 24), (19, 7), (12, 9),
                                                (4, 5)])],
             # the thin layers: cin 8 (even seed: full range, the asm channel-pair loop; odd:
             # ReLU), cout 8, shifts 1 and 22 (seeds divisible by 3), odd pixel counts
             *[kc.pointwise_case(seed, hh, ww, cin, cout, False, fast=True)
               for seed, hh, ww, cin, cout in [(60, 5, 7, 8, 48), (61, 6, 6, 8, 48),
                                               (63, 4, 4, 16, 8), (66, 3, 5, 48, 8),
                                               (69, 3, 3, 8, 2), (70, 5, 5, 8, 3)]],
             # fused add, full range: conv rows of 32 channel pairs, then a partial one
             kc.pointwise_case(72, 3, 3, 8, 70, True, fast=True),
             kc.pointwise_case(74, 3, 2, 16, 64, True, fast=True),
             kc.pointwise_case(57, 1, 1, 16, 24, False, fast=True),  # one column of buffer
             kc.pointwise_case(58, 1, 1, 16, 24, True, fast=True),
             *[kc.pointwise_case(50 + i, 5, 7, cin, cout, True, fast=True)
               for i, (cin, cout) in enumerate([(96, 16), (24, 8), (13, 5), (20, 6)])],
             kc.fc_case(7, 320, 10), kc.fc_case(8, 448, 7), kc.fc_case(9, 12, 1),
             kc.fc_case(10, 26, 5), kc.fc_case(11, 64, 6, huge_bias=True),
             kc.pool_case(8, 5, 5, 320, 0, 1, 0), kc.requant_case(9, 2048)]
    for (status, got), case in zip(run_batch(runner, cases), cases, strict=True):
        assert status == 0 and got == case.expected, case.name
