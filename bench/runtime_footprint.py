"""The runtime's SRAM footprint per core: static data and a sound stack bound.

    .venv/bin/python -m bench.runtime_footprint [--json] [--no-run]

Builds probe models (layer- and patch-based; SMLAD and plain-C paths where the core has
both) for every Cortex-M core arm-none-eabi-gcc targets, and reads from each linked image
- static: .data + .bss less the model's output buffer (`firmware.plan.account`);
- stack: gcc's call-graph bound (`firmware.toolchain.stack`), with its deepest chain;
- measured stack: QEMU's painted high-water mark, where a board emulates the core.
It prints `firmware.plan.account.RUNTIME_FOOTPRINTS` as it should read: the largest static
base and the largest bound plus STACK_HEADROOM_BYTES, rounded up to 8 bytes. Paste it there
when the runtime's kernels change (a model build whose bound exceeds the table fails).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from firmware.arch import NetConfig
from firmware.codegen import write_model
from firmware.frontend.builtin import build_graph, builtin_config
from firmware.int8.quantize import quantize_graph
from firmware.plan.account import (
    RUNTIME_FOOTPRINTS,
    STACK_HEADROOM_BYTES,
    output_buffer_bytes,
)
from firmware.plan.patch import best_schedule, plan_patches
from firmware.targets import MIB, Cpu, custom_target
from firmware.toolchain.build import build_firmware
from firmware.toolchain.emulator import run_firmware
from firmware.toolchain.stack import deepest_chain, read_callgraph

CORES = (Cpu.CORTEX_M0PLUS, Cpu.CORTEX_M3, Cpu.CORTEX_M4, Cpu.CORTEX_M7, Cpu.CORTEX_M33)
KERNELS = ("tf_conv2d_s8", "tf_conv2d_1x1_s8", "tf_conv2d_1x1_add_s8",
           "tf_depthwise_conv2d_s8", "tf_fully_connected_s8", "tf_add_s8", "tf_avg_pool_s8",
           "tf_global_avg_pool_s8", "tf_patch_load_s8", "tf_patch_store_s8")


def probes() -> list[NetConfig]:
    """Small networks that call every kernel: MobileNetV2 and its RD variant at 32 px."""
    return [dataclasses.replace(builtin_config(name, 0.35, 32, num_classes=10),
                                head_channels=64, name=f"{name}-probe")
            for name in ("mobilenetv2", "mobilenetv2-rd")]


def measure(config: NetConfig, cpu: Cpu, patched: bool, dsp: bool, run: bool,
            work: Path) -> dict[str, Any]:
    """Build one probe for one core and read its static data and stack."""
    graph = build_graph(config)
    calib = np.random.default_rng(0).standard_normal((4, *graph.tensor(graph.input).shape))
    qgraph = quantize_graph(graph, calib.astype(np.float32))
    plan = best_schedule(graph) if patched else plan_patches(graph, 1, None)
    name = f"{config.name}-{cpu.value}-{'patch' if patched else 'layer'}-{'dsp' if dsp else 'c'}"
    write_model(qgraph, plan, work / name / "src")
    target = custom_target(1 * MIB, 2 * MIB, cpu, name=cpu.value)
    build = build_firmware(work / name / "src", target, out_dir=work / name / "build", dsp=dsp,
                           stack_bytes=64 * 1024)
    assert build.stack_bound is not None
    graph_ci = read_callgraph(sorted((work / name / "build").glob("firmware.elf-*.ci")))
    row: dict[str, Any] = {
        "probe": name, "cpu": cpu.value, "dsp": build.dsp,
        "static_base_bytes": build.static_bytes - output_buffer_bytes(graph),
        "stack_bound_bytes": build.stack_bound.total_bytes,
        "chain": build.stack_bound.describe(),
        "model_run_frame_bytes": graph_ci.frames.get("tf_model_run"),
        "kernels": {k: sum(f for _, f in deepest_chain(graph_ci, k)) for k in KERNELS
                    if graph_ci.title(k) is not None},
    }
    if run and target.qemu_board is not None:
        x = np.zeros((1, *graph.tensor(graph.input).shape[1:], graph.tensor(graph.input).shape[0]),
                     np.int8)
        row["measured_stack_bytes"] = run_firmware(build.elf_path, target, x).stack_bytes
    return row


def main() -> None:
    """Build every probe for every core, print the rows and the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-run", action="store_true", help="skip the QEMU runs")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-footprint-") as tmp:
        for cpu in CORES:
            for config in probes():
                for patched in (False, True):
                    for dsp in ((True, False) if cpu.has_dsp else (False,)):
                        rows.append(measure(config, cpu, patched, dsp, not args.no_run,
                                            Path(tmp)))
                        if not args.json:
                            print(json.dumps(rows[-1]), flush=True)
    table = {}
    for cpu in CORES:
        mine = [r for r in rows if r["cpu"] == cpu.value]
        stack = max(r["stack_bound_bytes"] for r in mine) + STACK_HEADROOM_BYTES
        table[cpu.value] = {"static_bytes": max(r["static_base_bytes"] for r in mine),
                            "stack_bytes": -(-stack // 8) * 8,
                            "now": dataclasses.asdict(RUNTIME_FOOTPRINTS[cpu])}
    if args.json:
        print(json.dumps({"rows": rows, "table": table}, indent=2))
        return
    print("\nRUNTIME_FOOTPRINTS (static base, stack bound + headroom) vs the table now:")
    for core, entry in table.items():
        print(f"  {core:<14} static {entry['static_bytes']:>4} B  stack "
              f"{entry['stack_bytes']:>5} B   (table: {entry['now']})")


if __name__ == "__main__":
    main()
