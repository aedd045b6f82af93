"""A fine-tuned model version: the int8 layers that training changed, plus the sha256 of its base.

    OUT/model.json     {"format": "tinyfleet.int8-model", "version": 1, "id": ...,
                        "name": graph name, "base": {"path": ..., "sha256": ...},
                        "tensors": {tensor: [scale, zero_point]}, "changed": [layer, ...],
                        "weights_sha256": ..., "scheme": {...}, "training": {...}}
    OUT/weights.npz    per changed layer: <layer>.weight_q (int8, IR layout), <layer>.bias_q
                       (int32), <layer>.weight_scale (float64, per output channel)

The base is the model it was trained from: an ONNX file (float; the int8 graph is its
per-channel weight quantization under the recorded tensor parameters, which is
deterministic) or another model version directory (a chain). Loading rebuilds the int8
graph: the base's layers, with the changed ones replaced and their requantization
multipliers recomputed from the stored scales (`quantize_multiplier`, as the quantizer does),
so the compiler and `firmware.int8.reference` take it like any quantized graph. A base whose
sha256 differs from the recorded one is refused. `id` is 16 hex digits of the sha256 of the
base's hash, the weights' hash and the tensor parameters: a new version for new weights.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from firmware.int8.quantize import (
    QuantizedGraph,
    QuantLayer,
    QuantParams,
    activation_clamp,
    quantize_layer,
    quantize_multiplier,
)
from firmware.ir import Graph, OpKind
from firmware.training.errors import ModelVersionError

MODEL_FORMAT = "tinyfleet.int8-model"
MODEL_VERSION = 1
MANIFEST = "model.json"
WEIGHTS = "weights.npz"

# Loads a base model file or directory: an ONNX file gives a float Graph (quantized here with
# the recorded tensor parameters), a model version directory its QuantizedGraph.
BaseLoader = Callable[[Path], Graph | QuantizedGraph]


def sha256_of(path: Path) -> str:
    """sha256 of a base: a file's bytes, or a version directory's model.json."""
    target = path / MANIFEST if path.is_dir() else path
    try:
        return hashlib.sha256(target.read_bytes()).hexdigest()
    except OSError as exc:
        raise ModelVersionError(f"base {path}: {exc.strerror}") from None


@dataclass(frozen=True)
class ModelVersion:
    """What model.json records (module docstring)."""

    id: str
    name: str
    base_path: str
    base_sha256: str
    tensors: Mapping[str, QuantParams]
    changed: tuple[str, ...]
    weights_sha256: str
    scheme: Mapping[str, Any] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The model.json document."""
        return {
            "format": MODEL_FORMAT, "version": MODEL_VERSION, "id": self.id, "name": self.name,
            "base": {"path": self.base_path, "sha256": self.base_sha256},
            "tensors": {k: [v.scale, v.zero_point] for k, v in self.tensors.items()},
            "changed": list(self.changed), "weights_sha256": self.weights_sha256,
            "scheme": dict(self.scheme), "training": dict(self.training),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelVersion:
        """Parse model.json; ModelVersionError names the bad field."""
        if data.get("format") != MODEL_FORMAT or data.get("version") != MODEL_VERSION:
            raise ModelVersionError(f"not a {MODEL_FORMAT} version {MODEL_VERSION} document "
                                    f"(format {data.get('format')!r}, version "
                                    f"{data.get('version')!r})")
        try:
            return cls(
                id=str(data["id"]), name=str(data["name"]),
                base_path=str(data["base"]["path"]), base_sha256=str(data["base"]["sha256"]),
                tensors=MappingProxyType({k: QuantParams(float(v[0]), int(v[1]))
                                          for k, v in data["tensors"].items()}),
                changed=tuple(str(c) for c in data["changed"]),
                weights_sha256=str(data["weights_sha256"]),
                scheme=dict(data.get("scheme", {})), training=dict(data.get("training", {})))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ModelVersionError(f"model.json lacks or mangles {exc!r}") from None


def changed_layers(base: QuantizedGraph, trained: QuantizedGraph) -> tuple[str, ...]:
    """Layers whose int8 weights, biases or scales differ between two graphs."""
    out = []
    for name, ql in trained.layers.items():
        old = base.layers[name]
        if ql.weight_q is None:
            continue
        assert old.weight_q is not None and old.bias_q is not None and ql.bias_q is not None
        assert old.weight_scale is not None and ql.weight_scale is not None
        if (not np.array_equal(ql.weight_q, old.weight_q)
                or not np.array_equal(ql.bias_q, old.bias_q)
                or not np.array_equal(ql.weight_scale, old.weight_scale)
                or ql.output != old.output):
            out.append(name)
    return tuple(out)


def save_version(out_dir: Path, trained: QuantizedGraph, base: QuantizedGraph, base_path: Path,
                 scheme: Mapping[str, Any], training: Mapping[str, Any]) -> ModelVersion:
    """Write OUT/model.json and OUT/weights.npz (weights first, each atomically)."""
    changed = changed_layers(base, trained)
    arrays: dict[str, np.ndarray] = {}
    for name in changed:
        ql = trained.layers[name]
        assert ql.weight_q is not None and ql.bias_q is not None
        assert ql.weight_scale is not None
        arrays[f"{name}.weight_q"] = np.asarray(ql.weight_q, dtype=np.int8)
        arrays[f"{name}.bias_q"] = np.asarray(ql.bias_q, dtype=np.int32)
        arrays[f"{name}.weight_scale"] = np.asarray(ql.weight_scale, dtype=np.float64)
    buffer = io.BytesIO()
    save: Any = np.savez  # numpy's stub types **arrays as its keyword flags
    save(buffer, **arrays)
    blob = buffer.getvalue()
    weights_sha = hashlib.sha256(blob).hexdigest()
    base_sha = sha256_of(base_path)
    tensors = {k: trained.tensors[k] for k in trained.graph.tensors}
    digest = hashlib.sha256(json.dumps(
        [base_sha, weights_sha, {k: [v.scale, v.zero_point] for k, v in tensors.items()}],
        sort_keys=True).encode()).hexdigest()[:16]
    version = ModelVersion(digest, trained.graph.name, str(base_path.resolve()), base_sha,
                           MappingProxyType(tensors), changed, weights_sha,
                           dict(scheme), dict(training))
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic(out_dir / WEIGHTS, blob)
    _atomic(out_dir / MANIFEST, (json.dumps(version.to_dict(), indent=2) + "\n").encode())
    return version


def _atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_version(directory: Path) -> ModelVersion:
    """The model.json of a version directory."""
    path = directory / MANIFEST
    if not path.is_file():
        raise ModelVersionError(f"{directory}: no {MANIFEST}; not a fine-tuned model version")
    try:
        return ModelVersion.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise ModelVersionError(f"{path}: not JSON: {exc}") from None


def is_version_dir(path: Path) -> bool:
    """True for a directory holding a model.json."""
    return path.is_dir() and (path / MANIFEST).is_file()


def load_version(directory: Path, load_base: BaseLoader, base_path: Path | None = None
                 ) -> tuple[ModelVersion, QuantizedGraph]:
    """The version's record and its int8 graph; ModelVersionError if anything is off.

    `base_path` overrides the recorded location of the base (a moved file); its sha256 must
    still match.
    """
    version = read_version(directory)
    base = base_path or Path(version.base_path)
    if not base.exists():
        raise ModelVersionError(f"{directory}: base {base} is missing (pass its new location)")
    actual = sha256_of(base)
    if actual != version.base_sha256:
        raise ModelVersionError(f"{directory}: base {base} has sha256 {actual[:16]}..., the "
                                f"version was trained from {version.base_sha256[:16]}...")
    weights_path = directory / WEIGHTS
    try:
        blob = weights_path.read_bytes()
    except OSError as exc:
        raise ModelVersionError(f"{weights_path}: {exc.strerror}") from None
    if hashlib.sha256(blob).hexdigest() != version.weights_sha256:
        raise ModelVersionError(f"{weights_path} does not match the sha256 in {MANIFEST}")
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        arrays = {k: np.asarray(data[k]) for k in data.files}
    loaded = load_base(base)
    graph = loaded.graph if isinstance(loaded, QuantizedGraph) else loaded
    missing = set(graph.tensors) - set(version.tensors)
    if missing:
        raise ModelVersionError(f"{directory}: no quantization for tensors {sorted(missing)[:5]}")
    layers: dict[str, QuantLayer] = {}
    params = dict(graph.params)
    for layer in graph.layers:
        if layer.name in version.changed:
            layers[layer.name] = _stored_layer(layer.name, graph, version.tensors, arrays)
        elif isinstance(loaded, QuantizedGraph):
            layers[layer.name] = loaded.layers[layer.name]
        else:
            layers[layer.name] = quantize_layer(layer, graph, version.tensors)
    for name in version.changed:
        ql = layers[name]
        assert ql.weight_q is not None and ql.weight_scale is not None and ql.bias_q is not None
        layer = ql.layer
        shape = (-1,) + (1,) * (ql.weight_q.ndim - 1)
        params[str(layer.weight)] = (ql.weight_q * ql.weight_scale.reshape(shape)).astype(
            np.float32)
        params[str(layer.bias)] = (ql.bias_q * ql.weight_scale * ql.inputs[0].scale).astype(
            np.float32)
    trained_graph = replace(graph, params=MappingProxyType(params))
    fixed = {k: replace(v, layer=trained_graph.layer(k)) for k, v in layers.items()}
    return version, QuantizedGraph(trained_graph, MappingProxyType(dict(version.tensors)),
                                   MappingProxyType(fixed), calibration="data",
                                   notes=(f"fine-tuned version {version.id} of "
                                          f"{Path(version.base_path).name}",))


def _stored_layer(name: str, graph: Graph, tensors: Mapping[str, QuantParams],
                  arrays: Mapping[str, np.ndarray]) -> QuantLayer:
    layer = graph.layer(name)
    if layer.op not in (OpKind.CONV, OpKind.FULLY_CONNECTED):
        raise ModelVersionError(f"changed layer {name} is {layer.op.value}, which has no weights")
    try:
        weight_q = np.asarray(arrays[f"{name}.weight_q"], dtype=np.int8)
        bias_q = np.asarray(arrays[f"{name}.bias_q"], dtype=np.int32)
        scale = np.asarray(arrays[f"{name}.weight_scale"], dtype=np.float64)
    except KeyError as exc:
        raise ModelVersionError(f"weights.npz lacks {exc.args[0]}") from None
    expected = tuple(np.asarray(graph.params[str(layer.weight)]).shape)
    if weight_q.shape != expected or bias_q.shape != scale.shape != (expected[0],):
        raise ModelVersionError(f"layer {name}: stored weights {weight_q.shape} do not match "
                                f"the base's {expected}")
    inp, out = tensors[layer.inputs[0]], tensors[layer.output]
    pairs = [quantize_multiplier(float(r)) for r in inp.scale * scale / out.scale]
    act_min, act_max = activation_clamp(layer.activation, out)
    return QuantLayer(
        layer=layer, inputs=(inp,), output=out, act_min=act_min, act_max=act_max,
        input_offset=-inp.zero_point, output_offset=out.zero_point, weight_q=weight_q,
        weight_scale=scale, bias_q=bias_q,
        multiplier=np.array([m for m, _ in pairs], dtype=np.int32),
        shift=np.array([s for _, s in pairs], dtype=np.int32))
