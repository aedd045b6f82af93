"""The `tinyfleet plan --plot` figure: per-layer memory, layer-based beside patch-based.

After MCUNetV2's Figure 1: bars of the SRAM each layer needs run whole, and the same layers
in the patch schedule (the patch stage's per-patch working set plus its output buffer).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display

import matplotlib.pyplot as plt

from firmware.ir import Graph
from firmware.plan.memory import MemoryReport
from firmware.plan.patch import PatchPlan
from firmware.targets import KIB
from firmware.training.memory import TrainingMemoryReport


def plot_plan(graph: Graph, report: MemoryReport, plan: PatchPlan, path: Path,
              sram_bytes: int | None = None) -> None:
    """Write a PNG of per-layer live memory (kB) for both schedules to `path`."""
    stage = {s.name: s.live_bytes for s in plan.stage}
    names = [r.name for r in report.layers]
    layer_kb = [r.live_bytes / KIB for r in report.layers]
    patch_kb = [stage.get(r.name, r.live_bytes) / KIB for r in report.layers]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.16 * len(names)), 4.8), dpi=120)
    ax.bar([i - 0.2 for i in x], layer_kb, width=0.4, color="#b0b0b0",
           label=f"layer-based (peak {report.peak_bytes / KIB:,.0f} kB)")
    s = plan.schedule
    label = (f"patch-based {s.patches}x{s.patches} (peak {plan.peak_bytes / KIB:,.0f} kB, "
             f"MACs {plan.mac_overhead:+.0%})" if s.patches > 1 else "layer-based schedule")
    ax.bar([i + 0.2 for i in x], patch_kb, width=0.4, color="#d62728", label=label)
    if s.split_after is not None:
        end = names.index(s.split_after) + 0.5
        ax.axvspan(-0.5, end, color="#1f77b4", alpha=0.08)
        ax.text(end / 2, max(layer_kb) * 0.6, f"patch stage\n(input patch {s.input_patch[0]}"
                f"x{s.input_patch[1]})", ha="center", va="top", fontsize=8, color="#1f77b4",
                bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none"})
    peak_i = names.index(report.peak_layer)
    ax.annotate(f"{report.peak_layer}\n{report.peak_bytes / KIB:,.0f} kB",
                (peak_i - 0.2, layer_kb[peak_i]), textcoords="offset points", xytext=(10, -2),
                fontsize=8, va="top")
    if s.patches > 1:
        at = names.index(plan.peak_layer)
        ax.annotate(f"{plan.peak_bytes / KIB:,.1f} kB", (at + 0.2, patch_kb[at]),
                    textcoords="offset points", xytext=(0, 14), fontsize=8, ha="center",
                    color="#d62728", arrowprops={"arrowstyle": "->", "color": "#d62728"})
    if sram_bytes is not None:
        ax.axhline(sram_bytes / KIB, color="black", linestyle="--", linewidth=1)
        ax.text(len(names) - 0.5, sram_bytes / KIB, f"SRAM {sram_bytes / KIB:,.0f} kB",
                ha="right", va="bottom", fontsize=8)
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_xlim(-0.7, len(names) - 0.3)
    ax.set_ylabel(f"SRAM (kB, {report.memory_model.value}, "
                  f"{report.bytes_per_element:g} B/element)")
    ax.set_title(f"{graph.name}: per-layer memory")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_training(reordered: TrainingMemoryReport, plain: TrainingMemoryReport, path: Path,
                  sram_bytes: int | None = None) -> None:
    """Write a PNG of one training step's live memory per layer: the forward pass, and the
    backward pass with and without operator reordering (one arena for everything)."""
    names = [r.name for r in reordered.layers]
    x = range(len(names))
    fwd = [r.forward_bytes / KIB for r in reordered.layers]
    bwd = [r.backward_bytes / KIB for r in reordered.layers]
    bwd_plain = [r.backward_bytes / KIB for r in plain.layers]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.16 * len(names)), 4.8), dpi=120)
    ax.bar([i - 0.27 for i in x], fwd, width=0.27, color="#b0b0b0", label="forward")
    ax.bar(list(x), bwd_plain, width=0.27, color="#ff7f0e",
           label=f"backward, no reordering (training {plain.training_bytes / KIB:,.1f} kB)")
    ax.bar([i + 0.27 for i in x], bwd, width=0.27, color="#1f77b4",
           label=f"backward, reordered (training {reordered.training_bytes / KIB:,.1f} kB)")
    ax.axhline(reordered.inference_peak_bytes / KIB, color="#7f7f7f", linestyle=":",
               linewidth=1)
    ax.text(0, reordered.inference_peak_bytes / KIB, "inference peak", fontsize=7,
            va="bottom")
    if sram_bytes is not None:
        ax.axhline(sram_bytes / KIB, color="black", linestyle="--", linewidth=1)
        ax.text(len(names) - 0.5, sram_bytes / KIB, f"SRAM {sram_bytes / KIB:,.0f} kB",
                ha="right", va="bottom", fontsize=8)
    ax.set_xticks(list(x))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_xlim(-0.7, len(names) - 0.3)
    ax.set_ylabel(f"SRAM live during the step (kB, {reordered.memory_model.value})")
    ax.set_title(f"{reordered.graph}: one training step, {reordered.scheme.describe()}",
                 fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
