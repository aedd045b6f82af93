"""Export a QuantizedGraph as an ONNX QDQ model and cross-check it in onnxruntime.

The exported model takes the int8 input (N, C, H, W) and returns the int8 logits, so its
output is compared LSB for LSB with the integer reference. Every tensor goes through
QuantizeLinear -> DequantizeLinear with its (scale, zero point); weights are int8 initializers
with per-output-channel scales (DequantizeLinear axis 0), biases int32 initializers with scale
s_in * s_w[c]. onnxruntime fuses these patterns into its own integer kernels (QLinearConv and
friends, which requantize in float and round half to even), an implementation nobody here
wrote: agreement with it is evidence that the quantized parameters mean what we think.

What agreement to expect (`cross_check`). The reference computes as TFLite / CMSIS-NN do:
requantization rounds twice (SaturatingRoundingDoublingHighMul, then RoundingDivideByPOT) with
a Q31 multiplier, so each layer is within 1 LSB of the exact result, not 0.5; onnxruntime
rounds the exact float product once. So every layer, fed the reference's own int8 input, must
agree within 1 LSB (residual adds usually exactly): that is the pass criterion, and a layer
beyond it has parameters that do not mean what its scales say. Through a whole network those
1-LSB differences compound (over 50 layers toward nearly tied logits on an untrained net the
top-1 can agree on less than half the inputs), so whole-network agreement is reported beside
the criterion, not as it. Known difference: average and global average pooling round an
exact tie (x.5) half away from zero in the reference (TFLite's kernels) and half to even in
onnxruntime; those layers are within 1 LSB as well, and the report names them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from firmware.errors import UnsupportedOpError
from firmware.int8.quantize import Int8Array, QuantizedGraph, QuantLayer, QuantParams
from firmware.ir import Activation, Graph, OpKind

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
        """True when agreement >= min_agreement and mean difference <= max_mean_lsb.

        A whole-network threshold for trained models; the compile report's criterion is
        per layer (`cross_check`), which this cannot replace: legitimate 1-LSB differences
        compound over a deep net toward nearly tied logits.
        """
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


def tie_aware_agreement(a: npt.ArrayLike, b: npt.ArrayLike, tie_lsb: int = 0) -> float:
    """Fraction of samples whose top-1 agrees up to ties.

    A sample agrees when the two sides' top classes overlap, a side's top classes being all
    those within `tie_lsb` of its maximum: with an exact tie, which class argmax returns is
    an accident of index order, not a disagreement.
    """
    x = np.asarray(a, dtype=np.int64).reshape(np.shape(a)[0], -1)
    y = np.asarray(b, dtype=np.int64).reshape(np.shape(b)[0], -1)
    if x.shape != y.shape:
        raise ValueError(f"output shapes differ: {x.shape} vs {y.shape}")
    x_top = x >= x.max(axis=1, keepdims=True) - tie_lsb
    y_top = y >= y.max(axis=1, keepdims=True) - tie_lsb
    return float(np.mean(np.any(x_top & y_top, axis=1)))


# --- per layer: every layer fed the reference's own int8 input ---------------------------

# Where onnxruntime and the reference legitimately differ (module docstring), by op.
KNOWN_DIFFERENCES: Mapping[OpKind, str] = {
    OpKind.GLOBAL_AVG_POOL: "global average pooling rounds an exact tie half away from zero "
                            "in the reference (TFLite), half to even in onnxruntime",
    OpKind.AVG_POOL: "average pooling rounds an exact tie half away from zero in the "
                     "reference (TFLite), half to even in onnxruntime",
}
LAYER_TOLERANCE_LSB = 1  # TFLite's double rounding vs exact rounding: at most 1 LSB per layer


def _is_flat(graph: Graph, tensor: str) -> bool:
    """True where the ONNX value is 2-D (N, features): written by a Gemm or a Flatten."""
    producer = graph.producer(tensor)
    return producer is not None and producer.op in (OpKind.FULLY_CONNECTED, OpKind.RESHAPE)


def _value_dims(graph: Graph, tensor: str) -> list[int | str]:
    t = graph.tensor(tensor)
    return ["batch", t.numel] if _is_flat(graph, tensor) else ["batch", *t.shape]


def export_layers(qgraph: QuantizedGraph) -> onnx.ModelProto:
    """One ONNX model holding every layer on its own: inputs `<tensor>.ref_q` (each tensor a
    layer reads, int8, ONNX layout: (N, C, H, W), or (N, features) after a flatten or a fully
    connected layer), outputs `<layer>.ort_q` (int8). Fed the reference's own tensors, each
    layer's output shows that layer's difference alone."""
    graph = qgraph.graph
    b = _Builder()
    read = sorted({name for layer in graph.layers for name in layer.inputs})
    inputs = []
    for name in read:
        scale, zero = b.qparams(f"{name}.ref", qgraph.tensors[name])
        b.node("DequantizeLinear", [f"{name}.ref_q", scale, zero], name, f"{name}/ref_dequant")
        inputs.append(helper.make_tensor_value_info(f"{name}.ref_q", TensorProto.INT8,
                                                    _value_dims(graph, name)))
    outputs = []
    for ql in qgraph.ordered_layers():
        out = ql.layer.output
        scale, zero = b.qparams(f"{out}.ort", qgraph.tensors[out])
        b.node("QuantizeLinear", [_layer(b, ql), scale, zero], f"{out}.ort_q", f"{out}/quant")
        outputs.append(helper.make_tensor_value_info(f"{out}.ort_q", TensorProto.INT8,
                                                     _value_dims(graph, out)))
    model = helper.make_model(helper.make_graph(b.nodes, f"{graph.name}-layers", inputs,
                                                outputs, b.inits),
                              opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="tinyfleet")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def reference_values(qgraph: QuantizedGraph, x_q: npt.ArrayLike) -> dict[str, Int8Array]:
    """Every tensor of the integer reference for an int8 NCHW batch, in ONNX layout.

    The reference keeps tensors HWC and a flatten moves no bytes (its fully connected weights
    are permuted instead); ONNX flattens (C, H, W) in CHW order, so a flattened tensor is
    taken from its source in CHW order.
    """
    from firmware.int8.reference import run_image

    graph = qgraph.graph
    batch = np.asarray(x_q, dtype=np.int8)
    envs = [run_image(qgraph, np.ascontiguousarray(image.transpose(1, 2, 0))) for image in batch]
    values: dict[str, Int8Array] = {}

    def chw(name: str) -> Int8Array:
        if name in values:
            return values[name]
        producer = graph.producer(name)
        if producer is not None and producer.op is OpKind.RESHAPE:
            value = chw(producer.inputs[0]).reshape(len(batch), -1)
        else:
            c, h, w = graph.tensor(name).shape
            value = np.stack([env[name].reshape(h, w, c).transpose(2, 0, 1) for env in envs])
            if _is_flat(graph, name):
                value = value.reshape(len(batch), -1)
        values[name] = np.ascontiguousarray(value)
        return values[name]

    chw(graph.input)
    for layer in graph.layers:
        chw(layer.output)
    return values


@dataclass(frozen=True)
class LayerAgreement:
    """One layer of onnxruntime vs the reference, both fed the reference's int8 input."""

    name: str
    op: str
    max_abs_lsb: int
    mean_abs_lsb: float
    differing_fraction: float  # of output elements
    known_difference: str | None = None  # why this op may differ (KNOWN_DIFFERENCES)

    @property
    def within_tolerance(self) -> bool:
        """True when no output element differs by more than LAYER_TOLERANCE_LSB."""
        return self.max_abs_lsb <= LAYER_TOLERANCE_LSB


@dataclass(frozen=True)
class CrossCheck:
    """onnxruntime against the integer reference: per layer (the criterion) and whole network.

    `passes` means every layer, fed the reference's own int8 input, is within 1 LSB; a
    failure names the layers beyond it. `network` is the end-to-end comparison, reported
    beside the criterion (it compounds every layer's legitimate 1-LSB rounding difference).
    """

    samples: int
    layers: tuple[LayerAgreement, ...]
    network: Agreement
    network_tie_aware_agreement: float

    @property
    def failing_layers(self) -> tuple[LayerAgreement, ...]:
        """Layers beyond the 1-LSB tolerance."""
        return tuple(la for la in self.layers if not la.within_tolerance)

    @property
    def passes(self) -> bool:
        """True when every layer is within 1 LSB of onnxruntime on the reference's inputs."""
        return not self.failing_layers

    def report(self) -> dict[str, Any]:
        """JSON-ready summary (the compile report's `onnxruntime` entry)."""
        worst = max(self.layers, key=lambda la: (la.max_abs_lsb, la.mean_abs_lsb))
        differing = [la for la in self.layers if la.max_abs_lsb > 0]
        known = sorted({la.known_difference for la in differing if la.known_difference})
        n = self.network
        return {
            "passes": self.passes,
            "criterion": f"every layer, fed the reference's int8 input, within "
                         f"{LAYER_TOLERANCE_LSB} LSB of onnxruntime",
            "samples": self.samples,
            "per_layer": {
                "layers": len(self.layers),
                "max_abs_lsb": worst.max_abs_lsb,
                "worst_layer": worst.name,
                "mean_abs_lsb": float(np.mean([la.mean_abs_lsb for la in self.layers])),
                "layers_differing": len(differing),
                "failing": [_layer_dict(la) for la in self.failing_layers],
            },
            "network": {"argmax_agreement": n.argmax_agreement,
                        "tie_aware_agreement": self.network_tie_aware_agreement,
                        "mean_abs_lsb": n.mean_abs_lsb, "max_abs_lsb": n.max_abs_lsb,
                        "exact_fraction": n.exact_fraction},
            "known_differences": known,
        }


def _layer_dict(la: LayerAgreement) -> dict[str, Any]:
    return {"layer": la.name, "op": la.op, "max_abs_lsb": la.max_abs_lsb,
            "mean_abs_lsb": la.mean_abs_lsb, "differing_fraction": la.differing_fraction}


def _session(model: onnx.ModelProto, optimize: bool) -> Any:
    import onnxruntime as ort  # heavy; only the export check needs it

    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])


def compare_layers(qgraph: QuantizedGraph, values: Mapping[str, Int8Array],
                   optimize: bool = True) -> tuple[LayerAgreement, ...]:
    """Each layer in onnxruntime on the reference's inputs (`reference_values`) vs its output."""
    session = _session(export_layers(qgraph), optimize)
    feeds = {i.name: values[i.name.removesuffix(".ref_q")] for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(names, feeds), strict=True))
    result = []
    for ql in qgraph.ordered_layers():
        out = ql.layer.output
        diff = np.abs(np.asarray(got[f"{out}.ort_q"], np.int64) - values[out].astype(np.int64))
        known = KNOWN_DIFFERENCES.get(ql.layer.op)
        if known is not None and np.any(diff[~_ties(ql, values)] != 0):
            known = None  # it differs where no tie explains it: report it as a plain difference
        result.append(LayerAgreement(
            name=ql.name, op=ql.layer.op.value, max_abs_lsb=int(diff.max(initial=0)),
            mean_abs_lsb=float(diff.mean()), differing_fraction=float(np.mean(diff > 0)),
            known_difference=known if np.any(diff) else None))
    return tuple(result)


def _ties(ql: QuantLayer, values: Mapping[str, Int8Array]) -> npt.NDArray[np.bool_]:
    """Where an (global) average pool's exact mean lies halfway between two int8 steps."""
    layer = ql.layer
    x = values[layer.inputs[0]].astype(np.int64) + ql.input_offset  # (N, C, H, W)
    if layer.op is OpKind.GLOBAL_AVG_POOL:
        total = x.sum(axis=(2, 3), keepdims=True)
        count = x.shape[2] * x.shape[3]
    else:  # AVG_POOL: zero padding (= the zero point) counts in the divisor, as in the IR
        top, left, bottom, right = layer.padding
        padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, layer.kernel, axis=(2, 3))
        total = windows[:, :, ::layer.stride[0], ::layer.stride[1]].sum(axis=(4, 5))
        count = layer.kernel[0] * layer.kernel[1]
    ties: npt.NDArray[np.bool_] = (2 * np.abs(total)) % (2 * count) == count
    return ties.reshape(values[layer.output].shape)


def cross_check(qgraph: QuantizedGraph, x_q: npt.ArrayLike, optimize: bool = True) -> CrossCheck:
    """onnxruntime vs the integer reference on an int8 NCHW batch: per layer and end to end."""
    batch = np.asarray(x_q, dtype=np.int8)
    values = reference_values(qgraph, batch)
    layers = compare_layers(qgraph, values, optimize)
    expected = values[qgraph.graph.output].reshape(len(batch), -1)
    theirs = run_onnxruntime(export_onnx(qgraph), batch, optimize)
    return CrossCheck(samples=len(batch), layers=layers,
                      network=compare_outputs(theirs, expected),
                      network_tie_aware_agreement=tie_aware_agreement(theirs, expected))
