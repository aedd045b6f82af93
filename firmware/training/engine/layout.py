"""Layouts the engine works in: HWC activations, fully connected weights in HWC order."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from firmware.ir import Activation, Graph, Layer, OpKind

F32 = npt.NDArray[np.float32]


def hwc_shape(graph: Graph, tensor: str) -> tuple[int, int, int]:
    """(H, W, C) of an IR tensor, as the runtime stores it."""
    t = graph.tensor(tensor)
    return (t.height, t.width, t.channels)


def fc_source_shape(graph: Graph, layer: Layer) -> tuple[int, int, int]:
    """(C, H, W) of the tensor a fully connected layer flattens (through reshapes)."""
    source = graph.tensor(layer.inputs[0])
    producer = graph.producer(source.name)
    while producer is not None and producer.op is OpKind.RESHAPE:
        source = graph.tensor(producer.inputs[0])
        producer = graph.producer(source.name)
    return source.shape


def fc_to_hwc(graph: Graph, layer: Layer, weight: npt.NDArray[np.generic]
              ) -> npt.NDArray[np.generic]:
    """Fully connected weights (out, in in CHW order) -> (out, in in HWC order)."""
    c, h, w = fc_source_shape(graph, layer)
    if h * w == 1:
        return weight
    return weight.reshape(weight.shape[0], c, h, w).transpose(0, 2, 3, 1).reshape(
        weight.shape[0], -1)


def fc_from_hwc(graph: Graph, layer: Layer, weight: F32) -> F32:
    """The inverse of fc_to_hwc."""
    c, h, w = fc_source_shape(graph, layer)
    if h * w == 1:
        return weight
    out: F32 = weight.reshape(weight.shape[0], h, w, c).transpose(0, 3, 1, 2).reshape(
        weight.shape[0], -1)
    return out


def activation_bounds(activation: Activation) -> tuple[float, float]:
    """Real clamp of a fused activation (fp32 baseline)."""
    if activation is Activation.RELU:
        return 0.0, math.inf
    if activation is Activation.RELU6:
        return 0.0, 6.0
    return -math.inf, math.inf
