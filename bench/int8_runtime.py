"""Instructions per MAC of the int8 kernels in QEMU: plain C vs the SMLAD (DSP) path.

Each kernel runs once on MobileNet-like shapes inside a Cortex-M image; SysTick under
`-icount shift=0` counts the instructions of that one call (firmware.toolchain.emulator), and the
output is checked bit-exact against firmware.int8.reference before a number is reported.

    .venv/bin/python -m bench.int8_runtime [--json]
"""

from __future__ import annotations

import argparse
import json
import struct
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from firmware.codegen.cformat import c_array
from firmware.int8 import reference as ref
from firmware.targets import Cpu, TargetSpec, custom_target
from firmware.toolchain.build import build_program
from firmware.toolchain.emulator import run_qemu, ticks_to_instructions


@dataclass(frozen=True)
class KernelCase:
    """One kernel call: a name, its C call, MACs, and the reference output."""

    name: str
    macs: int
    source: str  # C: const arrays + `static tf_status run(void)` + OUT_BYTES
    expected: bytes


@dataclass(frozen=True)
class Row:
    """One measured kernel on one build."""

    kernel: str
    build: str
    macs: int
    instructions: int
    instructions_per_mac: float
    bit_exact: bool


def _quant(rng: np.random.Generator, cout: int) -> ref.ConvQuant:
    return ref.ConvQuant(input_offset=int(rng.integers(-20, 20)),
                         output_offset=int(rng.integers(-20, 20)),
                         multiplier=rng.integers(2**30, 2**31 - 1, size=cout).astype(np.int32),
                         shift=rng.integers(-10, -6, size=cout).astype(np.int32))


def _common(x: np.ndarray, w: np.ndarray, b: np.ndarray, q: ref.ConvQuant, out_bytes: int,
            h: int, wd: int, c: int) -> str:
    return "".join([
        c_array("int8_t", "x", x), c_array("int8_t", "w", w), c_array("int32_t", "b", b),
        c_array("int32_t", "m", q.multiplier), c_array("int32_t", "s", q.shift),
        f"static const tf_conv_quant q = {{{q.input_offset}, {q.output_offset}, -128, 127, m, "
        "s};\n",
        f"static const tf_dims in = {{{h}, {wd}, {c}}};\n",
        f"#define OUT_BYTES {out_bytes}\n",
        "static int8_t y[OUT_BYTES];\nstatic int16_t buf[8192];\n",
    ])


def pointwise(h: int, w: int, cin: int, cout: int, seed: int = 0,
              fast: bool = False) -> KernelCase:
    """A 1x1 conv (tf_conv2d_1x1_s8, or with `fast` tf_conv2d_1x1_fast_s8)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, size=(h, w, cin)).astype(np.int8)
    wt = rng.integers(-127, 128, size=(cout, 1, 1, cin)).astype(np.int8)
    b = rng.integers(-1000, 1000, size=cout).astype(np.int32)
    q = _quant(rng, cout)
    want = ref.conv2d_s8(x, wt, b, q)
    src = _common(x, wt, b, q, want.size, h, w, cin) + (
        "static tf_status run(void)\n{\n"
        f"    return tf_conv2d_1x1{'_fast' if fast else ''}_s8(&in, x, {cout}, w, b, &q, y, buf);"
        "\n}\n")
    return KernelCase(f"1x1 conv {h}x{w}x{cin}->{cout}{' (specialized)' if fast else ''}",
                      h * w * cin * cout, src, want.tobytes())


def conv3x3(h: int, w: int, cin: int, cout: int, stride: int, seed: int = 1,
            fast: bool = False, rgb: bool = False) -> KernelCase:
    """A dense 3x3 conv with padding 1 (tf_conv2d_s8, im2col; `fast`: tf_conv2d_fast_s8;
    `rgb`: tf_conv2d_rgb_s8, the RGB input layer's kernel)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, size=(h, w, cin)).astype(np.int8)
    wt = rng.integers(-127, 128, size=(cout, 3, 3, cin)).astype(np.int8)
    b = rng.integers(-1000, 1000, size=cout).astype(np.int32)
    q = _quant(rng, cout)
    want = ref.conv2d_s8(x, wt, b, q, (stride, stride), (1, 1, 1, 1))
    ho, wo, _ = want.shape
    variant, label = ("_rgb", " (RGB input)") if rgb else ("_fast", " (specialized)") if fast \
        else ("", "")
    src = _common(x, wt, b, q, want.size, h, w, cin) + (
        f"static const tf_window win = {{3, 3, {stride}, {stride}, 1, 1, 1, 1}};\n"
        f"static const tf_dims out = {{{ho}, {wo}, {cout}}};\n"
        "static tf_status run(void)\n{\n"
        f"    return tf_conv2d{variant}_s8(&in, x, &win, &out, w, b, &q, y, buf);"
        "\n}\n")
    return KernelCase(f"3x3 conv s{stride} {h}x{w}x{cin}->{cout}{label}",
                      ho * wo * 9 * cin * cout, src, want.tobytes())


def depthwise(h: int, w: int, c: int, seed: int = 2, k: int = 3, stride: int = 1,
              fast: bool = False) -> KernelCase:
    """A k x k depthwise conv, 'same' padding, in place: the generic tf_depthwise_conv2d_s8
    or, with `fast`, the specialized tf_depthwise_conv2d_fast_s8."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, size=(h, w, c)).astype(np.int8)
    wt = rng.integers(-127, 128, size=(k, k, c)).astype(np.int8)
    b = rng.integers(-1000, 1000, size=c).astype(np.int32)
    q = _quant(rng, c)
    p = k // 2
    pads = (p, p, p - (stride - 1), p - (stride - 1)) if stride == 2 else (p,) * 4
    want = ref.depthwise_conv2d_s8(x, wt, b, q, (stride, stride), pads)
    ho, wo, _ = want.shape
    fn = "tf_depthwise_conv2d_fast_s8" if fast else "tf_depthwise_conv2d_s8"
    src = _common(x, wt, b, q, want.size, h, w, c).replace(
        "static const int8_t x[", "static int8_t x[") + (
        f"static const tf_window win = {{{k}, {k}, {stride}, {stride}, "
        f"{', '.join(map(str, pads))}}};\n"
        f"static const tf_dims out = {{{ho}, {wo}, {c}}};\n"
        "static tf_status run(void)\n{\n"
        "    /* in place: the output overwrites x */\n"
        "    (void)y;\n"
        f"    return {fn}(&in, x, &win, &out, w, b, &q, x, (int8_t *)buf);\n"
        "}\n").replace("static int8_t y[OUT_BYTES];", "static int8_t y[1];")
    name = f"{k}x{k} depthwise{' s2' if stride == 2 else ''} {h}x{w}x{c} in place"
    return KernelCase(name + (" (specialized)" if fast else ""), ho * wo * c * k * k, src,
                      want.tobytes())


MAIN = r"""
int main(void)
{
    const uint64_t t0 = tf_clock_ticks();
    const tf_status st = run();
    const uint64_t ticks = tf_clock_ticks() - t0;
    if (st != TF_OK) {
        return 10 + (int)st;
    }
    if (tf_io_write("out.bin", &ticks, sizeof ticks) != 0 ||
        tf_io_append("out.bin", RESULT, OUT_BYTES) != 0) {
        return 3;
    }
    return 0;
}
"""


def measure(case: KernelCase, target: TargetSpec, dsp: bool, work: Path) -> Row:
    """Build the case for one target and path, run it in QEMU, return its Row."""
    result = "x" if "depthwise" in case.name else "y"
    src = work / "bench.c"
    src.write_text("#include <stdint.h>\n#include \"tinyfleet_nn.h\"\n"
                   "#include \"tinyfleet_platform.h\"\n" + case.source
                   + f"#define RESULT {result}\n" + MAIN)
    build = build_program([src], target, work / "build", dsp=dsp, stack_bytes=4096)
    run = run_qemu(build.elf_path, target, {}, ("out.bin",), timeout_s=60)
    if run.exit_code != 0:
        raise RuntimeError(f"{case.name}: exit {run.exit_code} {run.console[-300:]}")
    data = run.files["out.bin"]
    (ticks,) = struct.unpack_from("<Q", data)
    instructions = ticks_to_instructions(ticks, target)
    label = f"{target.cpu.value} {'SMLAD' if build.dsp else 'plain C'}"
    return Row(case.name, label, case.macs, instructions, instructions / case.macs,
               data[8:] == case.expected)


def main() -> None:
    """Measure every kernel on M4 plain, M4 SMLAD and M7 SMLAD; print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", default="", help="run the kernels whose name contains this")
    parser.add_argument("--m7", action="store_true", help="the M7 SMLAD build only")
    args = parser.parse_args()
    cases = [pointwise(28, 28, 16, 96), pointwise(28, 28, 32, 64), pointwise(14, 14, 96, 24),
             pointwise(14, 14, 192, 32), conv3x3(32, 32, 3, 16, 2),
             depthwise(72, 72, 16), depthwise(28, 28, 48),
             pointwise(28, 28, 16, 96, fast=True), pointwise(28, 28, 32, 64, fast=True),
             pointwise(14, 14, 96, 24, fast=True), pointwise(14, 14, 192, 32, fast=True),
             conv3x3(32, 32, 3, 16, 2, fast=True), conv3x3(32, 32, 3, 16, 2, rgb=True),
             conv3x3(32, 32, 3, 16, 1, rgb=True),
             depthwise(72, 72, 16, fast=True), depthwise(28, 28, 48, fast=True),
             depthwise(28, 28, 48, stride=2, fast=True), depthwise(14, 14, 96, k=5, fast=True),
             depthwise(14, 14, 96, k=7, fast=True),
             # MobileNetV2 / MCUNet shapes: stride 2, small planes with many channels.
             depthwise(36, 36, 48, stride=2, fast=True), depthwise(9, 9, 192, fast=True),
             depthwise(6, 6, 120, k=5, fast=True), depthwise(3, 3, 224, k=5, fast=True),
             depthwise(2, 2, 448, k=5, fast=True), depthwise(2, 2, 672, fast=True),
             depthwise(5, 5, 336, k=7, fast=True)]
    cases = [case for case in cases if args.only in case.name]
    builds = [(Cpu.CORTEX_M4, False), (Cpu.CORTEX_M4, True), (Cpu.CORTEX_M7, True)]
    if args.m7:
        builds = [(Cpu.CORTEX_M7, True)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            for cpu, dsp in builds:
                target = custom_target(2 * 1024 * 1024, 4 * 1024 * 1024, cpu, name="bench")
                rows.append(measure(case, target, dsp, Path(tmp)))
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return
    print("| kernel | build | MACs | instructions | instr/MAC | bit-exact |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.kernel} | {r.build} | {r.macs:,} | {r.instructions:,} | "
              f"{r.instructions_per_mac:.2f} | {'yes' if r.bit_exact else 'NO'} |")


if __name__ == "__main__":
    main()
