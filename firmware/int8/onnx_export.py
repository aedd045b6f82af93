"""Export a QuantizedGraph as an ONNX QDQ model and run it in onnxruntime.

The exported model takes the int8 input (N, C, H, W) and returns the int8 logits, so its
output is compared LSB for LSB with the integer reference. Every tensor goes through
QuantizeLinear -> DequantizeLinear with its (scale, zero point); weights are int8 initializers
with per-output-channel scales (DequantizeLinear axis 0), biases int32 initializers with scale
s_in * s_w[c]. onnxruntime fuses these patterns into its own integer kernels (QLinearConv and
friends, which requantize in float and round half to even), an implementation nobody here
wrote: agreement with it is evidence that the quantized parameters mean what we think.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from firmware.errors import UnsupportedOpError
from firmware.int8.quantize import Int8Array, QuantizedGraph, QuantLayer, QuantParams
from firmware.ir import Activation, OpKind

OPSET = 13  # the first opset with per-axis DequantizeLinear
INPUT_NAME = "input_q"
OUTPUT_NAME = "output_q"


class _Builder:
    """Accumulates nodes and initializers; names derive from the IR's tensor names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: npt.NDArray[np.generic]) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, name: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name, None, None, **attrs))
        return output

    def qparams(self, tensor: str, qp: QuantParams) -> tuple[str, str]:
        scale = self.const(f"{tensor}.scale", np.array(qp.scale, dtype=np.float32))
        zero = self.const(f"{tensor}.zero_point", np.array(qp.zero_point, dtype=np.int8))
        return scale, zero

    def requantize(self, tensor: str, value: str, qp: QuantParams) -> str:
        """value (float) -> Q -> DQ: the float tensor named `tensor` on its int8 grid."""
        scale, zero = self.qparams(tensor, qp)
        q = self.node("QuantizeLinear", [value, scale, zero], f"{tensor}.q", f"{tensor}/quant")
        return self.node("DequantizeLinear", [q, scale, zero], tensor, f"{tensor}/dequant")


def _weights(b: _Builder, ql: QuantLayer) -> tuple[str, str]:
    """DequantizeLinear nodes for a layer's int8 weight and int32 bias (per-channel, axis 0)."""
    assert ql.weight_q is not None and ql.weight_scale is not None and ql.bias_q is not None
    name = ql.layer.name
    channels = ql.weight_q.shape[0]
    w = b.node("DequantizeLinear", [
        b.const(f"{name}.weight_q", ql.weight_q),
        b.const(f"{name}.weight_scale", ql.weight_scale.astype(np.float32)),
        b.const(f"{name}.weight_zero_point", np.zeros(channels, np.int8)),
    ], f"{name}.weight", f"{name}/weight_dequant", axis=0)
    bias_scale = (ql.weight_scale * ql.inputs[0].scale).astype(np.float32)
    bias = b.node("DequantizeLinear", [
        b.const(f"{name}.bias_q", ql.bias_q),
        b.const(f"{name}.bias_scale", bias_scale),
        b.const(f"{name}.bias_zero_point", np.zeros(channels, np.int32)),
    ], f"{name}.bias", f"{name}/bias_dequant", axis=0)
    return w, bias


def _activation(b: _Builder, value: str, ql: QuantLayer) -> str:
    name = ql.layer.name
    if ql.layer.activation is Activation.RELU:
        return b.node("Relu", [value], f"{name}.relu", f"{name}/relu")
    if ql.layer.activation is Activation.RELU6:
        lo = b.const(f"{name}.clip_min", np.array(0.0, np.float32))
        hi = b.const(f"{name}.clip_max", np.array(6.0, np.float32))
        return b.node("Clip", [value, lo, hi], f"{name}.relu6", f"{name}/relu6")
    return value


def _layer(b: _Builder, ql: QuantLayer) -> str:
    """Nodes computing one layer's float output (before its output QuantizeLinear)."""
    layer = ql.layer
    name, op, ins = layer.name, layer.op, list(layer.inputs)
    raw = f"{name}.raw"
    if op is OpKind.CONV:
        w, bias = _weights(b, ql)
        top, left, bottom, right = layer.padding
        out = b.node("Conv", [ins[0], w, bias], raw, name, kernel_shape=list(layer.kernel),
                     strides=list(layer.stride), pads=[top, left, bottom, right],
                     group=layer.groups)
    elif op is OpKind.FULLY_CONNECTED:
        w, bias = _weights(b, ql)
        # Gemm takes rank 2; the IR lets a fully connected layer read (C, 1, 1) directly.
        flat = b.node("Flatten", [ins[0]], f"{name}.flat", f"{name}/flatten", axis=1)
        out = b.node("Gemm", [flat, w, bias], raw, name, transB=1)
    elif op is OpKind.ADD:
        out = b.node("Add", ins, raw, name)
    elif op is OpKind.GLOBAL_AVG_POOL:
        out = b.node("GlobalAveragePool", ins, raw, name)
    elif op in (OpKind.AVG_POOL, OpKind.MAX_POOL):
        top, left, bottom, right = layer.padding
        attrs: dict[str, object] = {"kernel_shape": list(layer.kernel),
                                    "strides": list(layer.stride),
                                    "pads": [top, left, bottom, right]}
        if op is OpKind.AVG_POOL:
            attrs["count_include_pad"] = 1  # the IR's convention (torch's default)
        out = b.node("AveragePool" if op is OpKind.AVG_POOL else "MaxPool", ins, raw, name,
                     **attrs)
    elif op is OpKind.RESHAPE:
        out = b.node("Flatten", ins, raw, name, axis=1)
    else:
        raise UnsupportedOpError(f"layer {name}: op {op.value} has no ONNX export")
    return _activation(b, out, ql)


def export_onnx(qgraph: QuantizedGraph) -> onnx.ModelProto:
    """The QDQ ONNX model of `qgraph`: int8 NCHW input, int8 output, opset 13, checked."""
    graph = qgraph.graph
    b = _Builder()
    in_scale, in_zero = b.qparams(f"{graph.input}.in", qgraph.input)
    b.node("DequantizeLinear", [INPUT_NAME, in_scale, in_zero], graph.input, "input/dequant")
    for ql in qgraph.ordered_layers():
        b.requantize(ql.layer.output, _layer(b, ql), qgraph.tensors[ql.layer.output])
    out_scale, out_zero = b.qparams(f"{graph.output}.out", qgraph.output)
    b.node("QuantizeLinear", [graph.output, out_scale, out_zero], OUTPUT_NAME, "output/quant")
    c, h, w = graph.tensor(graph.input).shape
    model = helper.make_model(
        helper.make_graph(
            b.nodes, graph.name,
            [helper.make_tensor_value_info(INPUT_NAME, TensorProto.INT8, ["batch", c, h, w])],
            [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.INT8,
                                           ["batch", *_output_dims(qgraph)])],
            b.inits,
        ),
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="tinyfleet",
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _output_dims(qgraph: QuantizedGraph) -> list[int]:
    """ONNX shape of the output without batch: flat after Gemm/Flatten, else (C, H, W)."""
    graph = qgraph.graph
    producer = graph.producer(graph.output)
    tensor = graph.tensor(graph.output)
    if producer is not None and producer.op in (OpKind.FULLY_CONNECTED, OpKind.RESHAPE):
        return [tensor.numel]
    return list(tensor.shape)


def run_onnxruntime(model: onnx.ModelProto, x_q: npt.ArrayLike, optimize: bool = True) -> Int8Array:
    """Run an exported model in onnxruntime on an int8 NCHW batch; int8 outputs (N, -1).

    `optimize` keeps onnxruntime's default graph optimizations (QDQ fusion into its integer
    kernels); without it every op runs as written, in float between Q and DQ.
    """
    import onnxruntime as ort  # heavy; only the export check needs it

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), opts,
                                   providers=["CPUExecutionProvider"])
    batch = np.asarray(x_q, dtype=np.int8)
    (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch})
    result: Int8Array = np.asarray(out, dtype=np.int8).reshape(batch.shape[0], -1)
    return result


@dataclass(frozen=True)
class Agreement:
    """How two int8 output batches compare: argmax agreement and LSB differences."""

    samples: int
    argmax_agreement: float  # fraction of samples with the same top-1 class
    mean_abs_lsb: float  # mean |a - b| over all output elements, in int8 steps
    max_abs_lsb: int
    exact_fraction: float  # fraction of output elements that are equal

    def passes(self, min_agreement: float = 0.99, max_mean_lsb: float = 1.0) -> bool:
        """True when agreement >= min_agreement and mean difference <= max_mean_lsb."""
        return self.argmax_agreement >= min_agreement and self.mean_abs_lsb <= max_mean_lsb


def compare_outputs(a: npt.ArrayLike, b: npt.ArrayLike) -> Agreement:
    """Compare two int8 batches of the same shape (flattened per sample)."""
    x = np.asarray(a, dtype=np.int64)
    y = np.asarray(b, dtype=np.int64)
    x = x.reshape(x.shape[0], -1)
    y = y.reshape(y.shape[0], -1)
    if x.shape != y.shape:
        raise ValueError(f"output shapes differ: {x.shape} vs {y.shape}")
    diff = np.abs(x - y)
    return Agreement(samples=x.shape[0],
                     argmax_agreement=float(np.mean(x.argmax(1) == y.argmax(1))),
                     mean_abs_lsb=float(diff.mean()), max_abs_lsb=int(diff.max(initial=0)),
                     exact_fraction=float(np.mean(diff == 0)))
