"""The model IR: typed, frozen values that every stage of the pipeline reads.

A `Graph` is a list of `Layer`s in topological order over named `Tensor`s. Activations are
described per image (no batch axis) as (channels, height, width); the C runtime stores them
NHWC. Weights live beside the graph in `Graph.params`, keyed by the names a layer holds:
conv weights are OIHW with I = in_channels / groups (torch's layout), fully connected weights
are (out_features, in_features), biases are (out,). Batch normalization never appears here:
importers fold it into the preceding convolution.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from firmware.errors import InvalidModelError


class OpKind(enum.Enum):
    """What a layer computes."""

    CONV = "conv2d"  # dense, depthwise (groups == in == out channels) or grouped
    FULLY_CONNECTED = "fc"
    ADD = "add"  # elementwise sum of two tensors of one shape (a residual join)
    AVG_POOL = "avgpool"
    MAX_POOL = "maxpool"
    GLOBAL_AVG_POOL = "gap"  # (C, H, W) -> (C, 1, 1)
    CONCAT = "concat"  # along channels
    RESHAPE = "reshape"  # flatten; the bytes do not move


class Activation(enum.Enum):
    """An activation fused into the layer that produces a tensor (a clamp in int8)."""

    NONE = "none"
    RELU = "relu"
    RELU6 = "relu6"


@dataclass(frozen=True)
class Tensor:
    """An activation tensor of one image: (channels, height, width)."""

    name: str
    channels: int
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width)."""
        return (self.channels, self.height, self.width)

    @property
    def numel(self) -> int:
        """Number of elements."""
        return self.channels * self.height * self.width


@dataclass(frozen=True)
class Layer:
    """One operator. Spatial attributes are (height, width) pairs.

    `padding` is (top, left, bottom, right) zero padding of the input, in elements.
    `weight` and `bias` name entries of `Graph.params` (None where the op has none).
    """

    name: str
    op: OpKind
    inputs: tuple[str, ...]
    output: str
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    groups: int = 1
    activation: Activation = Activation.NONE
    weight: str | None = None
    bias: str | None = None

    @property
    def is_depthwise(self) -> bool:
        """True for a conv with one group per channel (set by the graph check, see Graph)."""
        return self.op is OpKind.CONV and self.groups > 1


@dataclass(frozen=True)
class Graph:
    """A network: tensors, layers in topological order, one input and one output.

    `params` maps weight/bias names to float32 (or, after quantization, integer) arrays.
    """

    name: str
    input: str
    output: str
    tensors: Mapping[str, Tensor]
    layers: tuple[Layer, ...]
    params: Mapping[str, npt.NDArray[np.generic]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def __post_init__(self) -> None:
        check_graph(self)

    def tensor(self, name: str) -> Tensor:
        """The tensor called `name`."""
        return self.tensors[name]

    def producer(self, tensor: str) -> Layer | None:
        """The layer that writes `tensor`, None for the graph input."""
        for layer in self.layers:
            if layer.output == tensor:
                return layer
        return None

    def consumers(self, tensor: str) -> tuple[Layer, ...]:
        """The layers that read `tensor`, in order."""
        return tuple(layer for layer in self.layers if tensor in layer.inputs)

    def layer(self, name: str) -> Layer:
        """The layer called `name`."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def index(self, name: str) -> int:
        """Position of the layer called `name` in execution order."""
        for i, layer in enumerate(self.layers):
            if layer.name == name:
                return i
        raise KeyError(name)


def check_graph(graph: Graph) -> None:
    """Raise InvalidModelError unless every tensor is defined once, before it is read."""
    defined = {graph.input}
    if graph.input not in graph.tensors:
        raise InvalidModelError(f"graph {graph.name}: input tensor {graph.input!r} not declared")
    seen_layers: set[str] = set()
    for layer in graph.layers:
        if layer.name in seen_layers:
            raise InvalidModelError(f"graph {graph.name}: duplicate layer name {layer.name!r}")
        seen_layers.add(layer.name)
        for name in layer.inputs:
            if name not in defined:
                raise InvalidModelError(
                    f"layer {layer.name}: input {name!r} is not produced before it is read"
                )
        if layer.output in defined:
            raise InvalidModelError(f"layer {layer.name}: tensor {layer.output!r} written twice")
        if layer.output not in graph.tensors:
            raise InvalidModelError(f"layer {layer.name}: output {layer.output!r} not declared")
        for ref in (layer.weight, layer.bias):
            if ref is not None and graph.params and ref not in graph.params:
                raise InvalidModelError(f"layer {layer.name}: parameter {ref!r} missing")
        defined.add(layer.output)
    if graph.output not in defined:
        raise InvalidModelError(f"graph {graph.name}: output {graph.output!r} is never produced")
