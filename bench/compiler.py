"""Compiler benchmark: predicted (the SRAM account) vs linked vs measured SRAM, and Flash.

    .venv/bin/python -m bench.compiler [--mcu stm32f746] [--json] [--quick] [--no-demo]

Models (random He weights, calibrated on generated inputs: memory and instruction counts do
not depend on the weights' values):
- MobileNetV2 w0.35 r144, head scaled with the width (448 channels) as in the MCUNet model
  zoo's mbv2-w0.35, 1000 classes: the anchor is TinyEngine's published figure for it on the
  STM32F746 (308 kB SRAM, 862 kB Flash; MCUNetV2 paper / TinyEngine README).
- An MCUNet-style network: MobileNetV2-RD (receptive-field redistribution, MCUNetV2 Sec. 3.2)
  w0.35 r144, same head and classes.
- MCUNet-10FPS (the MCUNet model zoo's block list, a built-in network), on an STM32H743.
- The demo's model (MobileNetV2 w0.35 r144, 10 classes, head 1280) for each hardware class of
  the demo fleet that QEMU can run, with the schedule the compiler picks for its SRAM.
Each is compiled end to end by firmware.pipeline (quantize, plan, generate C, arm-none-eabi-gcc,
QEMU, bit-exact check against the int8 reference, sign). The MobileNetV2 rows use the OTA
layout `single` (the whole 1 MB Flash minus the bootloader: the AB slot of 496 kB cannot hold
862 kB), layer-based (p = 1) and patch-based (the planner's lowest-peak choice), plus a
plain-C (no SMLAD) build of one to compare instructions per MAC.

Predicted SRAM is the account (`firmware.plan.account`: arena + scratch + static + stack);
linked is what the image claims (static data, .noinit, the stack reserve); measured is what
QEMU found touched (arena and scratch high water, painted stack, static data).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from firmware.arch import make_divisible, mobilenet_v2
from firmware.errors import DoesNotFitError
from firmware.frontend.builtin import build_graph, builtin_config
from firmware.image import generate_signing_key
from firmware.ir import Graph
from firmware.pipeline import CompileOptions, compile_model
from firmware.plan.patch import best_schedule
from firmware.targets import KIB, MIB, Cpu, OtaLayout, TargetSpec, custom_target, get_target

TINYENGINE = {"sram_kb": 308, "flash_kb": 862}  # MobileNetV2 w0.35 r144 on STM32F746


def model(name: str, width: float = 0.35, resolution: int = 144) -> Graph:
    """A built-in network with the head scaled by the width (MCUNet model zoo convention)."""
    config = builtin_config(name, width, resolution)
    config = dataclasses.replace(config, head_channels=make_divisible(1280 * width),
                                 name=f"{config.name}-h{make_divisible(1280 * width)}")
    return build_graph(config)


def run_one(graph: Graph, target: TargetSpec, patched: bool | None, dsp: bool = True,
            layout: OtaLayout = OtaLayout.SINGLE) -> dict[str, Any]:
    """Compile one (model, schedule) and return the row's numbers (or why it did not fit).

    `patched` True: the planner's lowest-peak schedule (what MCUNetV2 reports); False:
    layer-based; None: the compiler's own choice for the target's SRAM (as the demo does).
    """
    patches, split_after = (None, None) if patched is None else (1, None)
    if patched:
        schedule = best_schedule(graph).schedule
        patches, split_after = schedule.patches, schedule.split_after
    options = CompileOptions(patches=patches, split_after=split_after, layout=layout,
                             dsp=dsp, test_vectors=2, generated_calibration=8,
                             onnx_check=False)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-compiler-") as tmp:
        try:
            result = compile_model(graph, target, generate_signing_key(), Path(tmp),
                                   options=options)
        except DoesNotFitError as exc:
            return {"model": graph.name, "mcu": target.name, "patches": patches, "dsp": dsp,
                    "fits": False, "error": str(exc)}
    r = result.report
    m, check = r["measured"], r["sram_check"]
    return {
        "model": graph.name, "mcu": target.name, "sram_kib": target.sram_bytes / KIB,
        "fits": True, "dsp": dsp,
        "patches": r["schedule"]["patches"], "split_after": r["schedule"]["split_after"],
        "predicted_sram_bytes": check["predicted_bytes"],
        "linked_sram_bytes": check["linked_bytes"],
        "measured_sram_bytes": check["measured_bytes"],
        "over_bytes": check["over_bytes"], "over_fraction": check["over_fraction"],
        "within_aim": check["within_aim"], "parts": check["parts"],
        "stack_chain": r["linked"]["stack_chain"],
        "predicted_flash_kb": r["predicted"]["flash_bytes"] / KIB,
        "measured_flash_kb": m["flash_bytes"] / KIB,
        "macs": r["macs"], "instructions": r["instructions"],
        "instructions_per_mac": r["instructions_per_mac"], "bit_exact": r["bit_exact"],
        "compile_s": time.perf_counter() - start,
    }


def demo_rows() -> list[tuple[Graph, TargetSpec, OtaLayout]]:
    """The demo's model for each hardware class of its fleet that QEMU emulates."""
    from service.demo.compile_step import DEMO_CLASSES, DEMO_RESOLUTION, DEMO_WIDTH

    graph = build_graph(mobilenet_v2(DEMO_WIDTH, DEMO_RESOLUTION, num_classes=DEMO_CLASSES))
    classes = [(get_target(n), OtaLayout.AB) for n in ("stm32f746", "stm32h743", "stm32f412",
                                                      "nrf52840")]
    classes.append((custom_target(192 * KIB, 1 * MIB, Cpu.CORTEX_M4, name="custom-m4-192k"),
                    OtaLayout.SINGLE))
    return [(graph, target, layout) for target, layout in classes]


def _parts(row: dict[str, Any]) -> str:
    """'arena 283.5/283.5 scratch 5.3/5.3 static 1.0/1.0 stack 0.9/0.7' (predicted/measured)."""
    return " ".join(f"{p['part']} {p['predicted_bytes'] / KIB:.1f}/{p['measured_bytes'] / KIB:.1f}"
                    for p in row["parts"] if p["measured_bytes"] is not None)


def main() -> None:
    """Run the benchmark and print rows (markdown table or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mcu", default="stm32f746")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true", help="MobileNetV2 patch-based only")
    parser.add_argument("--no-demo", action="store_true", help="skip the demo's model rows")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    target = get_target(args.mcu)
    mbv2 = model("mobilenetv2")
    plans: list[tuple[Graph, TargetSpec, bool | None, bool, OtaLayout]] = [
        (mbv2, target, True, True, OtaLayout.SINGLE)]
    if not args.quick:
        rd = model("mobilenetv2-rd")
        plans += [(mbv2, target, False, True, OtaLayout.SINGLE),
                  (rd, target, False, True, OtaLayout.SINGLE),
                  (rd, target, True, True, OtaLayout.SINGLE),
                  (mbv2, target, True, False, OtaLayout.SINGLE)]
        mcunet = build_graph(builtin_config("mcunet-10fps"))
        plans += [(mcunet, get_target("stm32h743"), False, True, OtaLayout.AB),
                  (mcunet, get_target("stm32h743"), True, True, OtaLayout.AB)]
        if not args.no_demo:
            plans += [(g, t, None, True, lay) for g, t, lay in demo_rows()]
    for graph, tgt, patches, dsp, layout in plans:
        rows.append(run_one(graph, tgt, patches, dsp, layout))
        if not args.json:
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        print(json.dumps({"tinyengine": TINYENGINE, "rows": rows}, indent=2))
        return
    print("\n| model | MCU | schedule | SRAM predicted / linked / measured (B) | over | "
          "predicted / measured by part (kB) | Flash pred / meas (kB) | instr/MAC | bit-exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        if not row["fits"]:
            print(f"| {row['model']} | {row['mcu']} | p={row['patches']} | does not fit: "
                  f"{row['error']} | | | | | |")
            continue
        sched = "layer" if row["patches"] == 1 else f"{row['patches']}x{row['patches']} " \
            f"to {row['split_after']}"
        print(f"| {row['model']} | {row['mcu']} | {sched}{'' if row['dsp'] else ' (plain C)'} | "
              f"{row['predicted_sram_bytes']:,} / {row['linked_sram_bytes']:,} / "
              f"{row['measured_sram_bytes']:,} | {row['over_fraction']:+.2%} "
              f"({row['over_bytes']:+,} B) | {_parts(row)} | "
              f"{row['predicted_flash_kb']:.1f} / {row['measured_flash_kb']:.1f} | "
              f"{row['instructions_per_mac']:.2f} | {row['bit_exact']} |")


if __name__ == "__main__":
    main()
