"""`tinyfleet plan`: per-layer memory of a model, and the patch schedule that fits a budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from firmware.errors import DoesNotFitError, FirmwareError
from firmware.frontend.builtin import BUILTIN_NETWORKS
from firmware.ir import Graph
from firmware.plan.account import SramAccount, fit_schedule, sram_account
from firmware.plan.flash import FlashAccount, flash_account
from firmware.plan.memory import MemoryModel, MemoryReport, analyze
from firmware.plan.patch import PatchPlan, best_schedule, plan_patches
from firmware.targets import Cpu
from firmware.training.memory import TrainingMemoryReport
from service.cli.options import SIZE, kb, load_graph, parse_patches
from service.cli.ui import render_table


def _resolution(ctx: click.Context, param: click.Parameter,
                value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    parts = value.lower().split("x")
    if len(parts) > 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise click.BadParameter(f"{value!r} is not a resolution (224 or 224x160)")
    return (int(parts[0]), int(parts[-1]))


def choose_plan(graph: Graph, sram: int | None, patches: int | None, split_after: str | None,
                memory_model: MemoryModel, bytes_per_element: int | float,
                cpu: Cpu, training_bytes: int = 0) -> tuple[PatchPlan, SramAccount | None]:
    """The plan the options ask for, and its SRAM account (int8 activations only).

    Explicit (p and split, or p = 1), or the fewest MACs whose account (with
    `training_bytes`, the training term) fits `sram` (int8; other element sizes: whose
    activation peak fits), or without `sram` the lowest peak.
    """
    if patches is not None and (split_after is not None or patches == 1):
        plan = plan_patches(graph, patches, split_after, memory_model, bytes_per_element)
    elif sram is not None and bytes_per_element == 1:
        fit = fit_schedule(graph, sram, cpu, memory_model, training_bytes, patches=patches,
                           split_after=split_after)
        return fit.plan, fit.account
    else:
        plan = best_schedule(graph, sram, memory_model, bytes_per_element,
                             patches=patches, split_after=split_after)
    account = (sram_account(graph, plan, cpu, training_bytes) if bytes_per_element == 1
               else None)
    return plan, account


def check_region(graph: Graph, chosen: PatchPlan, training: TrainingMemoryReport) -> None:
    """Refuse a schedule whose patch stage reaches into the layers the scheme trains.

    The training step runs its region layer by layer (it keeps activations per layer), so
    the frozen patch stage must end before the region starts.
    """
    from firmware.training.scheme import resolve

    s = chosen.schedule
    if s.patches == 1 or s.split_after is None:
        return
    start = resolve(training.scheme, graph).region_start
    if graph.index(s.split_after) >= start:
        raise DoesNotFitError(
            f"the patch stage (to {s.split_after}) reaches the training region, which starts "
            f"at {graph.layers[start].name}: train later layers or run layer-based")


def flash_need(graph: Graph, report: MemoryReport, plan: PatchPlan,
               account: SramAccount | None, cpu: Cpu) -> FlashAccount | None:
    """The Flash account of the chosen schedule on `cpu` (params + runtime and generated
    code); None for non-int8 activations (no code is generated for them)."""
    if account is None:
        return None
    return flash_account(graph, cpu, plan, memory_model=report.memory_model)


def _flash_bytes(report: MemoryReport, flash_acc: FlashAccount | None) -> int:
    return report.weights_bytes if flash_acc is None else flash_acc.total_bytes


def plan_json(report: MemoryReport, plan: PatchPlan, account: SramAccount | None,
              cpu: Cpu, sram: int | None, flash: int | None,
              flash_acc: FlashAccount | None = None) -> dict[str, Any]:
    """The JSON document of `tinyfleet plan --json` (DESIGN's keys, plus `sram` and `flash`).

    `sram` is the SRAM account of the chosen schedule on `cpu` (arena, scratch, static,
    stack, total; null for non-int8 activations); `fits.sram` compares its total (else the
    activation peak) with the budget.
    """
    doc: dict[str, Any] = {
        "macs": report.macs,
        "weights_bytes": report.weights_bytes,
        "layer_peak_bytes": report.peak_bytes,
        "layer_peak_layer": report.peak_layer,
        "patch": {
            "patches": plan.schedule.patches,
            "split_after": plan.schedule.split_after,
            "input_patch": list(plan.schedule.input_patch),
            "peak_bytes": plan.peak_bytes,
            "macs": plan.macs,
            "mac_overhead": plan.mac_overhead,
            "stage_mac_overhead": plan.stage_mac_overhead,
        },
    }
    doc["sram"] = None if account is None else {**account.to_dict(), "cpu": cpu.value}
    doc["flash"] = None if flash_acc is None else {**flash_acc.to_dict(), "cpu": cpu.value}
    if sram is not None or flash is not None:
        doc["fits"] = {"sram": None if sram is None else _sram_need(plan, account) <= sram,
                       "flash": (None if flash is None
                                 else _flash_bytes(report, flash_acc) <= flash)}
    doc["layers"] = [{"name": r.name, "op": r.op, "in_bytes": r.in_bytes,
                      "out_bytes": r.out_bytes, "live_bytes": r.live_bytes, "macs": r.macs}
                     for r in report.layers]
    return doc


def _sram_need(plan: PatchPlan, account: SramAccount | None) -> int:
    return plan.peak_bytes if account is None else account.total_bytes


def human_report(graph: Graph, report: MemoryReport, plan: PatchPlan,
                 account: SramAccount | None, cpu: Cpu, sram: int | None,
                 flash: int | None, flash_acc: FlashAccount | None = None) -> str:
    """The per-layer table with both peaks marked, and a summary."""
    stage = {s.name: s for s in plan.stage}
    rows = []
    for r in report.layers:
        t = graph.tensor(graph.layer(r.name).output)
        patched = stage[r.name].live_bytes if r.name in stage else r.live_bytes
        mark = []
        if r.name == report.peak_layer:
            mark.append("<- layer peak")
        if r.name == plan.peak_layer and plan.schedule.patches > 1:
            mark.append("<- patch peak")
        rows.append([r.name, r.op, f"{t.channels}x{t.height}x{t.width}", kb(r.in_bytes),
                     kb(r.out_bytes), kb(r.live_bytes),
                     ("P " if r.name in stage else "") + kb(patched), f"{r.macs / 1e6:.2f}M",
                     " ".join(mark)])
    out = [f"{graph.name}: {report.macs / 1e6:.1f} M MACs, weights {kb(report.weights_bytes)} "
           f"(int8 + int32 bias + requant), memory model "
           f"{report.memory_model.value}, {report.bytes_per_element:g} byte(s)/element", "",
           render_table(["LAYER", "OP", "OUT CxHxW", "IN", "OUT", "LIVE", "PATCH-BASED", "MACS",
                         ""], rows, {3, 4, 5, 6, 7}), "",
           f"layer-based peak: {kb(report.peak_bytes)} ({report.peak_bytes} bytes) at "
           f"{report.peak_layer}"]
    s = plan.schedule
    if s.patches > 1:
        out.append(
            f"patch-based: {s.patches}x{s.patches} patches up to {s.split_after} (P rows), input "
            f"patch {s.input_patch[0]}x{s.input_patch[1]}; peak {kb(plan.peak_bytes)} "
            f"({plan.peak_bytes} bytes) at {plan.peak_layer}, "
            f"{report.peak_bytes / plan.peak_bytes:.1f}x less; MACs {plan.macs / 1e6:.1f} M "
            f"({plan.mac_overhead:+.1%}; patch stage {plan.stage_mac_overhead:+.1%})")
    else:
        out.append("schedule: layer-based (no patches)")
    if account is not None:
        out.append(f"SRAM account on {cpu.value}: {account.describe()}")
    if flash_acc is not None:
        out.append(f"Flash account on {cpu.value}: {flash_acc.describe()}")
    if sram is not None:
        need = _sram_need(plan, account)
        out.append(f"SRAM: {kb(need)} of {kb(sram)}: "
                   + ("fits" if need <= sram else "DOES NOT FIT"))
    if flash is not None:
        need = _flash_bytes(report, flash_acc)
        what = "weights" if flash_acc is None else "weights and code"
        out.append(f"Flash: {what} {kb(need)} of {kb(flash)}: "
                   + ("fits" if need <= flash else "DOES NOT FIT"))
    return "\n".join(out)


@click.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--builtin", type=click.Choice(BUILTIN_NETWORKS), help="a built-in network")
@click.option("--width", type=float, default=1.0, show_default=True,
              help="width multiplier (built-in networks)")
@click.option("--resolution", callback=_resolution, help="input size, 224 or 224x160 "
              "(built-in networks; default: the network's own, 224 for MobileNetV2)")
@click.option("--sram", type=SIZE, help="SRAM budget: 262144, 256KiB, 1MiB")
@click.option("--flash", type=SIZE, help="Flash budget (one OTA slot) for the weights and, "
              "with int8 activations, the code (the Flash account)")
@click.option("--cpu", type=click.Choice([c.value for c in Cpu]), default="cortex-m7",
              show_default=True, help="core the SRAM account is for (static data, stack)")
@click.option("--patches", default="auto", callback=parse_patches, show_default=True,
              help="auto or p (p x p patches; 1 = layer-based)")
@click.option("--split-after", default="auto", show_default=True,
              help="auto or the last layer of the patch stage")
@click.option("--memory-model", type=click.Choice([m.value for m in MemoryModel]),
              default="inplace", show_default=True)
@click.option("--bytes-per-element", type=click.Choice(["0.5", "1", "4"]), default="1",
              show_default=True, help="activation bytes: int4 0.5, int8 1, fp32 4")
@click.option("--classes", "num_classes", type=click.IntRange(2, 100_000), default=None,
              help="classifier outputs (built-in networks; default: the network's own)")
@click.option("--train-scheme", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="a sparse-update scheme (JSON): its training memory, per layer, joins the "
                   "SRAM account as the training term")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--plot", type=click.Path(dir_okay=False), help="write a PNG of per-layer memory")
def plan(model: str | None, builtin: str | None, width: float,
         resolution: tuple[int, int] | None, sram: int | None, flash: int | None, cpu: str,
         patches: int | None, split_after: str, memory_model: str, bytes_per_element: str,
         num_classes: int | None, train_scheme: Path | None, as_json: bool,
         plot: str | None) -> None:
    """Per-layer memory of MODEL.onnx (or --builtin) and its patch-based schedule."""
    mm, bpe = MemoryModel(memory_model), float(bytes_per_element)
    bpe_value: int | float = int(bpe) if bpe.is_integer() else bpe
    split = None if split_after == "auto" else split_after
    scheme = None
    if train_scheme is not None:
        from service.cli.training_report import load_scheme

        scheme = load_scheme(train_scheme)
        if bpe_value != 1:
            raise click.BadParameter("the training memory model is for int8 activations",
                                     param_hint="--bytes-per-element")
    try:
        graph = load_graph(model, builtin, width, resolution, with_weights=False,
                           num_classes=num_classes)
        report = analyze(graph, mm, bpe_value)
        training = None
        if scheme is not None:
            from firmware.training.memory import StepModel

            model_of = StepModel(graph, mm)
            training = (model_of.report(scheme, reorder=True),
                        model_of.report(scheme, reorder=False))
        chosen, account = choose_plan(graph, sram, patches, split, mm, bpe_value, Cpu(cpu),
                                      0 if training is None else training[0].training_bytes)
        if training is not None:
            check_region(graph, chosen, training[0])
        flash_acc = flash_need(graph, report, chosen, account, Cpu(cpu))
    except FirmwareError as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(1) from None
    if plot:
        from service.cli.plan_plot import plot_plan

        plot_plan(graph, report, chosen, Path(plot), sram)
        if training is not None:
            from service.cli.plan_plot import plot_training

            plot_training(training[0], training[1], Path(plot).with_name(
                Path(plot).stem + "-training" + Path(plot).suffix), sram)
    if as_json:
        doc = plan_json(report, chosen, account, Cpu(cpu), sram, flash, flash_acc)
        if training is not None:
            from service.cli.training_report import training_json

            doc["training"] = training_json(*training)
        click.echo(json.dumps(doc, indent=2))
    else:
        text = human_report(graph, report, chosen, account, Cpu(cpu), sram, flash, flash_acc)
        if training is not None:
            from service.cli.training_report import training_table

            text += "\n\n" + training_table(*training)
        click.echo(text)
    misses = []
    if sram is not None and _sram_need(chosen, account) > sram:
        peak = f"peak {kb(chosen.peak_bytes)}"
        if account is not None:
            peak = (f"needs {kb(account.total_bytes)} ({account.describe()}), activation "
                    + peak)
        misses.append(f"{peak} > SRAM budget {kb(sram)} at layer {chosen.peak_layer}")
    if flash is not None and _flash_bytes(report, flash_acc) > flash:
        misses.append(("weights" if flash_acc is None else
                       f"weights and code ({flash_acc.describe()})")
                      + f" {kb(_flash_bytes(report, flash_acc))} > Flash budget {kb(flash)}")
    if misses:
        click.echo("error: " + "; ".join(misses), err=True)
        raise SystemExit(1)
