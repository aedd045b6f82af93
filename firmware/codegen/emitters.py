"""The C emitters: one function per int8 op, in a table from op kind to emitter.

An emitter turns one layer call into C statements. It sees its operands as C expressions
(`Operand`), so the same emitter serves layer-based code (static dims) and the per-patch
loop (dims from a tile table indexed by the patch). Parameters (weights, biases, per-channel
multipliers and shifts, quantization structs) are declared once per layer by `emit_params`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from firmware.codegen.cformat import c_array, c_comment, c_struct
from firmware.errors import UnsupportedOpError
from firmware.int8.quantize import AddParams, QuantLayer
from firmware.int8.reference import (
    conv_weights_ohwi,
    depthwise_weights_hwc,
    fc_weights_hwc,
    is_depthwise,
)
from firmware.ir import Graph, Layer, OpKind
from firmware.plan.kernels import NONE_GENERIC, fast_depthwise, rgb_conv


class Kind(enum.Enum):
    """What kernel a layer becomes; its value is the identifier suffix (l3_dw_out)."""

    CONV = "conv"  # dense k x k
    POINTWISE = "pw"  # dense 1x1, stride 1, no padding
    DEPTHWISE = "dw"
    FULLY_CONNECTED = "fc"
    ADD = "add"
    AVG_POOL = "avgpool"
    MAX_POOL = "maxpool"
    GLOBAL_AVG_POOL = "gap"
    RESHAPE = "reshape"


def kind_of(graph: Graph, layer: Layer) -> Kind:
    """The kernel a layer runs on; UnsupportedOpError names the layer otherwise."""
    if layer.op is OpKind.CONV:
        if is_depthwise(graph, layer):
            return Kind.DEPTHWISE
        if layer.groups != 1:
            raise UnsupportedOpError(f"layer {layer.name}: grouped conv (groups {layer.groups})"
                                     " has no int8 kernel")
        pointwise = (layer.kernel == (1, 1) and layer.stride == (1, 1)
                     and layer.padding == (0, 0, 0, 0))
        return Kind.POINTWISE if pointwise else Kind.CONV
    table = {OpKind.FULLY_CONNECTED: Kind.FULLY_CONNECTED, OpKind.ADD: Kind.ADD,
             OpKind.AVG_POOL: Kind.AVG_POOL, OpKind.MAX_POOL: Kind.MAX_POOL,
             OpKind.GLOBAL_AVG_POOL: Kind.GLOBAL_AVG_POOL, OpKind.RESHAPE: Kind.RESHAPE}
    if layer.op not in table:
        raise UnsupportedOpError(f"layer {layer.name}: op {layer.op.value} has no int8 kernel")
    return table[layer.op]


@dataclass(frozen=True)
class Operand:
    """A tensor as a kernel sees it: data pointer, `const tf_dims *` and element count."""

    ptr: str
    dims: str
    numel: str


@dataclass(frozen=True)
class Call:
    """One kernel call: the layer, its operands, its window, and a fused residual if any."""

    prefix: str  # identifier prefix of the layer's parameters, e.g. "l3"
    ql: QuantLayer
    kind: Kind
    inputs: tuple[Operand, ...]
    output: Operand
    window: str  # `const tf_window *` expression ("" for ops without one)
    out_channels: int
    fused_add: str = ""  # name of the tf_add_quant of a fused residual add
    generic: frozenset[str] = NONE_GENERIC  # Kind values run by the generic kernels


def check(expr: str) -> str:
    """A statement that returns the status of a failing kernel call."""
    return f"TF_CHECK({expr});"


def _conv(c: Call) -> list[str]:
    x, y = c.inputs[0], c.output
    p = c.prefix
    assert c.ql.weight_q is not None
    if Kind.CONV.value in c.generic:
        entry = "tf_conv2d_s8"
    else:
        entry = ("tf_conv2d_rgb_s8" if rgb_conv(c.ql.weight_q.shape[1], c.ql.layer.kernel)
                 else "tf_conv2d_fast_s8")
    return [check(f"{entry}({x.dims}, {x.ptr}, {c.window}, {y.dims}, {p}_w, {p}_b, "
                  f"&{p}_q, {y.ptr}, tf_scratch)")]


def _pointwise(c: Call) -> list[str]:
    x, y, p = c.inputs[0], c.output, c.prefix
    fast = "" if Kind.POINTWISE.value in c.generic else "_fast"
    if c.fused_add:
        return [check(f"tf_conv2d_1x1_add{fast}_s8({x.dims}, {x.ptr}, {c.out_channels}, "
                      f"{p}_w, {p}_b, &{p}_q, &{c.fused_add}, {y.ptr}, tf_scratch)")]
    return [check(f"tf_conv2d_1x1{fast}_s8({x.dims}, {x.ptr}, {c.out_channels}, {p}_w, "
                  f"{p}_b, &{p}_q, {y.ptr}, tf_scratch)")]


def _depthwise(c: Call) -> list[str]:
    x, y, p = c.inputs[0], c.output, c.prefix
    layer = c.ql.layer
    entry = "tf_depthwise_conv2d_s8"
    if Kind.DEPTHWISE.value not in c.generic and fast_depthwise(layer.kernel, layer.stride):
        k, s = layer.kernel[0], layer.stride[0]
        entry = f"tf_depthwise_conv2d_{k}x{k}s{s}_s8"  # the specialized kernel of its window
    return [check(f"{entry}({x.dims}, {x.ptr}, {c.window}, {y.dims}, {p}_w, {p}_b, "
                  f"&{p}_q, {y.ptr}, (int8_t *)tf_scratch)")]


def _fc(c: Call) -> list[str]:
    x, y, p = c.inputs[0], c.output, c.prefix
    return [check(f"tf_fully_connected_s8({x.numel}, {x.ptr}, {c.out_channels}, {p}_w, "
                  f"{p}_b, &{p}_q, {y.ptr}, tf_scratch)")]


def _add(c: Call) -> list[str]:
    a, b, y = c.inputs[0], c.inputs[1], c.output
    return [check(f"tf_add_s8({y.numel}, {a.ptr}, {b.ptr}, &{c.prefix}_add, {y.ptr})")]


def _avg_pool(c: Call) -> list[str]:
    x, y, ql = c.inputs[0], c.output, c.ql
    return [check(f"tf_avg_pool_s8({x.dims}, {x.ptr}, {c.window}, {y.dims}, "
                  f"{ql.input_offset}, {ql.output_offset}, {ql.act_min}, {ql.act_max}, "
                  f"{y.ptr})")]


def _max_pool(c: Call) -> list[str]:
    x, y, ql = c.inputs[0], c.output, c.ql
    return [check(f"tf_max_pool_s8({x.dims}, {x.ptr}, {c.window}, {y.dims}, {ql.act_min}, "
                  f"{ql.act_max}, {y.ptr})")]


def _gap(c: Call) -> list[str]:
    x, y, ql = c.inputs[0], c.output, c.ql
    return [check(f"tf_global_avg_pool_s8({x.dims}, {x.ptr}, {ql.input_offset}, "
                  f"{ql.output_offset}, {y.ptr})")]


def _reshape(c: Call) -> list[str]:
    x, y = c.inputs[0], c.output
    if x.ptr == y.ptr:
        return ["/* flatten: the bytes stay where they are (HWC order) */"]
    return [f"memmove({y.ptr}, {x.ptr}, (size_t)({x.numel}));"]


EMITTERS: dict[Kind, Callable[[Call], list[str]]] = {
    Kind.CONV: _conv,
    Kind.POINTWISE: _pointwise,
    Kind.DEPTHWISE: _depthwise,
    Kind.FULLY_CONNECTED: _fc,
    Kind.ADD: _add,
    Kind.AVG_POOL: _avg_pool,
    Kind.MAX_POOL: _max_pool,
    Kind.GLOBAL_AVG_POOL: _gap,
    Kind.RESHAPE: _reshape,
}


def emit_call(call: Call) -> list[str]:
    """The C statements of one kernel call (Call.generic: the kinds of layer that call the
    generic kernels, which take the same arguments and give the same results)."""
    return EMITTERS[call.kind](call)


def add_fields(p: AddParams, act_min: int, act_max: int, swap: bool = False) -> list[int]:
    """tf_add_quant initialiser values; `swap` exchanges input 1 and 2 (the sum commutes)."""
    one = [p.input1_offset, p.input1_multiplier, p.input1_shift]
    two = [p.input2_offset, p.input2_multiplier, p.input2_shift]
    first, second = (two, one) if swap else (one, two)
    return [p.left_shift, *first, *second, p.output_offset, p.output_multiplier,
            p.output_shift, act_min, act_max]


def kernel_weights(graph: Graph, ql: QuantLayer, kind: Kind) -> np.ndarray:
    """A weighted layer's int8 weights in the layout its kernel reads (see emit_params)."""
    if kind is Kind.DEPTHWISE:
        return depthwise_weights_hwc(ql)
    if kind is Kind.FULLY_CONNECTED:
        return fc_weights_hwc(graph, ql)
    return conv_weights_ohwi(ql)


_LAYOUTS = {Kind.DEPTHWISE: "HWC", Kind.FULLY_CONNECTED: "(out, in) with in in HWC order"}


def emit_params(graph: Graph, prefix: str, ql: QuantLayer, kind: Kind,
                overlaid: bool = False) -> str:
    """Flash-resident parameters of one layer: weights, bias, multipliers, shifts, quant.

    `overlaid` names the Flash arrays `<prefix>_w_base` ... and reads them through pointers
    (and a writable quant struct) that `tf_model_use_overlay` may point at an overlay.
    """
    layer = ql.layer
    if kind is Kind.ADD:
        if ql.add is None:
            raise UnsupportedOpError(f"layer {layer.name}: add without AddParams")
        return c_struct("tf_add_quant", f"{prefix}_add",
                        add_fields(ql.add, ql.act_min, ql.act_max))
    if kind not in (Kind.CONV, Kind.POINTWISE, Kind.DEPTHWISE, Kind.FULLY_CONNECTED):
        return ""
    weights = kernel_weights(graph, ql, kind)
    layout = _LAYOUTS.get(kind, "OHWI")
    assert ql.bias_q is not None and ql.multiplier is not None and ql.shift is not None
    name = c_comment(layer.name)
    base = "_base" if overlaid else ""
    text = "".join([
        c_array("int8_t", f"{prefix}_w{base}", weights,
                f"{name}: int8 weights {layout} {list(weights.shape)}"),
        c_array("int32_t", f"{prefix}_b{base}", np.asarray(ql.bias_q)),
        c_array("int32_t", f"{prefix}_m{base}", np.asarray(ql.multiplier)),
        c_array("int32_t", f"{prefix}_s{base}", np.asarray(ql.shift)),
        c_struct("tf_conv_quant", f"{prefix}_q{base}",
                 [ql.input_offset, ql.output_offset, ql.act_min, ql.act_max,
                  f"{prefix}_m{base}", f"{prefix}_s{base}"]),
    ])
    if not overlaid:
        return text
    return text + "".join([
        f"static const int8_t *{prefix}_w = {prefix}_w_base;  /* the overlay may move it */\n",
        f"static const int32_t *{prefix}_b = {prefix}_b_base;\n",
        f"static tf_conv_quant {prefix}_q = {{{ql.input_offset}, {ql.output_offset}, "
        f"{ql.act_min}, {ql.act_max}, {prefix}_m_base, {prefix}_s_base}};\n",
    ])


