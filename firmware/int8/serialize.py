"""A QuantizedGraph as bytes and back, exactly: what a device needs to fine-tune its model.

The device agent trains the int8 graph its firmware runs (firmware.training), so a
personalization image carries it beside the firmware (firmware.image's bundle payload). The
format is an .npz (no pickles): `graph.json` (a uint8 array holding UTF-8 JSON: the IR's
tensors and layers, every tensor's QuantParams, every layer's scalar int8 parameters) and
one array per layer parameter (`<layer>.weight_q`, `.weight_scale`, `.bias_q`,
`.multiplier`, `.shift`) and per float parameter (`param:<name>`). Loading rebuilds the same
values: `firmware.int8.reference` computes the same outputs bit for bit.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from types import MappingProxyType
from typing import Any

import numpy as np

from firmware.errors import InvalidModelError
from firmware.int8.quantize import AddParams, QuantizedGraph, QuantLayer, QuantParams
from firmware.ir import Activation, Graph, Layer, OpKind, Tensor

FORMAT = "tinyfleet.int8-graph"
VERSION = 1
_ARRAYS = ("weight_q", "weight_scale", "bias_q", "multiplier", "shift")


def _layer_dict(layer: Layer) -> dict[str, Any]:
    return {"name": layer.name, "op": layer.op.value, "inputs": list(layer.inputs),
            "output": layer.output, "kernel": list(layer.kernel), "stride": list(layer.stride),
            "padding": list(layer.padding), "groups": layer.groups,
            "activation": layer.activation.value, "weight": layer.weight, "bias": layer.bias}


def dump_quantized(qgraph: QuantizedGraph) -> bytes:
    """The bytes of `qgraph` (module docstring); deterministic for equal graphs."""
    g = qgraph.graph
    doc = {
        "format": FORMAT, "version": VERSION, "name": g.name, "input": g.input,
        "output": g.output, "calibration": qgraph.calibration, "notes": list(qgraph.notes),
        "tensors": [[t.name, t.channels, t.height, t.width] for t in g.tensors.values()],
        "layers": [_layer_dict(layer) for layer in g.layers],
        "quant": {k: [v.scale, v.zero_point] for k, v in qgraph.tensors.items()},
        "int8": {ql.name: {"inputs": [[p.scale, p.zero_point] for p in ql.inputs],
                           "output": [ql.output.scale, ql.output.zero_point],
                           "act": [ql.act_min, ql.act_max],
                           "offsets": [ql.input_offset, ql.output_offset],
                           "add": None if ql.add is None else asdict(ql.add)}
                 for ql in qgraph.ordered_layers()},
    }
    arrays: dict[str, np.ndarray] = {
        "graph.json": np.frombuffer(json.dumps(doc, sort_keys=True).encode(), dtype=np.uint8)}
    for ql in qgraph.ordered_layers():
        for field in _ARRAYS:
            value = getattr(ql, field)
            if value is not None:
                arrays[f"{ql.name}.{field}"] = np.asarray(value)
    for name in sorted(g.params):
        arrays[f"param:{name}"] = np.asarray(g.params[name])
    buffer = io.BytesIO()
    save: Any = np.savez  # numpy's stub types **arrays as its keyword flags
    save(buffer, **arrays)
    return buffer.getvalue()


def load_quantized(data: bytes) -> QuantizedGraph:
    """The QuantizedGraph of `dump_quantized` bytes; InvalidModelError if they are not one."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: np.asarray(z[k]) for k in z.files}
        doc = json.loads(arrays.pop("graph.json").tobytes())
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidModelError(f"not a serialized int8 graph: {exc}") from None
    if doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise InvalidModelError(f"int8 graph format {doc.get('format')!r} version "
                                f"{doc.get('version')!r} is not {FORMAT} {VERSION}")
    try:
        return _build(doc, arrays)
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidModelError(f"serialized int8 graph lacks or mangles {exc!r}") from None


def _build(doc: dict[str, Any], arrays: dict[str, np.ndarray]) -> QuantizedGraph:
    tensors = {n: Tensor(n, c, h, w) for n, c, h, w in doc["tensors"]}
    layers = tuple(Layer(name=d["name"], op=OpKind(d["op"]), inputs=tuple(d["inputs"]),
                         output=d["output"], kernel=(d["kernel"][0], d["kernel"][1]),
                         stride=(d["stride"][0], d["stride"][1]),
                         padding=(d["padding"][0], d["padding"][1], d["padding"][2],
                                  d["padding"][3]),
                         groups=d["groups"], activation=Activation(d["activation"]),
                         weight=d["weight"], bias=d["bias"]) for d in doc["layers"])
    params = {k[len("param:"):]: v for k, v in arrays.items() if k.startswith("param:")}
    graph = Graph(doc["name"], doc["input"], doc["output"], MappingProxyType(tensors), layers,
                  MappingProxyType(params))
    quant = {k: QuantParams(float(s), int(z)) for k, (s, z) in doc["quant"].items()}
    qlayers = {}
    for layer in layers:
        d = doc["int8"][layer.name]
        qlayers[layer.name] = QuantLayer(
            layer=layer, inputs=tuple(QuantParams(float(s), int(z)) for s, z in d["inputs"]),
            output=QuantParams(float(d["output"][0]), int(d["output"][1])),
            act_min=int(d["act"][0]), act_max=int(d["act"][1]),
            input_offset=int(d["offsets"][0]), output_offset=int(d["offsets"][1]),
            add=None if d["add"] is None else AddParams(**d["add"]),
            **{f: arrays[f"{layer.name}.{f}"] for f in _ARRAYS
               if f"{layer.name}.{f}" in arrays})
    return QuantizedGraph(graph, MappingProxyType(quant), MappingProxyType(qlayers),
                          calibration=str(doc["calibration"]), notes=tuple(doc["notes"]))
