"""Layer-based memory accounting (DESIGN.md "Memory accounting") and the static arena."""

from __future__ import annotations

import pytest

from firmware.arch import BlockConfig, NetConfig, mobilenet_v2
from firmware.frontend.builtin import build_graph
from firmware.plan.memory import MemoryModel, analyze, buffers, lifetimes, plan_arena

pytestmark = pytest.mark.unit

MBV2 = build_graph(mobilenet_v2(), with_weights=False)


def test_mobilenetv2_inplace_peak_matches_paper() -> None:
    report = analyze(MBV2)
    assert report.peak_bytes == 1_404_928 == 200_704 + 1_204_224  # 1372 kB
    assert report.peak_layer == "b1.expand"
    row = next(r for r in report.layers if r.name == "b1.expand")
    assert (row.in_bytes, row.out_bytes, row.op) == (200_704, 1_204_224, "conv2d 16->96 1x1")
    assert 300e6 < report.macs < 301e6  # MobileNetV2-1.0 is "300 M MACs"


def test_mobilenetv2_separate_peak_matches_model_zoo() -> None:
    report = analyze(MBV2, MemoryModel.SEPARATE)
    assert report.peak_bytes == 1470 * 1024
    assert report.peak_layer == "b1.dw"


def test_inplace_rules() -> None:
    rows = {r.name: r for r in analyze(MBV2).layers}
    # depthwise over its input: max(in, out), not the sum
    assert rows["b1.dw"].live_bytes == 1_204_224
    # after the in-place depthwise only its smaller output stays
    assert rows["b1.project"].live_bytes == 301_056 + 75_264
    # residual block: the block input stays live through expand and dw; the add is free
    assert rows["b2.dw"].live_bytes == 75_264 + 451_584
    assert rows["b2.add"].live_bytes == 75_264
    sep = {r.name: r for r in analyze(MBV2, MemoryModel.SEPARATE).layers}
    assert sep["b2.dw"].live_bytes == 75_264 + 2 * 451_584
    assert sep["b2.add"].live_bytes == 3 * 75_264


def test_bytes_per_element() -> None:
    assert analyze(MBV2, bytes_per_element=4).peak_bytes == 4 * 1_404_928
    assert analyze(MBV2, bytes_per_element=0.5).peak_bytes == 1_404_928 // 2


def test_weights_bytes_of_a_small_net() -> None:
    cfg = NetConfig("w", (8, 8), 4, (BlockConfig(3, 2, 1, 4),), None, 3)
    g = build_graph(cfg, with_weights=False)
    report = analyze(g)
    # stem 4*3*9, expand 8*4, dw 8*9, project 4*8, fc 3*4; + 12 bytes per output channel
    weights = 108 + 32 + 72 + 32 + 12
    channels = 4 + 8 + 8 + 4 + 3
    assert report.weights_bytes == weights + 12 * channels


def test_layer_slice_reports_the_rest() -> None:
    full = analyze(MBV2)
    rest = analyze(MBV2, layers=slice(MBV2.index("b3.project") + 1, None))
    assert rest.peak_bytes == 175_616  # 171.5 kB: 32->192 expand at 28x28 (MCUNetV2 Sec. 3)
    assert rest.peak_layer == "b4.expand"
    assert rest.layers == full.layers[MBV2.index("b3.project") + 1:]


@pytest.mark.parametrize("model", list(MemoryModel))
def test_arena_never_overlaps_live_buffers(model: MemoryModel) -> None:
    for graph in (MBV2, build_graph(NetConfig("t", (15, 11), 8, (
            BlockConfig(3, 1, 1, 8), BlockConfig(5, 3, 2, 16), BlockConfig(7, 4, 1, 16)),
            24, 4), with_weights=False)):
        plan = plan_arena(graph, model)
        span = lifetimes(graph)
        sizes = {n: t.numel for n, t in graph.tensors.items()}
        bufs = buffers(graph, model)
        assert plan.size_bytes >= analyze(graph, model).peak_bytes
        for a in bufs:
            for b in bufs:
                if a is b or a.first > b.last or b.first > a.last:
                    continue
                ra = (plan.offsets[a.tensors[0]],
                      plan.offsets[a.tensors[0]] + max(sizes[t] for t in a.tensors))
                rb = (plan.offsets[b.tensors[0]],
                      plan.offsets[b.tensors[0]] + max(sizes[t] for t in b.tensors))
                assert ra[1] <= rb[0] or rb[1] <= ra[0], (a, b)
        for t in graph.tensors:
            assert plan.offsets[t] + sizes[t] <= plan.size_bytes
            assert t in span
