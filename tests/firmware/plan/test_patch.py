"""Patch-based schedules: MCUNetV2's numbers, receptive fields, tiles and the search."""

from __future__ import annotations

import pytest

from firmware.arch import BlockConfig, NetConfig, mobilenet_v2
from firmware.errors import DoesNotFitError, InvalidModelError
from firmware.frontend.builtin import build_graph, mobilenet_v2_rd
from firmware.plan.memory import MemoryModel, analyze
from firmware.plan.patch import best_schedule, plan_patches, split_points, tiles

pytestmark = pytest.mark.unit

KB = 1024
MBV2 = build_graph(mobilenet_v2(), with_weights=False)


def test_mobilenetv2_p4_reproduces_mcunetv2() -> None:
    plan = plan_patches(MBV2, 4, "b3.project")
    assert MBV2.tensor("b3.project").shape[1:] == (28, 28)
    assert plan.schedule.input_patch == (75, 75)
    assert abs(plan.peak_bytes - 172 * KB) <= KB
    # the peak sits in the per-layer stage: the 32->192 expand at 28x28 (171.5 kB)
    assert (plan.peak_bytes, plan.peak_layer) == (175_616, "b4.expand")
    assert plan.stage_peak_bytes < plan.rest_peak_bytes
    base_stage = sum(r.macs for r in analyze(MBV2).layers[: MBV2.index("b3.project") + 1])
    assert 91e6 < base_stage < 92e6
    # the paper's count (every patch at the interior size): 91 M -> 130 M, +42 %
    assert 129e6 < plan.uniform_stage_macs < 131e6
    assert plan.uniform_stage_macs / base_stage - 1 == pytest.approx(0.42, abs=0.01)
    # executed here (border patches clipped to the image): fewer
    assert plan.stage_macs < plan.uniform_stage_macs
    assert plan.stage_mac_overhead == pytest.approx(plan.stage_macs / base_stage - 1)
    assert 0.08 <= plan.mac_overhead <= 0.14
    assert plan.macs == analyze(MBV2).macs + plan.stage_macs - base_stage


def test_budget_with_four_patches_picks_the_28x28_split() -> None:
    plan = best_schedule(MBV2, 180 * KB, patches=4)
    assert plan.schedule.split_after == "b3.project"
    assert plan.schedule.input_patch == (75, 75)
    assert plan.peak_bytes <= 180 * KB


def test_redistributed_variant_has_smaller_halo() -> None:
    rd = build_graph(mobilenet_v2_rd(), with_weights=False)
    plan = plan_patches(rd, 4, "b1.project")
    assert rd.tensor("b1.project").shape[1:] == (28, 28)
    assert plan.schedule.input_patch == (63, 63)
    base = plan_patches(MBV2, 4, "b3.project")
    assert plan.mac_overhead < 0.03 < base.mac_overhead
    assert plan.peak_bytes <= 172 * KB


def _chain(kernel: int, stride: int, size: tuple[int, int] = (160, 160)) -> NetConfig:
    return NetConfig("chain", size, 4, (BlockConfig(kernel, 1, stride, 4, residual=False),
                                        BlockConfig(kernel, 1, 1, 4, residual=False)), None, 2,
                     stem_kernel=kernel, stem_stride=stride)


@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
@pytest.mark.parametrize("stride", [1, 2])
def test_receptive_field_walk(kernel: int, stride: int) -> None:
    g = build_graph(_chain(kernel, stride), with_weights=False)
    p = 4
    plan = plan_patches(g, p, "b1.project")
    grow = g.tensor("b1.project").height // p
    for s in (1, stride, stride):  # b1.dw, b0.dw, stem, walking back
        grow = grow + kernel - 1 if s == 1 else s * (grow - 1) + kernel
    stem = tiles(g, plan)[p + 1][0]  # patch (1, 1): an interior patch, never clipped
    assert (stem.pad_top, stem.pad_left, stem.pad_bottom, stem.pad_right) == (0, 0, 0, 0)
    assert stem.in_rows[1] - stem.in_rows[0] == grow
    assert stem.in_cols[1] - stem.in_cols[0] == grow
    assert plan.schedule.input_patch == (grow, grow)


def test_non_square_non_divisible_patches_differ_by_at_most_one() -> None:
    g = build_graph(NetConfig("ns", (37, 23), 8, (BlockConfig(5, 2, 2, 8),
                                                  BlockConfig(3, 3, 1, 8)), None, 3),
                    with_weights=False)
    plan = plan_patches(g, 3, "b1.add")
    out = g.tensor("b1.add")
    rows, cols = plan.row_regions["b1.add"], plan.col_regions["b1.add"]
    assert rows[0][0] == 0 and rows[-1][1] == out.height
    assert cols[0][0] == 0 and cols[-1][1] == out.width
    for parts in (rows, cols):
        lengths = [b - a for a, b in parts]
        assert max(lengths) - min(lengths) <= 1
        assert all(parts[k][1] == parts[k + 1][0] for k in range(len(parts) - 1))
    assert plan.schedule.input_patch[0] != plan.schedule.input_patch[1]


def test_tiles_pad_only_at_the_border() -> None:
    plan = plan_patches(MBV2, 4, "b3.project")
    patches = tiles(MBV2, plan)
    assert len(patches) == 16
    for idx, patch in enumerate(patches):
        i, j = divmod(idx, 4)
        stem = patch[0]
        assert stem.layer == "stem"
        assert (stem.pad_top > 0) == (i == 0) and (stem.pad_left > 0) == (j == 0)
        # 224 = 2 * 112 exactly: the last stride-2 window ends inside the image
        assert stem.pad_bottom == stem.pad_right == 0
        for t in patch:
            layer = MBV2.layer(t.layer)
            rows_in = t.in_rows[1] - t.in_rows[0] + t.pad_top + t.pad_bottom
            rows_out = t.out_rows[1] - t.out_rows[0]
            if layer.op.value == "conv2d":
                assert rows_in == (rows_out - 1) * layer.stride[0] + layer.kernel[0]
    interior = patches[5][0]
    assert interior.in_rows[1] - interior.in_rows[0] == 75
    assert patches[5][-1].out_rows == (7, 14)


def test_best_schedule_without_budget_is_lowest_peak() -> None:
    best = best_schedule(MBV2)
    every = [plan_patches(MBV2, p, s) for s in split_points(MBV2)[:12] for p in (2, 4, 8)]
    assert all(best.peak_bytes <= plan.peak_bytes for plan in every)
    assert best.peak_bytes < analyze(MBV2).peak_bytes / 4


def test_best_schedule_prefers_fewest_macs_that_fit() -> None:
    assert best_schedule(MBV2, 2 * 1024 * KB).schedule.patches == 1
    fits = best_schedule(MBV2, 256 * KB)
    assert fits.peak_bytes <= 256 * KB
    tighter = best_schedule(MBV2, 180 * KB)
    assert tighter.macs >= fits.macs


def test_does_not_fit_names_the_numbers() -> None:
    with pytest.raises(DoesNotFitError) as err:
        best_schedule(MBV2, 64 * KB)
    msg = str(err.value)
    assert "SRAM budget 64.0 kB" in msg and "smallest peak" in msg and "at layer b" in msg


def test_separate_model_costs_more() -> None:
    inplace = plan_patches(MBV2, 4, "b3.project")
    separate = plan_patches(MBV2, 4, "b3.project", MemoryModel.SEPARATE)
    assert separate.peak_bytes > inplace.peak_bytes
    assert separate.macs == inplace.macs


def test_invalid_splits_and_patch_counts() -> None:
    with pytest.raises(InvalidModelError, match=r"cannot split .* after 'b2\.expand'"):
        plan_patches(MBV2, 4, "b2.expand")  # the block input still crosses the split
    with pytest.raises(InvalidModelError, match="9x9 patches do not fit"):
        plan_patches(build_graph(_chain(3, 2, (32, 32)), with_weights=False), 9, "b1.project")
    assert "pool" not in split_points(MBV2) and "b2.add" in split_points(MBV2)
