"""Small graphs for the training tests: one layer kind under test between a trained stem conv
and a classifier, with seeded He weights and fixed calibration data."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from firmware.int8.quantize import QuantizedGraph, quantize_graph
from firmware.ir import Activation, Graph, Layer, OpKind, Tensor

KINDS = ("conv", "depthwise", "residual", "avgpool", "maxpool", "gap", "fc-spatial")


@dataclass(frozen=True)
class Case:
    """One drawn graph: the kind under test and its shapes."""

    kind: str
    channels: int  # of the stem's output
    out_channels: int  # of the layer under test (conv only)
    size: int  # input height = width
    kernel: int
    stride: int
    padding: tuple[int, int, int, int]
    activation: Activation
    classes: int
    seed: int


def _out(size: int, kernel: int, stride: int, before: int, after: int) -> int:
    return (size + before + after - kernel) // stride + 1


def build(case: Case) -> Graph:
    """The graph of `case`: input -> stem 3x3 conv (ReLU6) -> [kind] -> (gap) -> fc."""
    rng = np.random.default_rng(case.seed)
    c, s = case.channels, case.size
    tensors = {"input": Tensor("input", 2, s, s), "stem": Tensor("stem", c, s, s)}
    params: dict[str, npt.NDArray[np.float32]] = {}

    def conv(name: str, src: str, cout: int, k: int, stride: int,
             pad: tuple[int, int, int, int], groups: int, act: Activation) -> Layer:
        x = tensors[src]
        h = _out(x.height, k, stride, pad[0], pad[2])
        w = _out(x.width, k, stride, pad[1], pad[3])
        tensors[name] = Tensor(name, cout, h, w)
        fan_in = (x.channels // groups) * k * k
        params[f"{name}.weight"] = (rng.standard_normal((cout, x.channels // groups, k, k))
                                    * math.sqrt(2.0 / fan_in)).astype(np.float32)
        params[f"{name}.bias"] = (0.1 * rng.standard_normal(cout)).astype(np.float32)
        return Layer(name, OpKind.CONV, (src,), name, kernel=(k, k), stride=(stride, stride),
                     padding=pad, groups=groups, activation=act, weight=f"{name}.weight",
                     bias=f"{name}.bias")

    layers = [conv("stem", "input", c, 3, 1, (1, 1, 1, 1), 1, Activation.RELU6)]
    k, st, pad, act = case.kernel, case.stride, case.padding, case.activation
    last = "stem"
    if case.kind == "conv":
        layers.append(conv("mid", "stem", case.out_channels, k, st, pad, 1, act))
        last = "mid"
    elif case.kind == "depthwise":
        layers.append(conv("mid", "stem", c, k, st, pad, c, act))
        last = "mid"
    elif case.kind == "residual":
        layers.append(conv("mid", "stem", c, 1, 1, (0, 0, 0, 0), 1, Activation.NONE))
        tensors["add"] = Tensor("add", c, s, s)
        layers.append(Layer("add", OpKind.ADD, ("stem", "mid"), "add", activation=act))
        last = "add"
    elif case.kind in ("avgpool", "maxpool"):
        op = OpKind.AVG_POOL if case.kind == "avgpool" else OpKind.MAX_POOL
        tensors["mid"] = Tensor("mid", c, _out(s, k, st, pad[0], pad[2]),
                                _out(s, k, st, pad[1], pad[3]))
        layers.append(Layer("mid", op, ("stem",), "mid", kernel=(k, k), stride=(st, st),
                            padding=pad))
        last = "mid"
    if case.kind != "fc-spatial":
        tensors["pool"] = Tensor("pool", tensors[last].channels, 1, 1)
        layers.append(Layer("pool", OpKind.GLOBAL_AVG_POOL, (last,), "pool"))
        last = "pool"
    features = tensors[last].numel
    tensors["flatten"] = Tensor("flatten", features, 1, 1)
    layers.append(Layer("flatten", OpKind.RESHAPE, (last,), "flatten"))
    tensors["classifier"] = Tensor("classifier", case.classes, 1, 1)
    layers.append(Layer("classifier", OpKind.FULLY_CONNECTED, ("flatten",), "classifier",
                        weight="classifier.weight", bias="classifier.bias"))
    params["classifier.weight"] = (rng.standard_normal((case.classes, features))
                                   / math.sqrt(features)).astype(np.float32)
    params["classifier.bias"] = (0.1 * rng.standard_normal(case.classes)).astype(np.float32)
    return Graph(f"case-{case.kind}", "input", "classifier", MappingProxyType(tensors),
                 tuple(layers), MappingProxyType(params))


def quantized(case: Case) -> QuantizedGraph:
    """`build(case)` quantized on 8 fixed calibration images."""
    graph = build(case)
    calib = np.random.default_rng(1000 + case.seed).standard_normal(
        (8, 2, case.size, case.size)).astype(np.float32)
    return quantize_graph(graph, calib)


def image(qgraph: QuantizedGraph, seed: int) -> npt.NDArray[np.int8]:
    """One int8 HWC input image."""
    t = qgraph.graph.tensor(qgraph.graph.input)
    x = np.random.default_rng(seed).standard_normal((1, t.channels, t.height, t.width))
    q = qgraph.input.quantize(x.astype(np.float32))[0]
    return np.ascontiguousarray(q.transpose(1, 2, 0))
