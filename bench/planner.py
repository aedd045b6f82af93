"""Memory planner benchmark: sweep time and MobileNetV2 patch-based savings.

Run: .venv/bin/python -m bench.planner
Anchors (MCUNetV2, Lin et al. 2021): MobileNetV2-224 int8 1372 kB -> 172 kB at p=4, +10 %
printed (+42 % in the patch stage); 4-8x peak reduction at +8..+17 % MACs across models.
"""

from __future__ import annotations

import time

from firmware.arch import mobilenet_v2
from firmware.frontend.builtin import build_graph, mobilenet_v2_rd
from firmware.plan.patch import best_schedule, plan_patches

KIB = 1024


def sweep_time(repeats: int = 5) -> float:
    """Best-of-`repeats` seconds of the full (p in 1..8, split) sweep of MobileNetV2-224."""
    graph = build_graph(mobilenet_v2(), with_weights=False)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        best_schedule(graph)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    """Print the Markdown rows of BENCHMARKS.md's "Memory planner" section."""
    print(f"full (p, split) sweep, MobileNetV2-224: {sweep_time() * 1e3:.0f} ms (best of 5)")
    print()
    print("| net | layer peak | patch peak (p, split) | reduction | MACs overhead |")
    print("|---|---|---|---|---|")
    for width in (0.35, 0.5, 1.0):
        for res in (96, 128, 160, 192, 224):
            g = build_graph(mobilenet_v2(width, res), with_weights=False)
            plan = best_schedule(g)
            print(f"| MbV2-w{width:g}-r{res} | {plan.layer_peak_bytes / KIB:.0f} kB | "
                  f"{plan.peak_bytes / KIB:.0f} kB ({plan.schedule.patches}, "
                  f"{plan.schedule.split_after}) | {plan.layer_peak_bytes / plan.peak_bytes:.1f}x"
                  f" | {plan.mac_overhead:+.1%} |")
    print()
    for name, g, split in (("MbV2-224", build_graph(mobilenet_v2(), with_weights=False),
                            "b3.project"),
                           ("MbV2-RD-224", build_graph(mobilenet_v2_rd(), with_weights=False),
                            "b1.project")):
        p = plan_patches(g, 4, split)
        print(f"{name} p=4 split {split}: input patch {p.schedule.input_patch}, peak "
              f"{p.peak_bytes / KIB:.1f} kB, stage MACs {p.stage_macs / 1e6:.1f} M "
              f"({p.stage_mac_overhead:+.1%}), uniform-patch count "
              f"{p.uniform_stage_macs / 1e6:.1f} M, overall {p.mac_overhead:+.1%}, "
              f"total {p.macs / 1e6:.1f} M")


if __name__ == "__main__":
    main()
