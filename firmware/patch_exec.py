"""A float reference executor (numpy) for whole-tensor and patch-based inference.

`execute` runs a graph layer by layer; `execute_patched` runs the patch stage of a
`PatchPlan` tile by tile exactly as `firmware.patch.tiles` describes (crop the input region,
zero-pad only at the image border, "valid" op, scatter the last layer's piece into the full
stage output) and the rest layer by layer. The two agree to float rounding: that is the proof
that a schedule computes the same function. Activations are (C, H, W), computed in float64.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from firmware.errors import InvalidModelError, UnsupportedOpError
from firmware.ir import Activation, Graph, Layer, OpKind
from firmware.patch import LayerTile, PatchPlan, tiles

Array = npt.NDArray[np.float64]


def _activate(x: Array, activation: Activation) -> Array:
    if activation is Activation.RELU:
        return np.maximum(x, 0.0)
    if activation is Activation.RELU6:
        return np.clip(x, 0.0, 6.0)
    return x


def _pad(x: Array, top: int, left: int, bottom: int, right: int, value: float = 0.0) -> Array:
    if not (top or left or bottom or right):
        return x
    return np.pad(x, ((0, 0), (top, bottom), (left, right)), constant_values=value)


def _windows(x: Array, layer: Layer) -> Array:
    """(C, Ho, Wo, kh, kw) views of an already padded input, "valid" with the layer's stride."""
    (kh, kw), (sh, sw) = layer.kernel, layer.stride
    return sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]


def _conv(x: Array, layer: Layer, params: Mapping[str, npt.NDArray[np.generic]]) -> Array:
    if layer.weight is None:
        raise InvalidModelError(f"layer {layer.name}: conv without weight")
    w = np.asarray(params[layer.weight], np.float64)
    g = layer.groups
    win = _windows(x, layer)
    c, ho, wo, kh, kw = win.shape
    win = win.reshape(g, c // g, ho, wo, kh, kw)
    wg = w.reshape(g, w.shape[0] // g, w.shape[1], kh, kw)
    y: Array = np.einsum("gchwij,gocij->gohw", win, wg,
                         optimize=True).reshape(w.shape[0], ho, wo)
    if layer.bias is not None:
        y = y + np.asarray(params[layer.bias], np.float64)[:, None, None]
    return y


def run_layer(graph: Graph, layer: Layer, inputs: list[Array],
              pads: tuple[int, int, int, int] | None = None) -> Array:
    """One layer on (C, H, W) inputs; `pads` (top, left, bottom, right) default to the layer's.

    Spatial ops run "valid" on the padded input, so a tile gets exactly the border padding the
    planner assigned to it.
    """
    top, left, bottom, right = layer.padding if pads is None else pads
    x = inputs[0]
    if layer.op is OpKind.CONV:
        y = _conv(_pad(x, top, left, bottom, right), layer, graph.params)
    elif layer.op is OpKind.MAX_POOL:
        y = _windows(_pad(x, top, left, bottom, right, -np.inf), layer).max(axis=(3, 4))
    elif layer.op is OpKind.AVG_POOL:  # zero padding counted in the divisor (torch default)
        y = _windows(_pad(x, top, left, bottom, right), layer).mean(axis=(3, 4))
    elif layer.op is OpKind.ADD:
        y = inputs[0] + inputs[1]
    elif layer.op is OpKind.CONCAT:
        y = np.concatenate(inputs, axis=0)
    elif layer.op is OpKind.GLOBAL_AVG_POOL:
        y = x.mean(axis=(1, 2), keepdims=True)
    elif layer.op is OpKind.RESHAPE:
        y = x.reshape(graph.tensor(layer.output).shape)
    elif layer.op is OpKind.FULLY_CONNECTED:
        if layer.weight is None:
            raise InvalidModelError(f"layer {layer.name}: fully connected without weight")
        w = np.asarray(graph.params[layer.weight], np.float64)
        y = w @ x.reshape(-1)
        if layer.bias is not None:
            y = y + np.asarray(graph.params[layer.bias], np.float64)
        y = y.reshape(graph.tensor(layer.output).shape)
    else:
        raise UnsupportedOpError(f"layer {layer.name}: the float executor has no {layer.op}")
    return _activate(y, layer.activation)


def execute(graph: Graph, x: npt.NDArray[np.generic],
            start: int = 0, values: dict[str, Array] | None = None) -> dict[str, Array]:
    """Run layers[start:] whole-tensor; returns every tensor computed, by name."""
    env: dict[str, Array] = dict(values or {})
    if start == 0:
        env[graph.input] = _checked_input(graph, x)
    for layer in graph.layers[start:]:
        env[layer.output] = run_layer(graph, layer, [env[t] for t in layer.inputs])
    return env


def _checked_input(graph: Graph, x: npt.NDArray[np.generic]) -> Array:
    shape = graph.tensor(graph.input).shape
    if tuple(x.shape) != shape:
        raise InvalidModelError(f"input of {graph.name} has shape {tuple(x.shape)}, "
                                f"expected {shape} (C, H, W)")
    return np.asarray(x, np.float64)


def _run_tile(graph: Graph, tile: LayerTile, local: dict[str, tuple[Array, int, int]]) -> Array:
    """One layer of one patch: crop each input to the tile's region from its local buffer."""
    layer = graph.layer(tile.layer)
    crops: list[Array] = []
    for src in layer.inputs:
        arr, r0, c0 = local[src]
        (a, b), (c, d) = tile.in_rows, tile.in_cols
        if a < r0 or c < c0 or b - r0 > arr.shape[1] or d - c0 > arr.shape[2]:
            raise InvalidModelError(f"tile of {layer.name} reads rows {a}:{b} cols {c}:{d} of "
                                    f"{src}, but the patch computed only from ({r0}, {c0}) "
                                    f"size {arr.shape[1:]}")
        crops.append(arr[:, a - r0:b - r0, c - c0:d - c0])
    y = run_layer(graph, layer, crops, (tile.pad_top, tile.pad_left, tile.pad_bottom,
                                        tile.pad_right))
    want = (tile.out_rows[1] - tile.out_rows[0], tile.out_cols[1] - tile.out_cols[0])
    if y.shape[1:] != want:
        raise InvalidModelError(f"tile of {layer.name} produced {y.shape[1:]}, planned {want}")
    return y


def execute_patched(graph: Graph, plan: PatchPlan,
                    x: npt.NDArray[np.generic]) -> dict[str, Array]:
    """Run the plan's patch stage tile by tile, then the rest whole-tensor.

    Returns the stage output (assembled from its patches) and every tensor after it.
    """
    full = _checked_input(graph, x)
    split_after = plan.schedule.split_after
    if split_after is None:
        return execute(graph, full)
    split = graph.index(split_after)
    out_name = graph.layers[split].output
    stage_out = np.full(graph.tensor(out_name).shape, np.nan)
    for patch in tiles(graph, plan):
        # the input region this patch reads: the union of its readers' tiles
        readers = [t for t in patch if graph.input in graph.layer(t.layer).inputs]
        r0, r1 = min(t.in_rows[0] for t in readers), max(t.in_rows[1] for t in readers)
        c0, c1 = min(t.in_cols[0] for t in readers), max(t.in_cols[1] for t in readers)
        local = {graph.input: (full[:, r0:r1, c0:c1], r0, c0)}
        for tile in patch:
            y = _run_tile(graph, tile, local)
            local[graph.layer(tile.layer).output] = (y, tile.out_rows[0], tile.out_cols[0])
        last = patch[-1]
        stage_out[:, last.out_rows[0]:last.out_rows[1],
                  last.out_cols[0]:last.out_cols[1]] = local[out_name][0]
    if np.isnan(stage_out).any():
        raise InvalidModelError(f"the patches of {split_after} leave part of {out_name} unwritten")
    return execute(graph, full, start=split + 1, values={out_name: stage_out})
