"""Float execution of a whole IR `Graph` in numpy: calibration ranges and the float baseline.

Batched NCHW (the IR's per-image (C, H, W) with a batch axis in front), in float32 by default
or float64 (`run_graph(..., dtype=np.float64)`: calibration, whose ranges must not depend on
the summation order the host's BLAS kernel picks, and the patch executor's proofs). Semantics follow
torch/ONNX: convs cross-correlate with the layer's zero padding; average pooling divides by
kh * kw, padding included (torch's AvgPool2d default, as the importer requires); a reshape flattens
in (C, H, W) order; a fully connected layer returns (N, out, 1, 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from firmware.errors import InvalidModelError, UnsupportedOpError
from firmware.ir import Activation, Graph, Layer, OpKind

FloatArray = npt.NDArray[np.floating]
Padding = tuple[int, int, int, int]
TensorHook = Callable[[str, FloatArray], None]
ParamLookup = Callable[[Layer], tuple[FloatArray | None, FloatArray | None]]


def activate(x: FloatArray, activation: Activation) -> FloatArray:
    """Apply a fused activation (ReLU: max(x, 0); ReLU6: clip to [0, 6])."""
    if activation is Activation.RELU:
        return np.maximum(x, 0)
    if activation is Activation.RELU6:
        return np.clip(x, 0, 6)
    return x


def _windows(x: FloatArray, layer: Layer, pad_value: float = 0.0,
             padding: Padding | None = None) -> FloatArray:
    """(N, C, Ho, Wo, kh, kw) view of the padded input at the layer's stride.

    `padding` (top, left, bottom, right) overrides the layer's: a patch is padded only where
    it touches the image border.
    """
    top, left, bottom, right = layer.padding if padding is None else padding
    if top or left or bottom or right:
        x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)),
                   constant_values=pad_value)
    kh, kw = layer.kernel
    sh, sw = layer.stride
    win = sliding_window_view(x, (kh, kw), axis=(2, 3))
    return win[:, :, ::sh, ::sw]


def conv2d(x: FloatArray, weight: FloatArray, bias: FloatArray | None, layer: Layer,
           padding: Padding | None = None) -> FloatArray:
    """Grouped 2-D cross-correlation, NCHW input, OIHW weight (I = in / groups)."""
    win = _windows(x, layer, padding=padding)
    groups = layer.groups
    out_ch = weight.shape[0]
    in_ch = x.shape[1]
    if groups == in_ch == out_ch and weight.shape[1] == 1:
        # Depthwise: one filter per channel.
        out = np.einsum("nchwij,cij->nchw", win, weight[:, 0], optimize=True)
    elif groups == 1:
        out = np.tensordot(win, weight, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)
    else:
        cin_g = in_ch // groups
        cout_g = out_ch // groups
        parts = [
            np.tensordot(win[:, g * cin_g:(g + 1) * cin_g],
                         weight[g * cout_g:(g + 1) * cout_g], axes=([1, 4, 5], [1, 2, 3]))
            for g in range(groups)
        ]
        out = np.concatenate(parts, axis=3).transpose(0, 3, 1, 2)
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1)
    return np.ascontiguousarray(out, dtype=x.dtype)


def avg_pool(x: FloatArray, layer: Layer, padding: Padding | None = None) -> FloatArray:
    """Average over each window; zero padding counts in the divisor (torch's default)."""
    out: FloatArray = _windows(x, layer, padding=padding).mean(axis=(4, 5)).astype(x.dtype)
    return out


def graph_params(graph: Graph, dtype: type[np.floating] = np.float32) -> ParamLookup:
    """Weight and bias lookup from `graph.params`, as `dtype` (float32 by default)."""

    def lookup(layer: Layer) -> tuple[FloatArray | None, FloatArray | None]:
        w = None if layer.weight is None else np.asarray(graph.params[layer.weight], dtype)
        b = None if layer.bias is None else np.asarray(graph.params[layer.bias], dtype)
        return w, b

    return lookup


def run_layer(layer: Layer, inputs: list[FloatArray], weight: FloatArray | None,
              bias: FloatArray | None, padding: Padding | None = None) -> FloatArray:
    """One layer on float NCHW inputs, fused activation included; `padding` as in _windows."""
    op = layer.op
    x = inputs[0]
    if op is OpKind.CONV:
        if weight is None:
            raise InvalidModelError(f"layer {layer.name}: conv without weight")
        out = conv2d(x, weight, bias, layer, padding)
    elif op is OpKind.FULLY_CONNECTED:
        if weight is None:
            raise InvalidModelError(f"layer {layer.name}: fully connected without weight")
        flat = x.reshape(x.shape[0], -1)
        out = flat @ weight.T
        if bias is not None:
            out = out + bias
        out = out.reshape(out.shape[0], -1, 1, 1)
    elif op is OpKind.ADD:
        out = inputs[0] + inputs[1]
    elif op is OpKind.AVG_POOL:
        out = avg_pool(x, layer, padding)
    elif op is OpKind.MAX_POOL:
        out = _windows(x, layer, pad_value=-np.inf, padding=padding).max(axis=(4, 5))
    elif op is OpKind.GLOBAL_AVG_POOL:
        out = x.mean(axis=(2, 3), keepdims=True)
    elif op is OpKind.CONCAT:
        out = np.concatenate(inputs, axis=1)
    elif op is OpKind.RESHAPE:
        out = x.reshape(x.shape[0], -1, 1, 1)
    else:  # pragma: no cover - every OpKind is handled above
        raise UnsupportedOpError(f"layer {layer.name}: op {op.value} has no float executor")
    return activate(np.asarray(out, dtype=x.dtype), layer.activation)


def run_graph(graph: Graph, x: npt.ArrayLike, hook: TensorHook | None = None,
              params: ParamLookup | None = None,
              after_layer: Callable[[str, FloatArray], FloatArray] | None = None,
              dtype: type[np.floating] = np.float32) -> FloatArray:
    """Run `graph` on a float batch (N, C, H, W); return the output (N, C, H, W).

    Computes in `dtype` (float32, or float64 where the result must not depend on the host's
    BLAS kernel beyond the last float32 bit). `hook(tensor_name, value)` sees every tensor,
    the input first. `params` overrides the
    weight lookup (fake quantization passes dequantized weights); `after_layer` may replace
    each layer's output before it is stored (fake quantization rounds it to int8 levels).
    Tensors are freed after their last reader, so memory stays near one block's working set.
    """
    batch = np.asarray(x, dtype=dtype)
    shape = graph.tensor(graph.input).shape
    if batch.ndim == 3:
        batch = batch[None]
    if batch.shape[1:] != shape:
        raise InvalidModelError(
            f"graph {graph.name}: input batch shape {batch.shape[1:]} != expected {shape}"
        )
    lookup = params or graph_params(graph, dtype)
    last_use = _last_use(graph)
    values: dict[str, FloatArray] = {graph.input: batch}
    if hook is not None:
        hook(graph.input, batch)
    for i, layer in enumerate(graph.layers):
        weight, bias = lookup(layer)
        out = run_layer(layer, [values[n] for n in layer.inputs], weight, bias)
        if after_layer is not None:
            out = after_layer(layer.output, out)
        values[layer.output] = out
        if hook is not None:
            hook(layer.output, out)
        for name in layer.inputs:
            if last_use.get(name) == i and name != graph.output:
                del values[name]
    return values[graph.output]


def run_all(graph: Graph, x: npt.ArrayLike) -> Mapping[str, FloatArray]:
    """Every tensor's float value for a batch (small graphs and tests only)."""
    seen: dict[str, FloatArray] = {}

    def keep(name: str, value: FloatArray) -> None:
        seen[name] = value

    run_graph(graph, x, hook=keep)
    return seen


def _last_use(graph: Graph) -> dict[str, int]:
    last: dict[str, int] = {}
    for i, layer in enumerate(graph.layers):
        for name in layer.inputs:
            last[name] = i
    return last
