"""The SRAM account: its parts agree with the generated code, and fit_schedule's picks fit."""

from __future__ import annotations

import dataclasses

import pytest

from firmware.arch import BlockConfig, NetConfig
from firmware.codegen import render_model
from firmware.frontend.builtin import build_graph
from firmware.ir import Graph
from firmware.plan.account import (
    RUNTIME_FOOTPRINTS,
    SramAccount,
    SramDoesNotFitError,
    fit_schedule,
    output_buffer_bytes,
    runtime_footprint,
    sram_account,
)
from firmware.plan.kernels import conv_scratch_bytes, layer_scratch_bytes, scratch_buffer_bytes
from firmware.plan.memory import plan_arena
from firmware.plan.patch import plan_patches, schedule_options, split_points
from firmware.targets import Cpu
from tests.firmware.small_models import tiny_graph, tiny_quantized

pytestmark = pytest.mark.unit


def test_the_account_adds_its_parts_and_names_them() -> None:
    account = SramAccount(arena_bytes=12 * 1024, scratch_bytes=1300, static_bytes=100,
                          stack_bytes=900, training_bytes=0)
    assert account.total_bytes == 12 * 1024 + 2300
    assert account.to_dict() == {"arena_bytes": 12288, "scratch_bytes": 1300,
                                 "static_bytes": 100, "stack_bytes": 900,
                                 "training_bytes": 0, "total_bytes": 14588}
    assert account.describe() == ("arena 12.0 kB + scratch 1.3 kB + static 0.1 kB + "
                                  "stack 0.9 kB = 14.2 kB")
    assert account.fits(14588) and not account.fits(14587)
    trained = dataclasses.replace(account, training_bytes=2048)
    assert trained.total_bytes == 14588 + 2048 and "training 2.0 kB" in trained.describe()


@pytest.mark.parametrize("schedule", [None, (2, "b1.project"), (3, "b1.dw"), (4, "b2.add")])
def test_arena_and_scratch_are_what_the_generated_code_declares(
        schedule: tuple[int, str] | None) -> None:
    qgraph = tiny_quantized()
    plan = (plan_patches(qgraph.graph, 1, None) if schedule is None
            else plan_patches(qgraph.graph, *schedule))
    model = render_model(qgraph, plan)
    account = sram_account(qgraph, plan, Cpu.CORTEX_M4)
    assert (account.arena_bytes, account.scratch_bytes) == (model.arena_bytes,
                                                            model.scratch_bytes)
    assert f"#define TF_MODEL_SCRATCH_BYTES {account.scratch_bytes}u" in model.files["model.h"]
    assert account.arena_bytes >= plan.peak_bytes
    assert account.stack_bytes == RUNTIME_FOOTPRINTS[Cpu.CORTEX_M4].stack_bytes
    # static: the runtime's data, the 10-logit output buffer, section alignment (8 bytes)
    base = runtime_footprint(Cpu.CORTEX_M4).static_bytes + output_buffer_bytes(qgraph.graph)
    assert base <= account.static_bytes < base + 3 * 8
    linked = sum(-(-n // 8) * 8 for n in (base, account.arena_bytes,
                                          account.scratch_bytes + account.scratch_bytes % 2))
    assert account.total_bytes == linked + account.stack_bytes


def test_layer_based_arena_is_the_planners() -> None:
    graph = tiny_graph()
    account = sram_account(graph, plan_patches(graph, 1, None), Cpu.CORTEX_M7)
    assert account.arena_bytes == plan_arena(graph).size_bytes


def test_scratch_follows_each_kernels_buffer_size() -> None:
    graph = tiny_graph()
    fc = graph.layers[-1]
    assert layer_scratch_bytes(graph, fc) == graph.tensor(fc.inputs[0]).numel * 2  # one column
    stem = graph.layers[0]  # an RGB input layer: two columns of 28 int16, 144 B per 2 channels
    out_c = graph.tensor(stem.output).channels
    assert layer_scratch_bytes(graph, stem) == 2 * 28 * 2 + (out_c + 1) // 2 * 144
    assert conv_scratch_bytes(16, (1, 1), out_pixels=1) == 32  # a 1-pixel output: one column
    plan = plan_patches(graph, 2, "b1.project")
    assert scratch_buffer_bytes(graph, plan) <= scratch_buffer_bytes(graph)


def _one_pixel_head() -> Graph:
    """Stride 2 down to 1x1 before the head: its 1x1 conv and the classifier see one pixel."""
    config = NetConfig(name="to-1x1", input_size=(8, 8), stem_channels=8,
                       blocks=(BlockConfig(3, 2, 2, 16), BlockConfig(3, 2, 2, 64)),
                       head_channels=96, num_classes=10)
    return build_graph(config, with_weights=False)


def test_a_one_pixel_output_uses_one_column() -> None:
    graph = _one_pixel_head()
    head = graph.layer("head")
    assert graph.tensor(head.output).height == 1
    assert layer_scratch_bytes(graph, head) == 64 * 2


@pytest.mark.parametrize("cpu", [Cpu.CORTEX_M0PLUS, Cpu.CORTEX_M7, Cpu.XTENSA_LX7])
def test_fit_schedule_takes_the_fewest_macs_that_fit_and_never_more_than_the_sram(
        cpu: Cpu) -> None:
    graph = tiny_graph()
    whole = sram_account(graph, plan_patches(graph, 1, None), cpu)
    fit = fit_schedule(graph, whole.total_bytes, cpu)
    assert fit.plan.schedule.patches == 1 and fit.account == whole
    # Every option's account, once: (MACs, total).
    costs = [(o.macs, whole.total_bytes if o.profile is None else sram_account(
        graph, plan_patches(graph, o.patches, graph.layers[o.split].name), cpu).total_bytes)
        for o in schedule_options(graph)]
    for sram in range(whole.total_bytes - 1, whole.total_bytes - 2400, -149):
        fitting = [macs for macs, total in costs if total <= sram]
        try:
            fit = fit_schedule(graph, sram, cpu)
        except SramDoesNotFitError as exc:
            assert not fitting
            assert exc.needed.total_bytes > sram == exc.sram_bytes
            assert exc.needed.total_bytes == min(total for _, total in costs)
            assert f"device has {sram / 1024:.1f} kB" in str(exc) and "arena" in str(exc)
            continue
        assert fit.plan.schedule.patches > 1 and fit.account.total_bytes <= sram
        assert fit.account == sram_account(graph, fit.plan, cpu)
        assert fit.plan.macs == min(fitting)  # no schedule with fewer MACs fits


def test_training_memory_is_one_more_part() -> None:
    graph = tiny_graph()
    plain = fit_schedule(graph, 64 * 1024, Cpu.CORTEX_M4)
    trained = fit_schedule(graph, 64 * 1024, Cpu.CORTEX_M4, training_bytes=5000)
    assert trained.account.total_bytes == plain.account.total_bytes + 5000
    with pytest.raises(SramDoesNotFitError, match="training"):
        fit_schedule(graph, 8 * 1024, Cpu.CORTEX_M4, training_bytes=7 * 1024)


def test_pinned_schedules_are_accounted_too() -> None:
    graph = tiny_graph()
    split = split_points(graph)[1]
    fit = fit_schedule(graph, 64 * 1024, Cpu.CORTEX_M33, patches=2, split_after=split)
    assert (fit.plan.schedule.patches, fit.plan.schedule.split_after) == (2, split)
    with pytest.raises(ValueError, match="int8"):
        sram_account(graph, plan_patches(graph, 1, None, bytes_per_element=4), Cpu.CORTEX_M4)
