"""The sparse-update scheme: what one device trains, in one versioned JSON format.

A scheme ships in the firmware manifest (the OTA campaign writes it there) and the device's
trainer reads it back, so its JSON form is frozen per `version`:

    {
      "format": "tinyfleet.sparse-update",
      "version": 1,
      "classifier": "fp32",              # the classifier head trains in fp32 or in int8
      "bias_layers": 6,                  # biases of the last 6 conv layers (and the classifier's)
      "weights": [                       # weights of these layers, on the first r of their
        {"layer": "b13.project", "ratio": 0.5},     # input channels, r in 1/8, 1/4, 1/2, 1
        {"layer": "b13.expand", "ratio": 0.25}
      ],
      "optimizer": {"kind": "sgd", "lr": 0.02, "momentum": 0.0},
      "accumulate_steps": 1,             # batch 1; gradients summed over this many samples
      "qas": true                        # quantization-aware scaling of the int8 gradients
    }

The classifier always trains (weights and bias, all channels): the paper's baseline is
"classifier only" and every scheme adds to it. For a depthwise conv, r applies to its
channels (each filter reads one input channel). A `SchemeTemplate` is the same scheme with
layers named by position from the end, so that it applies to any subnet of a family.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from firmware.ir import Graph, Layer, OpKind
from firmware.training.errors import SchemeError
from firmware.training.positions import (
    Position,
    classifier_layer,
    conv_layers,
    is_depthwise,
    layers_at,
    positions,
)

SCHEME_FORMAT = "tinyfleet.sparse-update"
SCHEME_VERSION = 1
RATIOS = (0.125, 0.25, 0.5, 1.0)  # the paper's channel ratios, exact in binary
DEFAULT_LR = 0.02


class ClassifierMode(enum.Enum):
    """Precision the classifier head trains in (the paper keeps it in fp32)."""

    FP32 = "fp32"
    INT8 = "int8"


@dataclass(frozen=True)
class WeightUpdate:
    """Train the weights of `layer` on the first `ratio` of its input channels."""

    layer: str
    ratio: float

    def __post_init__(self) -> None:
        if self.ratio not in RATIOS:
            raise SchemeError(f"weights of {self.layer}: ratio {self.ratio!r} is not one of "
                              f"{', '.join(map(str, RATIOS))}")


@dataclass(frozen=True)
class SparseUpdateScheme:
    """A sparse update (see the module docstring for the JSON form)."""

    bias_layers: int = 0
    weights: tuple[WeightUpdate, ...] = ()
    classifier: ClassifierMode = ClassifierMode.FP32
    lr: float = DEFAULT_LR
    momentum: float = 0.0
    accumulate_steps: int = 1
    qas: bool = True
    version: int = SCHEME_VERSION

    def __post_init__(self) -> None:
        if self.version != SCHEME_VERSION:
            raise SchemeError(f"scheme version {self.version!r} is not {SCHEME_VERSION}")
        if self.bias_layers < 0:
            raise SchemeError(f"bias_layers {self.bias_layers} must be >= 0")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise SchemeError(f"optimizer.lr {self.lr!r} must be finite and > 0")
        if not 0.0 <= self.momentum < 1.0:
            raise SchemeError(f"optimizer.momentum {self.momentum!r} must lie in [0, 1)")
        if self.accumulate_steps < 1:
            raise SchemeError(f"accumulate_steps {self.accumulate_steps} must be >= 1")
        names = [w.layer for w in self.weights]
        if len(set(names)) != len(names):
            raise SchemeError(f"weights list a layer twice: {sorted(names)}")

    @property
    def ratios(self) -> dict[str, float]:
        """Weight ratio by layer name."""
        return {w.layer: w.ratio for w in self.weights}

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form (module docstring)."""
        return {
            "format": SCHEME_FORMAT, "version": self.version,
            "classifier": self.classifier.value, "bias_layers": self.bias_layers,
            "weights": [{"layer": w.layer, "ratio": w.ratio} for w in self.weights],
            "optimizer": {"kind": "sgd", "lr": self.lr, "momentum": self.momentum},
            "accumulate_steps": self.accumulate_steps, "qas": self.qas,
        }

    def to_json(self) -> str:
        """The scheme as a JSON document."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SparseUpdateScheme:
        """Parse a `to_dict` form; SchemeError names the first bad field."""
        if not isinstance(data, Mapping):
            raise SchemeError(f"a scheme is a JSON object, got {type(data).__name__}")
        if data.get("format") != SCHEME_FORMAT:
            raise SchemeError(f"format {data.get('format')!r} is not {SCHEME_FORMAT!r}")
        known = {"format", "version", "classifier", "bias_layers", "weights", "optimizer",
                 "accumulate_steps", "qas"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SchemeError(f"unknown field(s) {', '.join(unknown)}")
        optimizer = _field(data, "optimizer", dict, {"kind": "sgd", "lr": DEFAULT_LR})
        if optimizer.get("kind", "sgd") != "sgd" or set(optimizer) - {"kind", "lr", "momentum"}:
            raise SchemeError(f"optimizer {optimizer!r}: only {{kind: sgd, lr, momentum}}")
        weights = []
        for i, entry in enumerate(_field(data, "weights", list, [])):
            if not isinstance(entry, dict) or set(entry) != {"layer", "ratio"}:
                raise SchemeError(f"weights[{i}] must be {{layer, ratio}}, got {entry!r}")
            if not isinstance(entry["layer"], str) or not _is_number(entry["ratio"]):
                raise SchemeError(f"weights[{i}]: layer must be a string and ratio a number")
            weights.append(WeightUpdate(entry["layer"], float(entry["ratio"])))
        try:
            classifier = ClassifierMode(_field(data, "classifier", str, "fp32"))
        except ValueError:
            raise SchemeError(f"classifier {data['classifier']!r} is not fp32 or int8") from None
        lr, momentum = optimizer.get("lr", DEFAULT_LR), optimizer.get("momentum", 0.0)
        if not _is_number(lr) or not _is_number(momentum):
            raise SchemeError("optimizer.lr and optimizer.momentum must be numbers")
        return cls(
            bias_layers=_field(data, "bias_layers", int, 0), weights=tuple(weights),
            classifier=classifier, lr=float(lr), momentum=float(momentum),
            accumulate_steps=_field(data, "accumulate_steps", int, 1),
            qas=_field(data, "qas", bool, True), version=_field(data, "version", int, 0))

    @classmethod
    def from_json(cls, text: str | bytes) -> SparseUpdateScheme:
        """Parse a JSON document; SchemeError for bad JSON or a bad field."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SchemeError(f"not a JSON scheme: {exc}") from None
        return cls.from_dict(data)

    def describe(self) -> str:
        """One line: "classifier fp32 + biases of the last 6 convs + weights b13.project 1/2"."""
        parts = [f"classifier {self.classifier.value}"]
        if self.bias_layers:
            parts.append(f"biases of the last {self.bias_layers} convs")
        for w in self.weights:
            parts.append(f"{w.layer} weights {_fraction(w.ratio)}")
        return " + ".join(parts)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _field(data: Mapping[str, Any], name: str, kind: type, default: Any) -> Any:
    value = data.get(name, default)
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise SchemeError(f"field {name!r} must be {kind.__name__}, got {value!r}")
    return value


def _fraction(ratio: float) -> str:
    return "1" if ratio == 1.0 else f"1/{round(1 / ratio)}"


@dataclass(frozen=True)
class TrainableLayer:
    """What one layer trains: its bias, and its weights on `weight_channels` channels."""

    layer: Layer
    index: int  # position in Graph.layers
    bias: bool
    weight_channels: int  # 0: weights frozen
    weight_ratio: float  # 0.0 when frozen

    @property
    def name(self) -> str:
        """The layer's name."""
        return self.layer.name


@dataclass(frozen=True)
class ResolvedScheme:
    """A scheme applied to one graph: the trainable layers by name, region start, classifier."""

    scheme: SparseUpdateScheme
    graph: Graph
    trainable: Mapping[str, TrainableLayer]
    classifier: str
    region_start: int = field(default=0)  # first layer the backward pass reaches

    def weight_shape(self, name: str) -> tuple[int, ...]:
        """Shape of the trained slice of a layer's weights (its master copy)."""
        t = self.trainable[name]
        shape = weight_shape(self.graph, t.layer)
        if t.weight_channels == 0:
            return (0,)
        if is_depthwise(self.graph, t.layer):
            return (t.weight_channels, *shape[1:])
        return (shape[0], t.weight_channels, *shape[2:])


def weight_shape(graph: Graph, layer: Layer) -> tuple[int, ...]:
    """Shape of a layer's weights in the IR: conv OIHW (I = in / groups), fc (out, in)."""
    cin = graph.tensor(layer.inputs[0])
    cout = graph.tensor(layer.output).channels
    if layer.op is OpKind.FULLY_CONNECTED:
        return (cout, cin.numel)
    return (cout, cin.channels // layer.groups, *layer.kernel)


def trainable_channels(graph: Graph, layer: Layer, ratio: float) -> int:
    """Input channels (depthwise: channels) trained at `ratio`: ceil(ratio * C), at least 1."""
    shape = weight_shape(graph, layer)
    total = shape[0] if is_depthwise(graph, layer) else shape[1]
    return max(1, math.ceil(ratio * total))


def resolve(scheme: SparseUpdateScheme, graph: Graph) -> ResolvedScheme:
    """Apply `scheme` to `graph`; SchemeError names a layer or count that does not exist."""
    classifier = classifier_layer(graph)
    convs = conv_layers(graph)
    if scheme.bias_layers > len(convs):
        raise SchemeError(f"bias_layers {scheme.bias_layers} > the {len(convs)} conv layers "
                          f"of {graph.name}")
    index = {layer.name: i for i, layer in enumerate(graph.layers)}
    ratios = scheme.ratios
    for name in ratios:
        if name not in index:
            raise SchemeError(f"weights: {graph.name} has no layer {name!r}")
        layer = graph.layers[index[name]]
        if layer.op is not OpKind.CONV:
            raise SchemeError(f"weights: layer {name} is {layer.op.value}, not a conv (the "
                              "classifier always trains)")
        if layer.groups != 1 and not is_depthwise(graph, layer):
            raise SchemeError(f"weights: layer {name} is a grouped conv, which cannot train")
    biased = {layer.name for layer in convs[len(convs) - scheme.bias_layers:]}
    trainable: dict[str, TrainableLayer] = {}
    for name in sorted(biased | set(ratios), key=index.__getitem__):
        layer = graph.layers[index[name]]
        ratio = ratios.get(name, 0.0)
        channels = trainable_channels(graph, layer, ratio) if ratio else 0
        trainable[name] = TrainableLayer(layer, index[name], name in biased, channels, ratio)
    cls_shape = weight_shape(graph, classifier)
    trainable[classifier.name] = TrainableLayer(classifier, index[classifier.name], True,
                                                cls_shape[1], 1.0)
    start = min(t.index for t in trainable.values())
    return ResolvedScheme(scheme, graph, trainable, classifier.name, start)


@dataclass(frozen=True)
class SchemeTemplate:
    """A scheme whose weight updates name positions from the end, for any subnet of a family."""

    bias_layers: int
    weights: tuple[tuple[Position, float], ...]

    def instantiate(self, graph: Graph, base: SparseUpdateScheme | None = None
                    ) -> SparseUpdateScheme:
        """The scheme for `graph`: positions it lacks (a shallower net) are dropped."""
        at = layers_at(graph)
        convs = len(conv_layers(graph))
        weights = tuple(WeightUpdate(at[pos], ratio) for pos, ratio in self.weights
                        if pos in at)
        template = base or SparseUpdateScheme()
        return replace(template, bias_layers=min(self.bias_layers, convs), weights=weights)

    @classmethod
    def of(cls, scheme: SparseUpdateScheme, graph: Graph) -> SchemeTemplate:
        """The template of a concrete scheme on `graph`."""
        pos = positions(graph)
        return cls(scheme.bias_layers, tuple(sorted(
            ((pos[w.layer], w.ratio) for w in scheme.weights),
            key=lambda item: item[0].sort_key())))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: {bias_layers, weights: [{position: "1.project", ratio}]}."""
        return {"bias_layers": self.bias_layers,
                "weights": [{"position": p.key, "ratio": r} for p, r in self.weights]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SchemeTemplate:
        """Parse a `to_dict` form."""
        try:
            return cls(int(data["bias_layers"]), tuple(
                (Position.parse(str(w["position"])), float(w["ratio"]))
                for w in data["weights"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SchemeError(f"malformed scheme template: {exc}") from None
