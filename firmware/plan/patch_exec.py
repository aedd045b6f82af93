"""A float reference executor (numpy) for whole-tensor and patch-based inference.

`execute` runs a graph layer by layer; `execute_patched` runs the patch stage of a
`PatchPlan` tile by tile exactly as `firmware.plan.patch.tiles` describes (crop the input region,
zero-pad only at the image border, "valid" op, scatter the last layer's piece into the full
stage output) and the rest layer by layer. The two agree to float rounding: that is the proof
that a schedule computes the same function. Activations are (C, H, W), computed in float64.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from firmware import float_exec
from firmware.errors import InvalidModelError
from firmware.ir import Graph, Layer
from firmware.plan.patch import LayerTile, PatchPlan, tiles

Array = npt.NDArray[np.float64]


def run_layer(graph: Graph, layer: Layer, inputs: list[Array],
              pads: tuple[int, int, int, int] | None = None) -> Array:
    """One layer on (C, H, W) inputs in float64; `pads` (top, left, bottom, right) default to
    the layer's.

    Spatial ops run "valid" on the padded input, so a tile gets exactly the border padding the
    planner assigned to it.
    """
    weight = None if layer.weight is None else np.asarray(graph.params[layer.weight], np.float64)
    bias = None if layer.bias is None else np.asarray(graph.params[layer.bias], np.float64)
    y = float_exec.run_layer(layer, [x[None] for x in inputs], weight, bias, pads)
    return np.asarray(y[0], np.float64)


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
