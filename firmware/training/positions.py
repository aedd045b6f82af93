"""Weighted layers indexed from the end of the network: (block from the end, conv role).

Contribution analysis runs on one subnet of a model family, and the search then draws other
subnets with other depths: a layer name ("b12.project") means different things in each. Its
position from the end does not: "the project conv of the last block" exists in every subnet.
Positions are found from the graph's structure alone (no naming convention), so ONNX imports
of MobileNet-style networks get them too:

- a depthwise conv anchors one inverted-residual block; blocks count from the end (1 = last);
- a 1x1 conv whose output feeds that depthwise conv is the block's `expand`, a 1x1 conv that
  reads its output is the block's `project`;
- the conv that reads the graph input is the `stem`; a 1x1 conv after the last block is the
  `head` (block 0); the fully connected layer that writes the graph output is the
  `classifier` (block 0); any other conv is a plain `conv` of the block that follows it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from firmware.ir import Graph, Layer, OpKind
from firmware.training.errors import TrainingError


class Role(enum.Enum):
    """What a weighted layer does in its block."""

    STEM = "stem"
    EXPAND = "expand"
    DEPTHWISE = "depthwise"
    PROJECT = "project"
    HEAD = "head"
    CONV = "conv"
    CLASSIFIER = "classifier"


# Roles in execution order within a block (the stem first, the classifier last).
ROLE_ORDER = (Role.STEM, Role.CONV, Role.EXPAND, Role.DEPTHWISE, Role.PROJECT, Role.HEAD,
              Role.CLASSIFIER)


@dataclass(frozen=True)
class Position:
    """A weighted layer's place counted from the end: block 1 is the last block."""

    block_from_end: int
    role: Role

    @property
    def key(self) -> str:
        """A stable string form, "1.project" (used as a JSON key)."""
        return f"{self.block_from_end}.{self.role.value}"

    @classmethod
    def parse(cls, key: str) -> Position:
        """The Position a `key` names; TrainingError when it is malformed."""
        block, _, role = key.partition(".")
        try:
            return cls(int(block), Role(role))
        except ValueError:
            raise TrainingError(f"position {key!r} is not BLOCK.ROLE with a role of "
                                f"{', '.join(r.value for r in Role)}") from None

    def sort_key(self) -> tuple[int, int]:
        """Order from the end of the network: by block, then by role in execution order."""
        return (self.block_from_end, -ROLE_ORDER.index(self.role))


def is_depthwise(graph: Graph, layer: Layer) -> bool:
    """A conv with one group per channel and as many outputs as inputs."""
    if layer.op is not OpKind.CONV or layer.groups == 1:
        return False
    cin = graph.tensor(layer.inputs[0]).channels
    return layer.groups == cin == graph.tensor(layer.output).channels


def is_weighted(layer: Layer) -> bool:
    """Conv and fully connected layers carry weights and biases."""
    return layer.op in (OpKind.CONV, OpKind.FULLY_CONNECTED)


def classifier_layer(graph: Graph) -> Layer:
    """The fully connected layer that writes the graph output; TrainingError if there is none."""
    layer = graph.producer(graph.output)
    if layer is None or layer.op is not OpKind.FULLY_CONNECTED:
        raise TrainingError(f"graph {graph.name}: the output {graph.output!r} is not written by "
                            "a fully connected classifier, which sparse training needs")
    return layer


def conv_layers(graph: Graph) -> tuple[Layer, ...]:
    """The conv layers in execution order (the classifier excluded)."""
    return tuple(layer for layer in graph.layers if layer.op is OpKind.CONV)


def positions(graph: Graph) -> dict[str, Position]:
    """The Position of every weighted layer, by layer name (see the module docstring)."""
    classifier = classifier_layer(graph)
    convs = conv_layers(graph)
    anchors = [layer.name for layer in convs if is_depthwise(graph, layer)]
    block_of = {name: len(anchors) - i for i, name in enumerate(anchors)}
    producer = {layer.output: layer for layer in graph.layers}
    out: dict[str, Position] = {classifier.name: Position(0, Role.CLASSIFIER)}
    for layer in convs:
        if layer.name in block_of:
            out[layer.name] = Position(block_of[layer.name], Role.DEPTHWISE)
    for index, layer in enumerate(convs):
        if layer.name in out:
            continue
        pointwise = layer.kernel == (1, 1) and layer.groups == 1
        readers = [c for c in graph.consumers(layer.output) if c.name in block_of]
        source = producer.get(layer.inputs[0])
        if layer.inputs[0] == graph.input:
            out[layer.name] = Position(len(anchors) + 1, Role.STEM)
        elif pointwise and readers:
            out[layer.name] = Position(block_of[readers[0].name], Role.EXPAND)
        elif pointwise and source is not None and source.name in block_of:
            out[layer.name] = Position(block_of[source.name], Role.PROJECT)
        else:
            later = [block_of[c.name] for c in convs[index + 1:] if c.name in block_of]
            after_last_block = not later
            role = Role.HEAD if after_last_block and pointwise else Role.CONV
            out[layer.name] = Position(later[0] if later else 0, role)
    return out


def layers_at(graph: Graph) -> dict[Position, str]:
    """Layer name by Position; TrainingError if two layers share one (an unusual graph)."""
    found: dict[Position, str] = {}
    for name, pos in positions(graph).items():
        if pos in found:
            raise TrainingError(f"graph {graph.name}: layers {found[pos]} and {name} both sit "
                                f"at position {pos.key}")
        found[pos] = name
    return found
