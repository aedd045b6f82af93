"""Text and JSON of the training memory model, shared by plan, search and finetune."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from firmware.errors import FirmwareError
from firmware.training.memory import TrainingMemoryReport
from firmware.training.scheme import SparseUpdateScheme
from service.cli.options import kb
from service.cli.ui import render_table


def load_scheme(path: Path) -> SparseUpdateScheme:
    """A scheme file; a click error naming the file and the problem."""
    try:
        return SparseUpdateScheme.from_json(path.read_bytes())
    except OSError as exc:
        raise click.BadParameter(f"{path}: {exc.strerror}", param_hint="scheme") from None
    except FirmwareError as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="scheme") from None


def training_json(reordered: TrainingMemoryReport, plain: TrainingMemoryReport
                  ) -> dict[str, Any]:
    """Both reports (with and without operator reordering), per layer and in total."""
    def summary(r: TrainingMemoryReport) -> dict[str, Any]:
        return {"training_bytes": r.training_bytes, "training_peak_at": r.training_peak_at,
                "step_peak_bytes": r.step_peak_bytes, "step_peak_at": r.step_peak_at,
                "persistent_bytes": r.persistent_bytes,
                "training_by_kind": {k.value: v for k, v in r.by_kind.items()}}

    rows = []
    for a, b in zip(reordered.layers, plain.layers, strict=True):
        rows.append({"name": a.name, "op": a.op, "position": a.position, "trains": a.trains,
                     "forward_bytes": a.forward_bytes, "kept_bytes": a.kept_bytes,
                     "backward_bytes": a.backward_bytes,
                     "backward_bytes_no_reorder": b.backward_bytes,
                     "weight_grad_bytes": a.weight_grad_bytes, "master_bytes": a.master_bytes})
    return {"scheme": reordered.scheme.to_dict(), "memory_model": reordered.memory_model.value,
            "inference_peak_bytes": reordered.inference_peak_bytes,
            "reorder": summary(reordered), "no_reorder": summary(plain), "layers": rows}


def training_table(reordered: TrainingMemoryReport, plain: TrainingMemoryReport) -> str:
    """Per-layer table and summary of a scheme's training memory."""
    rows = []
    for a, b in zip(reordered.layers, plain.layers, strict=True):
        if not (a.trains or a.kept_bytes or a.backward_bytes):
            continue
        rows.append([a.name, a.op, a.position, a.trains or "-", kb(a.forward_bytes),
                     kb(a.kept_bytes), kb(a.backward_bytes) if a.backward_bytes else "",
                     kb(b.backward_bytes) if b.backward_bytes else "",
                     kb(a.weight_grad_bytes), kb(a.master_bytes)])
    r, p = reordered, plain
    out = [f"training step (batch 1): {r.scheme.describe()}", "",
           render_table(["LAYER", "OP", "POS", "TRAINS", "FWD", "KEPT", "BWD",
                         "BWD NO-REORDER", "GRADS", "MASTER"], rows, {4, 5, 6, 7, 8, 9})
           if rows else "(no layer)",
           "",
           f"inference (layer-based) peak: {kb(r.inference_peak_bytes)}",
           f"training buffers (the account's training term): {kb(r.training_bytes)} at "
           f"{r.training_peak_at} with reordering, {kb(p.training_bytes)} at "
           f"{p.training_peak_at} without",
           f"  of which persistent (fp32 masters, momentum): {kb(r.persistent_bytes)}; "
           "at the peak: " + ", ".join(f"{k.value} {kb(v)}" for k, v in r.by_kind.items() if v),
           f"one arena for the whole step: {kb(r.step_peak_bytes)} at {r.step_peak_at} "
           f"(without reordering {kb(p.step_peak_bytes)})"]
    return "\n".join(out)
