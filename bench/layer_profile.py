"""Where a whole network's instructions go: QEMU instructions per layer, per MAC, by kernel.

The model is generated with `render_model(profile=True)` (a SysTick reading at every layer
boundary, firmware.codegen), cross-compiled for the target and run once in QEMU under
`-icount shift=0`; the output is checked bit-exact against the int8 reference first. A patch
stage's layers are summed over every patch (their halo recomputation included), the input
read is counted with the first layer, the output copy with the last. MACs are the ones
executed (a patch stage's include the halo recomputation, as in `bench.compiler`).

    .venv/bin/python -m bench.layer_profile [--model mobilenetv2|mobilenetv2-rd|mcunet-10fps]
        [--patched] [--mcu stm32f746] [--top 15] [--json]
"""

from __future__ import annotations

import argparse
import json
import struct
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from bench.compiler import model
from firmware.codegen import PROFILE_FILE, write_model
from firmware.codegen.emitters import kind_of
from firmware.errors import EmulationError
from firmware.frontend.builtin import build_graph, builtin_config
from firmware.int8.quantize import quantize_graph
from firmware.ir import Graph
from firmware.pipeline import reference_outputs
from firmware.plan.memory import layer_macs
from firmware.plan.patch import PatchPlan, best_schedule
from firmware.targets import OtaLayout, get_target
from firmware.toolchain.build import build_firmware
from firmware.toolchain.emulator import encode_inputs, run_qemu, ticks_to_instructions


def _graph(name: str) -> Graph:
    if name == "mcunet-10fps":
        return build_graph(builtin_config(name))
    return model(name)


def profile(graph: Graph, mcu: str, patched: bool, dsp: bool = True) -> dict[str, Any]:
    """Per-layer instructions of one inference of `graph` on `mcu` (see the module doc)."""
    target = get_target(mcu)
    qgraph = quantize_graph(graph, None, generated_count=8)
    plan: PatchPlan | None = None
    if patched:
        plan = best_schedule(graph)
        assert plan.schedule.split_after is not None
    rng = np.random.default_rng(0)
    t = graph.tensor(graph.input)
    x_q = rng.integers(-128, 128, size=(1, t.channels, t.height, t.width), dtype=np.int8)
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        src = Path(tmp) / "model"
        write_model(qgraph, plan, src, profile=True)
        build = build_firmware(src, target, OtaLayout.SINGLE, out_dir=Path(tmp) / "build", dsp=dsp,
                               stack_bytes=4096)
        run = run_qemu(build.elf_path, target,
                       {"input.bin": encode_inputs(np.ascontiguousarray(
                           x_q.transpose(0, 2, 3, 1)))}, ("output.bin", PROFILE_FILE),
                       timeout_s=600)
    if run.exit_code != 0 or PROFILE_FILE not in run.files:
        raise EmulationError(f"profiled run exited {run.exit_code}: {run.console[-2000:]}")
    out_bytes = int(np.prod(reference_outputs(qgraph, x_q).shape[1:]))
    got = np.frombuffer(run.files["output.bin"][12:12 + out_bytes], dtype=np.int8)
    if not np.array_equal(got, reference_outputs(qgraph, x_q).reshape(-1)):
        raise EmulationError("profiled run is not bit-exact against the int8 reference")
    raw = run.files[PROFILE_FILE]
    ticks = struct.unpack(f"<{len(raw) // 8}Q", raw)
    layers: list[dict[str, Any]] = []
    # MACs as executed: a patch stage's include its halo recomputation (as PatchPlan.macs)
    stage = {} if plan is None else {s.name: s.macs for s in plan.stage}
    for i, layer in enumerate(graph.layers):
        instr = ticks_to_instructions(ticks[i], target)
        macs = stage.get(layer.name, layer_macs(graph, layer))
        inp = graph.tensor(layer.inputs[0])
        out = graph.tensor(layer.output)
        layers.append({
            "index": i, "layer": layer.name, "kind": kind_of(graph, layer).value,
            "shape": f"{inp.height}x{inp.width}x{inp.channels}->{out.height}x{out.width}x"
                     f"{out.channels}" + (f" k{layer.kernel[0]}s{layer.stride[0]}"
                                          if layer.kernel[0] > 1 else ""),
            "in_patch_stage": layer.name in stage,
            "macs": macs, "instructions": instr,
            "instructions_per_mac": instr / macs if macs else None})
    total = sum(r["instructions"] for r in layers)
    macs_total = sum(r["macs"] for r in layers)
    return {"model": graph.name, "mcu": mcu, "dsp": dsp,
            "schedule": "layer-based" if plan is None else
            f"{plan.schedule.patches}x{plan.schedule.patches} patches to "
            f"{plan.schedule.split_after}",
            "instructions": total, "macs": macs_total,
            "instructions_per_mac": total / macs_total, "layers": layers}


def _print(result: dict[str, Any], top: int) -> None:
    total = result["instructions"]
    print(f"{result['model']} on {result['mcu']}, {result['schedule']}: "
          f"{total:,} instructions, {result['macs']:,} MACs, "
          f"{result['instructions_per_mac']:.3f} instr/MAC")
    by_kind: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in result["layers"]:
        key = r["kind"] + (" (patch stage)" if r["in_patch_stage"] else "")
        by_kind[key][0] += r["instructions"]
        by_kind[key][1] += r["macs"]
    print("\n| kind | instructions | share | MACs | instr/MAC |\n|---|---|---|---|---|")
    for kind, (instr, macs) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
        per = f"{instr / macs:.2f}" if macs else "-"
        print(f"| {kind} | {instr:,} | {instr / total:.1%} | {macs:,} | {per} |")
    # the layers whose instructions above 1 per MAC weigh most
    print("\n| layer | kind | shape | instructions | share | instr/MAC | excess over 1/MAC |")
    print("|---|---|---|---|---|---|---|")
    ranked = sorted(result["layers"], key=lambda r: -(r["instructions"] - r["macs"]))
    for r in ranked[:top]:
        per = f"{r['instructions_per_mac']:.2f}" if r["macs"] else "-"
        print(f"| {r['layer']} | {r['kind']} | {r['shape']} | {r['instructions']:,} | "
              f"{r['instructions'] / total:.1%} | {per} | "
              f"{(r['instructions'] - r['macs']) / total:.1%} |")


def main() -> None:
    """Profile one model and print the by-kind and by-layer tables (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenetv2",
                        choices=["mobilenetv2", "mobilenetv2-rd", "mcunet-10fps"])
    parser.add_argument("--patched", action="store_true",
                        help="the planner's lowest-peak patch schedule (else layer-based)")
    parser.add_argument("--mcu", default="stm32f746")
    parser.add_argument("--plain", action="store_true", help="plain C build (no SMLAD)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = profile(_graph(args.model), args.mcu, args.patched, dsp=not args.plain)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result, args.top)


if __name__ == "__main__":
    main()
