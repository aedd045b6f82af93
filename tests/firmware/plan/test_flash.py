"""The Flash account (firmware.plan.flash): params + the runtime code a model's kernels link
(measured per core) + the generated code; predicted >= the linked image, within 2 %."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from firmware.arch import mobilenet_v2
from firmware.codegen import write_model
from firmware.codegen.overlay import encode_overlay
from firmware.frontend.builtin import build_graph
from firmware.int8.quantize import quantize_graph
from firmware.ir import Graph
from firmware.nas.search import Constraints, plan_candidate
from firmware.pipeline import CompileOptions, plan_schedule
from firmware.plan.account import fit_schedule
from firmware.plan.flash import code_bytes, code_size_table, code_use, flash_account
from firmware.plan.memory import MemoryModel, analyze
from firmware.plan.overlay import graph_overlay_layout
from firmware.targets import KIB, Cpu, OtaLayout, custom_target, get_target
from firmware.toolchain.build import build_firmware
from tests.firmware.small_models import small_rd_quantized, tiny_quantized
from tests.firmware.tiny_family import tiny_space

DEMO = mobilenet_v2(0.35, 144, num_classes=10)  # service.demo.compile_step's model


def _demo_graph(with_weights: bool = False) -> Graph:
    return build_graph(DEMO, with_weights=with_weights)


@pytest.mark.unit
def test_the_demo_model_still_fits_the_stm32f412_slot() -> None:
    """With its 1x1 and depthwise layers on the specialized kernels: only its stem (a dense
    conv, the kind that saves least) is given up to the generic kernel for Flash."""
    graph, target = _demo_graph(), get_target("stm32f412")
    fit = plan_schedule(graph, target, CompileOptions(layout=OtaLayout.AB))
    assert fit.generic <= {"conv"}
    account = flash_account(graph, target.cpu, fit.plan, generic=fit.generic)
    assert account.params_bytes == analyze(graph, MemoryModel.INPLACE).weights_bytes
    assert account.runtime_code_bytes > 10 * KIB  # the kernels are in it
    assert account.total_bytes <= target.slot_bytes(OtaLayout.AB), account.describe()


@pytest.mark.unit
def test_shared_runtime_code_is_charged_once() -> None:
    table = code_size_table(Cpu.CORTEX_M4)
    base = table.closure_bytes([])
    one = table.closure_bytes(["tf_conv2d_1x1_fast_s8"]) - base
    add = table.closure_bytes(["tf_conv2d_1x1_add_fast_s8"]) - base
    both = table.closure_bytes(["tf_conv2d_1x1_fast_s8", "tf_conv2d_1x1_add_fast_s8"]) - base
    assert max(one, add) < both < one + add  # the generic fallback and helpers are shared
    assert table.closure_bytes(["tf_add_s8"]) > base


@pytest.mark.unit
def test_the_entry_points_follow_the_schedule() -> None:
    graph = _demo_graph()
    layer = code_use(graph)
    separate = code_use(graph, memory_model=MemoryModel.SEPARATE)
    patched = code_use(graph, fit_schedule(graph, 128 * KIB, Cpu.CORTEX_M4).plan)
    assert "tf_conv2d_1x1_add_fast_s8" in layer.entries  # inplace: residuals fused
    assert "tf_add_s8" not in layer.entries
    assert "tf_add_s8" in separate.entries and "tf_conv2d_1x1_add_fast_s8" not in separate.entries
    assert "tf_patch_store_s8" in patched.entries and "tf_patch_store_s8" not in layer.entries
    assert patched.features["descriptor_bytes"] > layer.features["descriptor_bytes"]


@pytest.mark.unit
def test_the_search_charges_the_account_of_its_pick() -> None:
    space = tiny_space()
    arch = space.largest()
    target = custom_target(64 * KIB, 1024 * KIB, Cpu.CORTEX_M4)
    fits = plan_candidate(space, arch, Constraints.for_target(target))
    assert fits.fits and fits.plan is not None
    graph = build_graph(space.to_config(arch), with_weights=False)
    assert fits.code_bytes == code_bytes(graph, Cpu.CORTEX_M4, fits.plan)
    slot = fits.weights_bytes + fits.code_bytes - 1
    refused = plan_candidate(space, arch, Constraints(sram_bytes=64 * KIB, slot_bytes=slot,
                                                      cpu=Cpu.CORTEX_M4))
    assert not refused.fits
    assert f"code {fits.code_bytes} B > slot {slot} B" in refused.why_not


@pytest.mark.unit
def test_a_personalizing_search_charges_the_weights_overlay() -> None:
    space = tiny_space()
    arch = space.largest()
    base = Constraints(sram_bytes=64 * KIB, slot_bytes=1024 * KIB, cpu=Cpu.CORTEX_M4,
                       personalize=True, training_memory=lambda config, graph: 1024,
                       overlay_bytes=lambda config, graph: 8 * KIB)
    fits = plan_candidate(space, arch, base)
    assert fits.fits and fits.overlay_bytes == 8 * KIB
    assert fits.flash_bytes == fits.weights_bytes + fits.code_bytes + 8 * KIB
    slot = fits.flash_bytes - 1
    refused = plan_candidate(space, arch, dataclasses.replace(base, slot_bytes=slot))
    assert not refused.fits
    assert f"+ weights overlay {8 * KIB} B > slot {slot} B" in refused.why_not


@pytest.mark.unit
def test_the_overlay_layout_from_shapes_counts_the_quantized_parameters() -> None:
    qgraph = small_rd_quantized()
    layers = [layer.name for layer in qgraph.graph.layers if layer.weight is not None][-4:]
    layout = graph_overlay_layout(qgraph.graph, layers)
    assert layout.layers == tuple(layers)
    for entry in layout.entries:  # depthwise, 1x1 and the classifier among them
        ql = qgraph.layer(entry.layer)
        assert ql.weight_q is not None and ql.bias_q is not None
        assert (entry.weight_count, entry.channels) == (ql.weight_q.size, ql.bias_q.size)
    assert len(encode_overlay(qgraph, layout, 1)) == layout.total_bytes
    assert layout.region_bytes % 4096 == 0 and layout.region_bytes >= layout.total_bytes


def _demo_quantized():  # type: ignore[no-untyped-def]
    graph = _demo_graph(with_weights=True)
    calib = np.random.default_rng(0).standard_normal(
        (2, *graph.tensor(graph.input).shape)).astype(np.float32)
    return quantize_graph(graph, calib)


@pytest.mark.toolchain
@pytest.mark.parametrize("case", ["demo-stm32f412-m4", "tiny-m0plus", "rd-m7-separate",
                                  "rd-m33-plain", "rd-m4-overlay"])
def test_the_account_is_at_least_the_linked_image_and_within_2_percent(
        case: str, tmp_path: Path) -> None:
    dsp, mm = True, MemoryModel.INPLACE
    if case.startswith("demo"):
        qgraph, target = _demo_quantized(), get_target("stm32f412")
        layout = OtaLayout.AB
    else:
        qgraph = tiny_quantized() if case.startswith("tiny") else small_rd_quantized()
        cpu = {"m0plus": Cpu.CORTEX_M0PLUS, "m4": Cpu.CORTEX_M4, "m7": Cpu.CORTEX_M7,
               "m33": Cpu.CORTEX_M33}[case.split("-")[1]]
        target, layout = custom_target(256 * KIB, 1024 * KIB, cpu), OtaLayout.SINGLE
        dsp, mm = "plain" not in case, (MemoryModel.SEPARATE if "separate" in case
                                         else MemoryModel.INPLACE)
    graph = qgraph.graph
    # a personalized image: the last 6 weighted layers read through the weights overlay
    overlaid = ([layer.name for layer in graph.layers if layer.weight is not None][-6:]
                if "overlay" in case else [])
    # The demo's class: the compiler's pick (schedule and kernel set) for its slot.
    fit = (plan_schedule(graph, target, CompileOptions(layout=layout)) if case.startswith("demo")
           else fit_schedule(graph, target.sram_bytes, target.cpu, mm))
    write_model(qgraph, fit.plan, tmp_path / "model", memory_model=mm,
                overlay_layers=overlaid, generic=fit.generic)
    account = flash_account(graph, target.cpu, fit.plan, dsp=dsp, overlay_layers=overlaid,
                            generic=fit.generic)
    build = build_firmware(tmp_path / "model", target, layout, out_dir=tmp_path / "build",
                           dsp=dsp, stack_bytes=16 * KIB, overlay_bytes=account.overlay_bytes)
    linked = build.flash_bytes  # arm-none-eabi-size -A: vectors + .text + .data initialisers
    assert linked <= account.image_bytes <= 1.02 * linked, (
        f"{case}: account {account.image_bytes} B ({account.describe()}), linked {linked} B")
    assert (account.overlay_bytes > 0) == bool(overlaid)
    assert build.flash_bytes + account.overlay_bytes <= target.slot_bytes(layout)
    if case.startswith("demo"):
        assert fit.plan.schedule.patches > 1
        assert account.total_bytes <= target.slot_bytes(layout)


@pytest.mark.toolchain
def test_the_code_size_table_matches_the_runtime_sources(tmp_path: Path) -> None:
    """A kernel changed without `python -m bench.code_size --write` fails here (M4, SMLAD)."""
    import subprocess

    from firmware.toolchain.build import (
        ARM_CC,
        ARM_SIZE,
        INCLUDE_DIR,
        SRC_DIR,
        WARNINGS,
        cpu_flags,
        kernel_sources,
    )

    table = code_size_table(Cpu.CORTEX_M4, dsp=True)
    checked = 0
    for src in [*kernel_sources(), SRC_DIR / "tf_semihost.c", SRC_DIR / "tf_startup_cm.c"]:
        obj = tmp_path / f"{src.stem}.o"
        subprocess.run([ARM_CC, *cpu_flags(Cpu.CORTEX_M4), "-O2", *WARNINGS,
                        "-ffunction-sections", "-fdata-sections", "--specs=nano.specs",
                        f"-I{INCLUDE_DIR}", "-c", str(src), "-o", str(obj)], check=True)
        sizes = {}
        for line in subprocess.run([ARM_SIZE, "-A", str(obj)], check=True, capture_output=True,
                                   text=True).stdout.splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                sizes[fields[0]] = int(fields[1])
        for key, charged in table.sections.items():
            name, section = key.split(":", 1)
            if name != obj.name:
                continue
            assert section in sizes, f"{key}: gone from the runtime, refresh the table"
            rounded = -(-sizes[section] // 4) * 4
            assert rounded <= charged <= rounded + 60, (
                f"{key}: {sizes[section]} B now, the table charges {charged} B: refresh it "
                "(python -m bench.code_size --write)")
            checked += 1
    assert checked > 40
