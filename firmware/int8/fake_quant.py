"""Fake-quantized float execution of a QuantizedGraph: the float graph with int8 rounding.

Weights and biases are replaced by their dequantized int8/int32 values and every tensor is
rounded to its int8 grid (round half to even, saturated) after the layer that writes it. This
matches the integer reference to within about one LSB per layer (the integer kernels round
the requantization half away from zero and approximate the scale by a Q31 multiplier); it is
what onnxruntime's float QDQ path computes, and serves as the baseline while no integer
executor is at hand.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from firmware.float_exec import FloatArray, run_graph
from firmware.int8.quantize import Int8Array, QuantizedGraph
from firmware.ir import Layer, OpKind


def dequantized_params(qgraph: QuantizedGraph, layer: Layer) -> tuple[FloatArray | None,
                                                                       FloatArray | None]:
    """Float weight and bias of a layer as the int8 model sees them (w_q * s_w, b_q * s_b)."""
    if layer.op not in (OpKind.CONV, OpKind.FULLY_CONNECTED):
        return None, None
    ql = qgraph.layer(layer.name)
    assert ql.weight_q is not None and ql.weight_scale is not None and ql.bias_q is not None
    shape = (-1,) + (1,) * (ql.weight_q.ndim - 1)
    weight = (ql.weight_q.astype(np.float64) * ql.weight_scale.reshape(shape)).astype(np.float32)
    bias = (ql.bias_q.astype(np.float64) * ql.weight_scale * ql.inputs[0].scale).astype(np.float32)
    return weight, bias


def run_fake_quant(qgraph: QuantizedGraph, x_q: npt.ArrayLike) -> Int8Array:
    """int8 NCHW input batch -> int8 output batch (N, C, H, W), float arithmetic inside."""
    x = qgraph.input.dequantize(np.asarray(x_q, dtype=np.int8))

    def params(layer: Layer) -> tuple[FloatArray | None, FloatArray | None]:
        return dequantized_params(qgraph, layer)

    def round_to_grid(name: str, value: FloatArray) -> FloatArray:
        qp = qgraph.tensors[name]
        return qp.dequantize(qp.quantize(value))

    out = run_graph(qgraph.graph, x, params=params, after_layer=round_to_grid)
    return qgraph.output.quantize(out)
