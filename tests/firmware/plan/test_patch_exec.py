"""Patch-based execution equals whole-tensor execution (the schedule computes the same thing)."""

from __future__ import annotations

from types import MappingProxyType

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware.arch import mobilenet_v2
from firmware.errors import InvalidModelError
from firmware.frontend.builtin import build_graph
from firmware.ir import Activation, Graph, Layer, OpKind, Tensor
from firmware.plan.patch import plan_patches, split_points, tiles
from firmware.plan.patch_exec import execute, execute_patched

pytestmark = pytest.mark.unit


class _Net:
    """A random spatial network drawn step by step, then global pool + classifier."""

    def __init__(self, channels: int, height: int, width: int, rng: np.random.Generator) -> None:
        self.tensors = {"x": Tensor("x", channels, height, width)}
        self.layers: list[Layer] = []
        self.params: dict[str, np.ndarray] = {}
        self.rng = rng
        self.last = "x"

    def _add(self, layer: Layer, out: tuple[int, int, int]) -> str:
        self.tensors[layer.output] = Tensor(layer.output, *out)
        self.layers.append(layer)
        self.last = layer.output
        return layer.output

    def conv(self, src: str, cout: int, k: int, s: int, groups: int = 1,
             act: Activation = Activation.RELU6) -> str:
        t = self.tensors[src]
        name = f"l{len(self.layers)}"
        pad = k // 2
        ho, wo = (t.height + 2 * pad - k) // s + 1, (t.width + 2 * pad - k) // s + 1
        self.params[f"{name}.w"] = self.rng.standard_normal(
            (cout, t.channels // groups, k, k)) / k
        self.params[f"{name}.b"] = self.rng.standard_normal(cout)
        return self._add(Layer(name, OpKind.CONV, (src,), name, (k, k), (s, s),
                               (pad, pad, pad, pad), groups, act, f"{name}.w", f"{name}.b"),
                         (cout, ho, wo))

    def pool(self, src: str, op: OpKind, k: int, s: int) -> str:
        t = self.tensors[src]
        name = f"l{len(self.layers)}"
        pad = k // 2
        ho, wo = (t.height + 2 * pad - k) // s + 1, (t.width + 2 * pad - k) // s + 1
        return self._add(Layer(name, op, (src,), name, (k, k), (s, s), (pad, pad, pad, pad)),
                         (t.channels, ho, wo))

    def join(self, op: OpKind, a: str, b: str) -> str:
        ta, tb = self.tensors[a], self.tensors[b]
        name = f"l{len(self.layers)}"
        c = ta.channels + tb.channels if op is OpKind.CONCAT else ta.channels
        return self._add(Layer(name, op, (a, b), name), (c, ta.height, ta.width))

    def graph(self) -> Graph:
        t = self.tensors[self.last]
        self._add(Layer("gap", OpKind.GLOBAL_AVG_POOL, (self.last,), "gap"), (t.channels, 1, 1))
        self.params["fc.w"] = self.rng.standard_normal((3, t.channels))
        self.params["fc.b"] = self.rng.standard_normal(3)
        self._add(Layer("fc", OpKind.FULLY_CONNECTED, ("gap",), "fc", weight="fc.w",
                        bias="fc.b"), (3, 1, 1))
        return Graph("random", "x", "fc", MappingProxyType(self.tensors), tuple(self.layers),
                     MappingProxyType(self.params))


STEPS = ["conv", "dwconv", "grouped", "residual", "inverted", "concat", "maxpool", "avgpool"]


@st.composite
def nets(draw: st.DrawFn) -> tuple[Graph, int, str]:
    height, width = draw(st.integers(9, 31)), draw(st.integers(9, 31))
    net = _Net(3, height, width, np.random.default_rng(draw(st.integers(0, 2**16))))
    kernels = st.sampled_from([3, 5, 7])
    for step in draw(st.lists(st.sampled_from(STEPS), min_size=1, max_size=5)):
        t = net.tensors[net.last]
        stride = draw(st.sampled_from([1, 2])) if min(t.height, t.width) >= 8 else 1
        if step == "conv":
            net.conv(net.last, draw(st.integers(2, 6)), draw(kernels), stride)
        elif step == "dwconv":
            net.conv(net.last, t.channels, draw(kernels), stride, groups=t.channels)
        elif step == "grouped":
            src = net.conv(net.last, 4, 1, 1)
            net.conv(src, 6, draw(kernels), stride, groups=2)
        elif step == "residual":
            a = net.conv(net.last, t.channels, draw(kernels), 1)
            net.join(OpKind.ADD, t.name, net.conv(a, t.channels, 1, 1, act=Activation.NONE))
        elif step == "inverted":  # MobileNetV2 block: expand, depthwise, project, add
            e = net.conv(net.last, 2 * t.channels, 1, 1)
            d = net.conv(e, 2 * t.channels, draw(kernels), 1, groups=2 * t.channels)
            net.join(OpKind.ADD, t.name, net.conv(d, t.channels, 1, 1, act=Activation.NONE))
        elif step == "concat":  # branches with different halos, in either order
            k_first, k_second = draw(st.permutations([1, draw(kernels)]))
            a = net.conv(t.name, 2, k_first, 1)
            net.join(OpKind.CONCAT, a, net.conv(t.name, 3, k_second, 1))
        else:
            net.pool(net.last, OpKind.MAX_POOL if step == "maxpool" else OpKind.AVG_POOL,
                     3, stride)
    graph = net.graph()
    points = [p for p in split_points(graph) if graph.layer(p).op is not OpKind.GLOBAL_AVG_POOL]
    split = draw(st.sampled_from(points))
    out = graph.tensor(graph.layer(split).output)
    patches = draw(st.integers(2, min(5, out.height, out.width)))
    return graph, patches, split


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=nets(), seed=st.integers(0, 2**16))
def test_patch_execution_equals_whole_tensor(case: tuple[Graph, int, str], seed: int) -> None:
    graph, patches, split = case
    x = np.random.default_rng(seed).standard_normal(graph.tensor("x").shape)
    plan = plan_patches(graph, patches, split)
    whole = execute(graph, x)
    patched = execute_patched(graph, plan, x)
    stage_out = graph.layer(split).output
    assert _rel_err(patched[stage_out], whole[stage_out]) < 1e-5
    assert _rel_err(patched["fc"], whole["fc"]) < 1e-5


def test_mobilenetv2_patch_execution() -> None:
    g = build_graph(mobilenet_v2(0.35, (61, 47)), seed=1)
    x = np.random.default_rng(0).standard_normal(g.tensor("input").shape)
    whole = execute(g, x)
    for split, p in (("b3.project", 3), ("b5.add", 4), ("b1.dw", 7)):
        patched = execute_patched(g, plan_patches(g, p, split), x)
        assert _rel_err(patched["classifier"], whole["classifier"]) < 1e-5


def test_a_wrong_tile_is_caught() -> None:
    g = build_graph(mobilenet_v2(0.35, 32), seed=1)
    plan = plan_patches(g, 2, "b1.project")
    tile = tiles(g, plan)[0][0]
    x = np.zeros(g.tensor("input").shape)
    from firmware.plan.patch_exec import _run_tile  # the tile runner itself checks its shapes
    bad = tile.__class__(**{**tile.__dict__, "pad_bottom": tile.pad_bottom + 2})
    with pytest.raises(InvalidModelError, match="produced"):
        _run_tile(g, bad, {"input": (x, 0, 0)})
