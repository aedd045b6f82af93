"""The int8 forward pass of the engine: `firmware.int8.reference`, with the accumulations of
conv, depthwise and fully connected layers done by floating-point BLAS, batched.

This is exact, not approximate: every product (q_x + input_offset) * q_w is an integer of
magnitude at most 255 * 127 < 2^15, and every partial sum of a layer is an integer of
magnitude below 2^15 * (inputs per output), so float64 represents each partial sum exactly
whatever order BLAS adds in (for any layer below 2^38 inputs per output), and float32 does
for layers of at most 518 inputs per output (depthwise convs, small 1x1s), which use it.
The accumulator is then requantized, offset and clamped by the reference's own integer
functions. Every other op runs the reference kernel itself. The result equals
`reference.run_layer` bit for bit (tests/firmware/training/test_engine.py checks it), only
faster: the reference's int64 tensordot has no BLAS behind it, and a batch of images costs
one call per layer.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from firmware.int8.quantize import QuantizedGraph, QuantLayer, requantize
from firmware.int8.reference import fc_weights_hwc, is_depthwise, run_layer
from firmware.ir import OpKind

I8 = npt.NDArray[np.int8]


def _finish(acc: npt.NDArray[np.int64], ql: QuantLayer) -> I8:
    assert ql.multiplier is not None and ql.shift is not None
    out = requantize(acc, ql.multiplier, ql.shift).astype(np.int64) + ql.output_offset
    result: I8 = np.clip(out, ql.act_min, ql.act_max).astype(np.int8)
    return result


def forward_layer(qgraph: QuantizedGraph, ql: QuantLayer, inputs: list[I8]) -> I8:
    """One int8 layer on HWC inputs, equal to `reference.run_layer` (module docstring)."""
    if _batched(qgraph, ql):
        out: I8 = forward_batch(qgraph, ql, [np.asarray(x)[None] for x in inputs])[0]
        return out
    return run_layer(qgraph, ql, inputs)


# Largest |(q_x + offset) * q_w| is 255 * 127; a sum of n of them is exact in float32 while
# below 2^24 (n <= 518), in float64 while below 2^53.
FLOAT32_EXACT_TERMS = (1 << 24) // (255 * 127)


def exact_dtype(terms: int) -> type[np.floating]:
    """The narrower float type in which `terms` int8 x int8 products sum exactly."""
    return np.float32 if terms <= FLOAT32_EXACT_TERMS else np.float64


def _batched(qgraph: QuantizedGraph, ql: QuantLayer) -> bool:
    layer = ql.layer
    return layer.op is OpKind.FULLY_CONNECTED or (layer.op is OpKind.CONV and (
        layer.groups == 1 or is_depthwise(qgraph.graph, layer)))


def accumulate(x: npt.NDArray[np.floating], weight: npt.NDArray[np.floating],
               kernel: tuple[int, int],
               stride: tuple[int, int], padding: tuple[int, int, int, int],
               depthwise: bool) -> npt.NDArray[np.floating]:
    """Cross-correlation sums of a batch (N, H, W, C) with OIHW weights: (N, Ho, Wo, Cout).

    A 1x1 conv is one matrix product, a depthwise conv kh * kw shifted multiply-adds, any
    other conv a product with the im2col windows (copied once).
    """
    t, left, b, r = padding
    if t or left or b or r:
        x = np.pad(x, ((0, 0), (t, b), (left, r), (0, 0)))
    kh, kw = kernel
    sh, sw = stride
    n, hp, wp, c = x.shape
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    if depthwise:
        out = np.zeros((n, ho, wo, c), dtype=x.dtype)
        for i in range(kh):
            for j in range(kw):
                view = x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
                out += view * weight[:, 0, i, j]
        return out
    if kh == kw == 1:
        view = x[:, : sh * (ho - 1) + 1:sh, : sw * (wo - 1) + 1:sw]
        return (view.reshape(-1, c) @ weight[:, :, 0, 0].T).reshape(n, ho, wo, -1)
    win = sliding_window_view(x, kernel, axis=(1, 2))[:, ::sh, ::sw]  # (N, Ho, Wo, C, kh, kw)
    cols = np.ascontiguousarray(win).reshape(n * ho * wo, -1)
    dense: npt.NDArray[np.floating] = cols @ weight.reshape(weight.shape[0], -1).T
    return dense.reshape(n, ho, wo, -1)


def forward_batch(qgraph: QuantizedGraph, ql: QuantLayer, inputs: list[I8]) -> I8:
    """`forward_layer` on a batch (N, H, W, C): one call for N images (evaluation, prefixes).

    Conv, depthwise and fully connected layers run batched with the exact float64 sums of
    the module docstring; every other op runs the reference kernel image by image.
    """
    layer = ql.layer
    if layer.op is OpKind.CONV and _batched(qgraph, ql):
        assert ql.weight_q is not None and ql.bias_q is not None
        dtype = exact_dtype(int(np.prod(ql.weight_q.shape[1:])))
        x = np.asarray(inputs[0], dtype=dtype) + dtype(ql.input_offset)
        acc = accumulate(x, np.asarray(ql.weight_q, dtype=dtype), layer.kernel,
                         layer.stride, layer.padding, layer.groups != 1)
        total = np.rint(acc).astype(np.int64) + np.asarray(ql.bias_q, dtype=np.int64)
        return _finish(total, ql)
    if layer.op is OpKind.FULLY_CONNECTED:
        assert ql.bias_q is not None
        w = np.asarray(fc_weights_hwc(qgraph.graph, ql), dtype=np.float64)
        n = len(inputs[0])
        xv = np.asarray(inputs[0], dtype=np.float64).reshape(n, -1) + ql.input_offset
        total = np.rint(xv @ w.T).astype(np.int64) + np.asarray(ql.bias_q, dtype=np.int64)
        return _finish(total, ql).reshape(n, 1, 1, -1)
    if layer.op is OpKind.RESHAPE:
        return np.asarray(inputs[0]).reshape(len(inputs[0]), 1, 1, -1)
    return np.stack([run_layer(qgraph, ql, list(images)) for images in zip(*inputs, strict=True)])
