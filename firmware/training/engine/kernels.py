"""fp32 kernels of the training engine, one image in HWC as the int8 runtime stores it.

Forward kernels (for the fp32 baseline) and the backward kernels of every op the int8
reference runs: conv (dense and depthwise, any stride and padding), fully connected, add,
average, max and global average pooling. Weights use the IR's layouts: conv OIHW (depthwise
(C, 1, kh, kw)), fully connected (out, in). Padding is (top, left, bottom, right) of zeros
(in real values: the input zero point). Weight gradients can be restricted to the first
`channels` input channels (depthwise: channels), the slice a sparse update trains.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

F32 = npt.NDArray[np.float32]
Padding = tuple[int, int, int, int]
Pair = tuple[int, int]


def windows(x: npt.NDArray[np.floating], kernel: Pair, stride: Pair, padding: Padding,
            pad_value: float = 0.0) -> npt.NDArray[np.floating]:
    """(Ho, Wo, C, kh, kw) view of the padded HWC input at the stride."""
    top, left, bottom, right = padding
    if top or left or bottom or right:
        x = np.pad(x, ((top, bottom), (left, right), (0, 0)), constant_values=pad_value)
    win = sliding_window_view(x, kernel, axis=(0, 1))
    out: npt.NDArray[np.floating] = win[:: stride[0], :: stride[1]]
    return out


def conv_forward(x: F32, weight: F32, bias: F32 | None, stride: Pair, padding: Padding,
                 depthwise: bool) -> F32:
    """Cross-correlation of an HWC image with OIHW weights; HWC output."""
    from firmware.training.engine.int8_forward import accumulate

    out = accumulate(x[None].astype(np.float32), weight, (weight.shape[2], weight.shape[3]),
                     stride, padding, depthwise)[0]
    if bias is not None:
        out = out + bias
    result: F32 = np.ascontiguousarray(out, dtype=np.float32)
    return result


def conv_backward_input(dy: F32, weight: F32, in_shape: tuple[int, int, int], stride: Pair,
                        padding: Padding, depthwise: bool) -> F32:
    """d loss / d input of a conv (a transposed conv of `dy`), HWC like the input."""
    h, w, c = in_shape
    top, left, bottom, right = padding
    kh, kw = weight.shape[2:]
    ho, wo = dy.shape[:2]
    sh, sw = stride
    dxp = np.zeros((h + top + bottom, w + left + right, c), dtype=np.float32)
    for a in range(kh):
        for b in range(kw):
            rows = slice(a, a + sh * (ho - 1) + 1, sh)
            cols = slice(b, b + sw * (wo - 1) + 1, sw)
            if depthwise:
                dxp[rows, cols, :] += dy * weight[:, 0, a, b]
            else:
                dxp[rows, cols, :] += dy @ weight[:, :, a, b]
    out: F32 = np.ascontiguousarray(dxp[top:top + h, left:left + w])
    return out


def conv_backward_weight(x: F32, dy: F32, kernel: Pair, stride: Pair, padding: Padding,
                         depthwise: bool, channels: int) -> F32:
    """d loss / d weight of a conv for the first `channels` input channels (depthwise:
    channels): dense (Cout, channels, kh, kw), depthwise (channels, 1, kh, kw)."""
    top, left, bottom, right = padding
    xs = x[:, :, :channels]
    if top or left or bottom or right:
        xs = np.pad(xs, ((top, bottom), (left, right), (0, 0)))
    kh, kw = kernel
    ho, wo = dy.shape[:2]
    sh, sw = stride
    if depthwise:
        d = dy[:, :, :channels]
        grad = np.empty((channels, 1, kh, kw), dtype=np.float32)
        for a in range(kh):
            for b in range(kw):
                grad[:, 0, a, b] = np.einsum(
                    "hwc,hwc->c", xs[a:a + sh * (ho - 1) + 1:sh, b:b + sw * (wo - 1) + 1:sw], d)
        return grad
    flat_dy = dy.reshape(-1, dy.shape[2])
    grad = np.empty((dy.shape[2], channels, kh, kw), dtype=np.float32)
    for a in range(kh):
        for b in range(kw):
            view = xs[a:a + sh * (ho - 1) + 1:sh, b:b + sw * (wo - 1) + 1:sw]
            grad[:, :, a, b] = flat_dy.T @ view.reshape(-1, channels)
    return grad


def fc_forward(x: F32, weight: F32, bias: F32 | None) -> F32:
    """(out,) = weight (out, in) @ x.flat (+ bias)."""
    out = weight @ x.reshape(-1)
    if bias is not None:
        out = out + bias
    result: F32 = out.astype(np.float32)
    return result


def avg_pool_forward(x: F32, kernel: Pair, stride: Pair, padding: Padding) -> F32:
    """Average over each window; padding counts in the divisor (torch's default)."""
    out: F32 = windows(x, kernel, stride, padding).mean(axis=(3, 4), dtype=np.float32)
    return out


def avg_pool_backward(dy: F32, in_shape: tuple[int, int, int], kernel: Pair, stride: Pair,
                      padding: Padding) -> F32:
    """Each output's gradient spread evenly over its window (padding included)."""
    c = in_shape[2]
    weight = np.zeros((c, 1, *kernel), dtype=np.float32) + np.float32(1.0 / (kernel[0] *
                                                                              kernel[1]))
    return conv_backward_input(dy, weight, in_shape, stride, padding, depthwise=True)


def max_pool_forward(x: F32, kernel: Pair, stride: Pair, padding: Padding) -> F32:
    """Max over the in-bounds part of each window."""
    out: F32 = windows(x, kernel, stride, padding, -np.inf).max(axis=(3, 4))
    return out


def max_pool_backward(dy: F32, x: npt.NDArray[np.generic], kernel: Pair, stride: Pair,
                      padding: Padding) -> F32:
    """Each output's gradient to the first maximum of its window (row-major scan, as torch).

    Ties (frequent in int8) go to the first maximum; `x` is the pooled input (any dtype).
    """
    h, w, c = x.shape
    top, left, bottom, right = padding
    xf = np.asarray(x, dtype=np.float64)
    win = windows(xf, kernel, stride, padding, -np.inf)
    ho, wo = win.shape[:2]
    flat = win.reshape(ho, wo, c, -1)
    arg = flat.argmax(axis=3)  # the first maximum in row-major (kh, kw) order
    a, b = np.divmod(arg, kernel[1])
    rows = np.arange(ho)[:, None, None] * stride[0] + a
    cols = np.arange(wo)[None, :, None] * stride[1] + b
    chans = np.broadcast_to(np.arange(c)[None, None, :], rows.shape)
    dxp = np.zeros((h + top + bottom, w + left + right, c), dtype=np.float32)
    np.add.at(dxp, (rows, cols, chans), dy)
    out: F32 = np.ascontiguousarray(dxp[top:top + h, left:left + w])
    return out


def global_avg_pool_backward(dy: F32, in_shape: tuple[int, int, int]) -> F32:
    """The mean's gradient: dy / (H * W) at every position."""
    h, w, c = in_shape
    out: F32 = np.broadcast_to(dy.reshape(1, 1, c) / np.float32(h * w), (h, w, c)).astype(
        np.float32)
    return out


def softmax_cross_entropy(logits: F32, label: int) -> tuple[float, F32]:
    """(loss, d loss / d logits) of softmax cross-entropy; float64 inside, fp32 out."""
    z = logits.astype(np.float64).reshape(-1)
    z = z - z.max()
    p = np.exp(z)
    p /= p.sum()
    loss = float(-np.log(max(p[label], 1e-30)))
    p[label] -= 1.0
    return loss, p.astype(np.float32)
