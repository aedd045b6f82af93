"""The int8 reference: numpy kernels that are the executable specification of the C runtime.

`run_quantized(qgraph, x)` runs a QuantizedGraph (firmware.int8.quantize) on an int8 NCHW batch;
`run_image` returns every tensor of one image. Layers run in HWC, as the C runtime does.

Every kernel works on ONE image in HWC layout (as the C runtime stores it) and uses integer
arithmetic only (int64 intermediates, never float). The C kernels in `firmware/runtime` are
tested bit-exact against these functions.

Conventions (CMSIS-NN / TFLite Micro, see notes in QUANT_CONTRACT):
- Activations int8, real = scale * (q - zero_point). Kernels take `input_offset = -zp_in` and
  `output_offset = zp_out` as integers.
- Conv weights OHWI (out channel, kh, kw, in channel), depthwise weights HWC (kh, kw, channel),
  fully connected weights (out, in). Biases int32.
- Padding is (top, left, bottom, right); a padded element holds the input zero point, so it
  adds nothing once the input offset is applied.
- Requantization: `requantize(acc, multiplier, shift)` (defined in firmware.int8.quantize, used
  here) is TFLite's MultiplyByQuantizedMultiplier (= CMSIS-NN arm_nn_requantize without
  single rounding):
      x = acc * 2**max(shift, 0), saturated to int32;
      y = SaturatingRoundingDoublingHighMul(x, multiplier): (x*m + nudge) / 2**31 truncated
          toward zero, nudge = 2**30 if x*m >= 0 else 1 - 2**30, i.e. x*m/2**31 rounded half
          up (ties toward +inf: 0.5 -> 1, -0.5 -> 0); saturates only for x = m = -2**31;
      result = RoundingDivideByPOT(y, max(-shift, 0)): arithmetic shift right, rounding half
          away from zero.
  The two roundings compose (0.25 can become 1), so the result is within 1 of acc * real,
  not 0.5; this is TFLite's and CMSIS-NN's documented behaviour, kept for compatibility.
  `multiplier` is Q31 in [2**30, 2**31) (or 0), `shift` in [-31, 30].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from firmware.errors import InvalidModelError, UnsupportedOpError
from firmware.int8.quantize import (
    ADD_LEFT_SHIFT,
    AddParams,
    QuantizedGraph,
    QuantLayer,
    quantize_multiplier,
    requantize,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)
from firmware.ir import Graph, Layer, OpKind

I8 = npt.NDArray[np.int8]
I32 = npt.NDArray[np.int32]
I64 = npt.NDArray[np.int64]
IntArray = npt.NDArray[np.integer] | int | np.integer

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

__all__ = [
    "ADD_LEFT_SHIFT", "AddParams", "ConvQuant", "add_s8", "avg_pool_s8", "conv2d_1x1_add_s8",
    "conv2d_s8", "depthwise_conv2d_s8", "fully_connected_s8", "global_avg_pool_s8", "max_pool_s8",
    "quantize_multiplier", "requantize", "rounding_divide_by_pot", "run_image",
    "run_layer", "run_quantized", "saturating_rounding_doubling_high_mul",
]


@dataclass(frozen=True)
class ConvQuant:
    """Quantization of a conv / fc output: offsets, per-channel (multiplier, shift), clamp."""

    input_offset: int  # -zero_point of the input, in [-127, 128]
    output_offset: int  # zero_point of the output, in [-128, 127]
    multiplier: I32  # (out_channels,) Q31
    shift: I32  # (out_channels,) in [-31, 30]
    act_min: int = -128
    act_max: int = 127


def output_size(size: int, kernel: int, stride: int, pad_before: int, pad_after: int) -> int:
    """Output extent of a window op along one axis (floor division, as torch)."""
    return (size + pad_before + pad_after - kernel) // stride + 1


def _finish(acc: I64, q: ConvQuant) -> I8:
    out = requantize(acc, q.multiplier, q.shift).astype(np.int64) + q.output_offset
    return np.clip(out, q.act_min, q.act_max).astype(np.int8)


def _windows(x: I8, kernel: tuple[int, int], stride: tuple[int, int],
             padding: tuple[int, int, int, int], input_offset: int) -> I64:
    """(Ho, Wo, kh, kw, C) windows of (x + input_offset) with zero (= zero point) padding."""
    t, left, b, r = padding
    xo = np.asarray(x, dtype=np.int64) + input_offset
    xp = np.pad(xo, ((t, b), (left, r), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(xp, kernel, axis=(0, 1))  # Ho',Wo',C,kh,kw
    win = win[:: stride[0], :: stride[1]]
    return np.asarray(win.transpose(0, 1, 3, 4, 2), dtype=np.int64)


def conv2d_s8(x: I8, weight_ohwi: I8, bias: I32, q: ConvQuant, stride: tuple[int, int] = (1, 1),
              padding: tuple[int, int, int, int] = (0, 0, 0, 0)) -> I8:
    """Dense conv, HWC in -> HWC out: acc = bias + sum (x + input_offset) * w; requantized."""
    _, kh, kw, cin = weight_ohwi.shape
    if x.shape[2] != cin:
        raise InvalidModelError(f"conv2d: input has {x.shape[2]} channels, weights {cin}")
    win = _windows(x, (kh, kw), stride, padding, q.input_offset)
    acc = np.tensordot(win, np.asarray(weight_ohwi, dtype=np.int64), axes=([2, 3, 4], [1, 2, 3]))
    return _finish(acc + np.asarray(bias, dtype=np.int64), q)


def depthwise_conv2d_s8(x: I8, weight_hwc: I8, bias: I32, q: ConvQuant,
                        stride: tuple[int, int] = (1, 1),
                        padding: tuple[int, int, int, int] = (0, 0, 0, 0)) -> I8:
    """Depthwise conv (channel multiplier 1), HWC; same accumulation and rounding as conv2d."""
    kh, kw, c = weight_hwc.shape
    if x.shape[2] != c:
        raise InvalidModelError(f"depthwise: input has {x.shape[2]} channels, weights {c}")
    win = _windows(x, (kh, kw), stride, padding, q.input_offset)
    acc = np.einsum("hwijc,ijc->hwc", win, np.asarray(weight_hwc, dtype=np.int64))
    return _finish(acc + np.asarray(bias, dtype=np.int64), q)


def fully_connected_s8(x: I8, weight: I8, bias: I32, q: ConvQuant) -> I8:
    """Fully connected on a flat int8 vector: a 1x1 conv over one pixel, per-channel params."""
    xv = np.asarray(x, dtype=np.int64).reshape(-1) + q.input_offset
    if xv.shape[0] != weight.shape[1]:
        raise InvalidModelError(f"fc: input has {xv.shape[0]} features, weights {weight.shape[1]}")
    acc = np.asarray(weight, dtype=np.int64) @ xv + np.asarray(bias, dtype=np.int64)
    return _finish(acc, q)


def add_s8(a: I8, b: I8, q: AddParams, act_min: int = -128, act_max: int = 127) -> I8:
    """Elementwise int8 add with rescaling, exactly TFLite's reference int8 Add (AddParams)."""
    a1 = (np.asarray(a, dtype=np.int64) + q.input1_offset) << q.left_shift
    b1 = (np.asarray(b, dtype=np.int64) + q.input2_offset) << q.left_shift
    sa = requantize(a1, q.input1_multiplier, q.input1_shift)
    sb = requantize(b1, q.input2_multiplier, q.input2_shift)
    total = sa.astype(np.int64) + sb
    out = requantize(total, q.output_multiplier, q.output_shift).astype(np.int64) + q.output_offset
    return np.clip(out, act_min, act_max).astype(np.int8)


def conv2d_1x1_add_s8(x: I8, weight_ohwi: I8, bias: I32, q: ConvQuant, residual: I8,
                      add: AddParams, act_min: int = -128, act_max: int = 127) -> I8:
    """The fused projection + residual add of the `inplace` memory model.

    Defined as conv2d_s8 (the projection's own int8 output, with its own quantization) followed
    by add_s8(projection, residual): the C kernel computes exactly these two steps per element
    and writes the sum over the residual buffer.
    """
    return add_s8(conv2d_s8(x, weight_ohwi, bias, q), residual, add, act_min, act_max)


def _div_round_away(total: I64, count: I64 | np.int64 | int) -> I64:
    # TFLite's rounding of an average: (sum + count/2) / count for positive sums, mirrored
    # for negative ones (half away from zero).
    half = np.int64(count) // 2
    pos = (total + half) // count
    neg = -((-total + half) // count)
    return np.where(total >= 0, pos, neg)


def avg_pool_s8(x: I8, kernel: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int, int, int] = (0, 0, 0, 0), input_offset: int = 0,
                output_offset: int = 0, act_min: int = -128, act_max: int = 127) -> I8:
    """Average pool, same scale in and out, torch's count_include_pad semantics.

    out = clamp(output_offset + div(sum over the window of (q + input_offset), kh*kw)):
    padded elements hold the zero point (contribute 0) and count in the divisor, as torch's
    default AvgPool2d does; div rounds half away from zero. input_offset = -zp.
    """
    win = _windows(x, kernel, stride, padding, input_offset)
    total = win.sum(axis=(2, 3))
    out = _div_round_away(total, kernel[0] * kernel[1]) + output_offset
    return np.clip(out, act_min, act_max).astype(np.int8)


def max_pool_s8(x: I8, kernel: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int, int, int] = (0, 0, 0, 0), act_min: int = -128,
                act_max: int = 127) -> I8:
    """Max pool over the in-bounds part of each window (padding is -inf, as torch)."""
    t, left, b, r = padding
    xp = np.pad(np.asarray(x, dtype=np.int64), ((t, b), (left, r), (0, 0)),
                constant_values=-(2**40))
    win = np.lib.stride_tricks.sliding_window_view(xp, kernel, axis=(0, 1))
    out: I64 = win[:: stride[0], :: stride[1]].max(axis=(3, 4))
    return np.clip(out, act_min, act_max).astype(np.int8)


def global_avg_pool_s8(x: I8, input_offset: int = 0, output_offset: int = 0) -> I8:
    """(H, W, C) -> (1, 1, C): output_offset + div(sum (q + input_offset), H*W), int8.

    The sum is int32 in C; div rounds half away from zero. Same scale in and out.
    """
    total = np.asarray(x, dtype=np.int64).sum(axis=(0, 1)) + input_offset * x.shape[0] * x.shape[1]
    out = _div_round_away(total, x.shape[0] * x.shape[1]) + output_offset
    return np.clip(out, -128, 127).astype(np.int8).reshape(1, 1, -1)


# --- the graph executor -------------------------------------------------------------------


def conv_weights_ohwi(ql: QuantLayer) -> I8:
    """A dense conv's int8 weights in the runtime's OHWI layout (the IR holds OIHW)."""
    if ql.weight_q is None:
        raise InvalidModelError(f"layer {ql.name}: no quantized weights")
    return np.ascontiguousarray(np.asarray(ql.weight_q, dtype=np.int8).transpose(0, 2, 3, 1))


def depthwise_weights_hwc(ql: QuantLayer) -> I8:
    """A depthwise conv's int8 weights in the runtime's HWC layout (the IR holds (C,1,kh,kw))."""
    if ql.weight_q is None:
        raise InvalidModelError(f"layer {ql.name}: no quantized weights")
    return np.ascontiguousarray(np.asarray(ql.weight_q, dtype=np.int8)[:, 0].transpose(1, 2, 0))


def fc_weights_hwc(graph: Graph, ql: QuantLayer) -> I8:
    """Fully connected weights (out, in) with `in` in HWC order of the flattened tensor.

    torch flattens (C, H, W) in CHW order while the runtime keeps activations HWC and a flatten
    moves no bytes, so where the flattened tensor is spatial the weights are permuted instead.
    """
    if ql.weight_q is None:
        raise InvalidModelError(f"layer {ql.name}: no quantized weights")
    w = np.asarray(ql.weight_q, dtype=np.int8)
    source = graph.tensor(ql.layer.inputs[0])
    producer = graph.producer(source.name)
    while producer is not None and producer.op is OpKind.RESHAPE:
        source = graph.tensor(producer.inputs[0])
        producer = graph.producer(source.name)
    c, h, wd = source.shape
    if h * wd == 1:
        return np.ascontiguousarray(w)
    return np.ascontiguousarray(w.reshape(w.shape[0], c, h, wd).transpose(0, 2, 3, 1)
                                .reshape(w.shape[0], -1))


def conv_quant(ql: QuantLayer) -> ConvQuant:
    """The ConvQuant of a conv / fully connected QuantLayer."""
    if ql.multiplier is None or ql.shift is None:
        raise InvalidModelError(f"layer {ql.name}: no requantization parameters")
    return ConvQuant(input_offset=ql.input_offset, output_offset=ql.output_offset,
                     multiplier=np.asarray(ql.multiplier, dtype=np.int32),
                     shift=np.asarray(ql.shift, dtype=np.int32), act_min=ql.act_min,
                     act_max=ql.act_max)


def is_depthwise(graph: Graph, layer: Layer) -> bool:
    """A conv with one group per channel and as many outputs as inputs."""
    cin = graph.tensor(layer.inputs[0]).channels
    return (layer.op is OpKind.CONV and layer.groups > 1
            and layer.groups == cin == graph.tensor(layer.output).channels)


def _bias(ql: QuantLayer) -> I32:
    if ql.bias_q is None:
        raise InvalidModelError(f"layer {ql.name}: no quantized bias")
    return np.asarray(ql.bias_q, dtype=np.int32)


def run_layer(qgraph: QuantizedGraph, ql: QuantLayer, inputs: list[I8]) -> I8:
    """One int8 layer on HWC inputs (integer arithmetic only); HWC output."""
    graph, layer, x = qgraph.graph, ql.layer, inputs[0]
    if layer.op is OpKind.CONV:
        if is_depthwise(graph, layer):
            return depthwise_conv2d_s8(x, depthwise_weights_hwc(ql), _bias(ql), conv_quant(ql),
                                       layer.stride, layer.padding)
        if layer.groups != 1:
            raise UnsupportedOpError(f"layer {layer.name}: grouped conv (groups "
                                     f"{layer.groups}) has no int8 kernel")
        return conv2d_s8(x, conv_weights_ohwi(ql), _bias(ql), conv_quant(ql), layer.stride,
                         layer.padding)
    if layer.op is OpKind.FULLY_CONNECTED:
        y = fully_connected_s8(x, fc_weights_hwc(graph, ql), _bias(ql), conv_quant(ql))
        return y.reshape(1, 1, -1)
    if layer.op is OpKind.ADD:
        if ql.add is None:
            raise InvalidModelError(f"layer {layer.name}: add without AddParams")
        return add_s8(x, inputs[1], ql.add, ql.act_min, ql.act_max)
    if layer.op is OpKind.AVG_POOL:
        return avg_pool_s8(x, layer.kernel, layer.stride, layer.padding, ql.input_offset,
                           ql.output_offset, ql.act_min, ql.act_max)
    if layer.op is OpKind.MAX_POOL:
        return max_pool_s8(x, layer.kernel, layer.stride, layer.padding, ql.act_min,
                           ql.act_max)
    if layer.op is OpKind.GLOBAL_AVG_POOL:
        return global_avg_pool_s8(x, ql.input_offset, ql.output_offset)
    if layer.op is OpKind.RESHAPE:
        return x.reshape(1, 1, -1)  # no bytes move: HWC order is kept (see fc_weights_hwc)
    raise UnsupportedOpError(f"layer {layer.name}: op {layer.op.value} has no int8 kernel")


def run_image(qgraph: QuantizedGraph, x_hwc: I8) -> dict[str, I8]:
    """Every tensor (HWC int8) of one image run through the quantized graph."""
    graph = qgraph.graph
    c, h, w = graph.tensor(graph.input).shape
    if x_hwc.shape != (h, w, c) or x_hwc.dtype != np.int8:
        raise InvalidModelError(f"input of {graph.name}: expected int8 HWC {(h, w, c)}, got "
                                f"{x_hwc.dtype} {x_hwc.shape}")
    env: dict[str, I8] = {graph.input: x_hwc}
    for ql in qgraph.ordered_layers():
        env[ql.layer.output] = run_layer(qgraph, ql, [env[t] for t in ql.layer.inputs])
    return env


def run_quantized(qgraph: QuantizedGraph, x_q: npt.ArrayLike) -> I8:
    """The int8 outputs (N, C, H, W) of an int8 NCHW batch, as the C runtime computes them."""
    batch = np.asarray(x_q)
    if batch.dtype != np.int8 or batch.ndim != 4:
        raise InvalidModelError(f"expected an int8 (N, C, H, W) batch, got {batch.dtype} "
                                f"{batch.shape}")
    graph = qgraph.graph
    c, h, w = graph.tensor(graph.output).shape
    out = np.empty((batch.shape[0], c, h, w), dtype=np.int8)
    for i, image in enumerate(batch):
        y = run_image(qgraph, np.ascontiguousarray(image.transpose(1, 2, 0)))[graph.output]
        out[i] = y.reshape(h, w, c).transpose(2, 0, 1)
    return out
