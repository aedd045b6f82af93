"""Compiler benchmark: predicted vs measured SRAM and Flash, layer-based vs patch-based.

    .venv/bin/python -m bench.compiler [--mcu stm32f746] [--json] [--quick]

Models (random He weights, calibrated on generated inputs: memory and instruction counts do
not depend on the weights' values):
- MobileNetV2 w0.35 r144, head scaled with the width (448 channels) as in the MCUNet model
  zoo's mbv2-w0.35, 1000 classes: the anchor is TinyEngine's published figure for it on the
  STM32F746 (308 kB SRAM, 862 kB Flash; MCUNetV2 paper / TinyEngine README).
- An MCUNet-style network: MobileNetV2-RD (receptive-field redistribution, MCUNetV2 Sec. 3.2)
  w0.35 r144, same head and classes.
Each is compiled end to end by firmware.pipeline (quantize, plan, generate C, arm-none-eabi-gcc,
QEMU, bit-exact check against the int8 reference, sign) with the OTA layout `single` (the
whole 1 MB Flash minus the bootloader: the AB slot of 496 kB cannot hold 862 kB), layer-based
(p = 1) and patch-based (the planner's choice), plus a plain-C (no SMLAD) build of one to
compare instructions per MAC.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from firmware.arch import make_divisible
from firmware.errors import DoesNotFitError
from firmware.frontend.builtin import build_graph, builtin_config
from firmware.image import generate_signing_key
from firmware.ir import Graph
from firmware.pipeline import CompileOptions, compile_model
from firmware.plan.patch import best_schedule
from firmware.targets import KIB, OtaLayout, get_target

TINYENGINE = {"sram_kb": 308, "flash_kb": 862}  # MobileNetV2 w0.35 r144 on STM32F746


def model(name: str, width: float = 0.35, resolution: int = 144) -> Graph:
    """A built-in network with the head scaled by the width (MCUNet model zoo convention)."""
    config = builtin_config(name, width, resolution)
    config = dataclasses.replace(config, head_channels=make_divisible(1280 * width),
                                 name=f"{config.name}-h{make_divisible(1280 * width)}")
    return build_graph(config)


def run_one(graph: Graph, mcu: str, patched: bool, dsp: bool = True) -> dict[str, Any]:
    """Compile one (model, schedule) and return the row's numbers (or why it did not fit).

    Layer-based is p = 1; patch-based is the planner's lowest-peak schedule (without a
    budget), which is what MCUNetV2 reports.
    """
    target = get_target(mcu)
    patches, split_after = 1, None
    if patched:
        schedule = best_schedule(graph).schedule
        patches, split_after = schedule.patches, schedule.split_after
    options = CompileOptions(patches=patches, split_after=split_after, layout=OtaLayout.SINGLE,
                             dsp=dsp, test_vectors=2, generated_calibration=8,
                             onnx_check=False)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-compiler-") as tmp:
        try:
            result = compile_model(graph, target, generate_signing_key(), Path(tmp),
                                   options=options)
        except DoesNotFitError as exc:
            return {"model": graph.name, "patches": patches, "dsp": dsp, "fits": False,
                    "error": str(exc)}
    r = result.report
    m = r["measured"]
    return {
        "model": graph.name, "mcu": mcu, "fits": True, "dsp": dsp,
        "patches": r["schedule"]["patches"], "split_after": r["schedule"]["split_after"],
        "predicted_sram_kb": r["predicted"]["sram_bytes"] / KIB,
        "measured_sram_kb": m["sram_bytes"] / KIB,
        "arena_used_kb": m["sram_breakdown"]["arena_used_bytes"] / KIB,
        "stack_kb": m["sram_breakdown"]["stack_bytes"] / KIB,
        "scratch_kb": m["sram_breakdown"]["scratch_used_bytes"] / KIB,
        "static_other_kb": m["sram_breakdown"]["static_other_bytes"] / KIB,
        "predicted_flash_kb": r["predicted"]["flash_bytes"] / KIB,
        "measured_flash_kb": m["flash_bytes"] / KIB,
        "macs": r["macs"], "instructions": r["instructions"],
        "instructions_per_mac": r["instructions_per_mac"], "bit_exact": r["bit_exact"],
        "compile_s": time.perf_counter() - start,
    }


def main() -> None:
    """Run the benchmark and print rows (markdown table or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mcu", default="stm32f746")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="MobileNetV2 patch-based only")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    mbv2 = model("mobilenetv2")
    plans: list[tuple[Graph, bool, bool]] = [(mbv2, True, True)]
    if not args.quick:
        rd = model("mobilenetv2-rd")
        plans += [(mbv2, False, True), (rd, False, True), (rd, True, True), (mbv2, True, False)]
    for graph, patches, dsp in plans:
        rows.append(run_one(graph, args.mcu, patches, dsp))
        if not args.json:
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        print(json.dumps({"tinyengine": TINYENGINE, "rows": rows}, indent=2))
        return
    print("\n| model | schedule | SRAM pred / meas (kB) | Flash pred / meas (kB) | "
          "instr/MAC | bit-exact |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        if not row["fits"]:
            print(f"| {row['model']} | p={row['patches']} | does not fit: {row['error']} | | | |")
            continue
        sched = "layer" if row["patches"] == 1 else f"{row['patches']}x{row['patches']} " \
            f"to {row['split_after']}"
        print(f"| {row['model']} | {sched}{'' if row['dsp'] else ' (plain C)'} | "
              f"{row['predicted_sram_kb']:.1f} / {row['measured_sram_kb']:.1f} | "
              f"{row['predicted_flash_kb']:.1f} / {row['measured_flash_kb']:.1f} | "
              f"{row['instructions_per_mac']:.2f} | {row['bit_exact']} |")


if __name__ == "__main__":
    main()
