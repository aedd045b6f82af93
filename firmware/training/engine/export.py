"""The trained int8 graph of a Trainer: what the compiler and the reference take unchanged.

Trained layers keep their weight scales and requantization multipliers: their int8 weights
and int32 biases are the rounded fp32 masters (already what the forward pass used). The fp32
classifier head is quantized again, the one change of scales: per-channel weight scales
max|w|/127 of its trained weights and a logits scale covering the logits it produced while
training (its output feeds nothing else, so no other layer's parameters move).
"""

from __future__ import annotations

import math
from dataclasses import replace
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from firmware.int8.quantize import (
    QuantizedGraph,
    QuantLayer,
    QuantParams,
    params_for_range,
    quantize_multiplier,
    quantize_weights,
)
from firmware.ir import Layer
from firmware.training.errors import TrainingError
from firmware.training.memory import BufferKind, buffer_name

if TYPE_CHECKING:
    from firmware.training.engine.trainer import Trainer

INT32_LIMIT = 2**31 - 1


def export_trained(trainer: Trainer) -> QuantizedGraph:
    """The trainer's current int8 graph (module docstring)."""
    from firmware.training.engine.trainer import Precision

    if trainer.precision is Precision.FP32:
        raise TrainingError("the fp32 baseline has no int8 graph to export")
    graph, index = trainer.graph, trainer.index
    layers = dict(trainer.current)
    params = dict(graph.params)
    tensors = dict(trainer.qgraph.tensors)
    for name in trainer.resolved.trainable:
        layer = graph.layers[index[name]]
        if name == trainer.resolved.classifier and trainer.fp32_head:
            layers[name], tensors[layer.output] = requantized_head(trainer, layer)
        ql = layers[name]
        assert ql.weight_q is not None and ql.weight_scale is not None
        assert ql.bias_q is not None
        shape = (-1,) + (1,) * (ql.weight_q.ndim - 1)
        params[str(layer.weight)] = (ql.weight_q.astype(np.float64)
                                     * ql.weight_scale.reshape(shape)).astype(np.float32)
        params[str(layer.bias)] = (ql.bias_q.astype(np.float64) * ql.weight_scale
                                   * ql.inputs[0].scale).astype(np.float32)
    new_graph = replace(graph, params=MappingProxyType(params))
    fixed = {name: replace(ql, layer=new_graph.layers[index[name]])
             for name, ql in layers.items()}
    return QuantizedGraph(graph=new_graph, tensors=MappingProxyType(tensors),
                          layers=MappingProxyType(fixed),
                          calibration=trainer.qgraph.calibration, notes=trainer.qgraph.notes)


def requantized_head(trainer: Trainer, layer: Layer) -> tuple[QuantLayer, QuantParams]:
    """The fp32 head as int8: new weight scales, a logits scale from the range it produced."""
    ql = trainer.current[layer.name]
    master = trainer.arena[buffer_name(BufferKind.MASTER, f"{layer.name}.weight")]
    weight = np.asarray(master, dtype=np.float64)
    bias = np.asarray(trainer.arena[buffer_name(BufferKind.MASTER, f"{layer.name}.bias")],
                      dtype=np.float64)
    weight_q, w_scale = quantize_weights(weight)
    inp = ql.inputs[0]
    if math.isfinite(trainer.logit_low):
        out = params_for_range(trainer.logit_low, trainer.logit_high)
    else:
        out = ql.output
    w_scale = np.where(w_scale > 0, w_scale, out.scale / inp.scale)
    bias_q = np.clip(np.rint(bias / (inp.scale * w_scale)), -INT32_LIMIT, INT32_LIMIT)
    pairs = [quantize_multiplier(float(r)) for r in inp.scale * w_scale / out.scale]
    new = replace(ql, output=out, output_offset=out.zero_point, act_min=-128, act_max=127,
                  weight_q=weight_q, weight_scale=w_scale, bias_q=bias_q.astype(np.int32),
                  multiplier=np.array([m for m, _ in pairs], dtype=np.int32),
                  shift=np.array([s for _, s in pairs], dtype=np.int32))
    return new, out
