"""Patch-based inference schedules (MCUNetV2, Lin et al. 2021, Section 3).

The first layers of a CNN (the *patch stage*, up to and including `split_after`) run p x p
times, once per spatial patch of the stage's output; the rest runs layer by layer. Each patch
computes, for every stage tensor, the region its consumers need: walking back from the output
patch, a conv of kernel k and stride s needs rows [a*s - pad, (b-1)*s - pad + k) of its input
for output rows [a, b) (stride 1: g += k-1; stride 2: g = 2(g-1)+k). Inside a patch convs are
"valid"; zero padding is applied only where a region crosses the image border, so the patches
compute exactly what the whole tensor would. Overlapping regions (halos) are recomputed.

Memory of the stage = the largest per-patch working set (tensors sized to their regions, under
the same memory model as `firmware.plan.memory`) + the full output buffer of the stage, which the
patches fill. The graph input is read per patch (from the sensor or Flash), so only its input
patch occupies SRAM. Peak = max(stage, layer-based peak of the rest).

Rows and columns are independent: every region is (row interval) x (column interval), so the
planner walks the two axes as vectors of intervals, for all patch counts at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from firmware.errors import DoesNotFitError, InvalidModelError
from firmware.ir import Graph, Layer, OpKind
from firmware.plan.memory import (
    MemoryModel,
    MemoryReport,
    analyze,
    buffers,
    layer_macs,
    lifetimes,
)

IntArray = npt.NDArray[np.int64]
Interval = tuple[int, int]

# Ops that compute each output pixel from a bounded input window, so a patch can run them.
SPATIAL_OPS = frozenset({OpKind.CONV, OpKind.AVG_POOL, OpKind.MAX_POOL, OpKind.ADD,
                         OpKind.CONCAT})


@dataclass(frozen=True)
class Schedule:
    """p x p patches for the layers up to `split_after`; p == 1 is layer-based inference."""

    patches: int
    split_after: str | None
    input_patch: tuple[int, int]  # (rows, cols) of the largest input patch


@dataclass(frozen=True)
class StageLayer:
    """One layer of the patch stage, summed or maximized over its patches."""

    name: str
    out_patch: tuple[int, int]  # largest output region of one patch (rows, cols)
    live_bytes: int  # largest per-patch working set + the stage's full output buffer
    macs: int  # over all patches, recompute included


@dataclass(frozen=True)
class PatchPlan:
    """A schedule and what it costs."""

    schedule: Schedule
    peak_bytes: int
    peak_layer: str
    macs: int  # whole network, recompute included
    mac_overhead: float  # macs / layer-based macs - 1
    stage_macs: int
    stage_mac_overhead: float  # stage macs / the stage's layer-based macs - 1
    # MCUNetV2 counts every patch at the interior size (the input padded so that all patches
    # are equal); border patches here skip rows outside the image, so they compute less.
    uniform_stage_macs: int
    stage_peak_bytes: int
    rest_peak_bytes: int
    layer_peak_bytes: int  # layer-based peak of the whole network, for comparison
    stage: tuple[StageLayer, ...]
    # Per stage tensor, per patch row i (column j): the rows (columns) it computes.
    row_regions: Mapping[str, tuple[Interval, ...]]
    col_regions: Mapping[str, tuple[Interval, ...]]
    memory_model: MemoryModel
    bytes_per_element: int | float


@dataclass(frozen=True)
class LayerTile:
    """What one layer does for one patch, in whole-tensor coordinates (end exclusive).

    The layer reads `in_rows` x `in_cols` of its input(s), pads them with the given zeros
    (non-zero only at the image border), runs "valid" and writes `out_rows` x `out_cols`.
    """

    layer: str
    in_rows: Interval
    in_cols: Interval
    pad_top: int
    pad_left: int
    pad_bottom: int
    pad_right: int
    out_rows: Interval
    out_cols: Interval


def split_points(graph: Graph) -> list[str]:
    """Layers after which the graph can be split: only their output crosses the split."""
    span = lifetimes(graph)
    points: list[str] = []
    open_tensors = {graph.input}
    for i, layer in enumerate(graph.layers):
        if layer.op not in SPATIAL_OPS:
            break
        open_tensors = {t for t in open_tensors | {layer.output} if span[t][1] > i}
        out = graph.tensor(layer.output)
        if open_tensors == {layer.output} and min(out.height, out.width) >= 2:
            points.append(layer.name)
    return points


def _tile_intervals(size: int, p: int) -> list[Interval]:
    """p contiguous intervals covering [0, size); lengths differ by at most one."""
    return [(i * size // p, (i + 1) * size // p) for i in range(p)]


def _need(layer: Layer, axis: int, start: IntArray, end: IntArray,
          in_size: int) -> tuple[IntArray, IntArray, IntArray, IntArray]:
    """Input interval (clipped) and border padding (before, after) for output [start, end)."""
    if layer.op in (OpKind.ADD, OpKind.CONCAT):
        zero = np.zeros_like(start)
        return start, end, zero, zero
    k, s, pad = layer.kernel[axis], layer.stride[axis], layer.padding[axis]
    lo = start * s - pad
    hi = (end - 1) * s - pad + k
    in_lo, in_hi = np.maximum(lo, 0), np.minimum(hi, in_size)
    return in_lo, in_hi, in_lo - lo, hi - in_hi


def _walk(graph: Graph, split: int, axis: int,
          out_intervals: Sequence[Interval]) -> dict[str, tuple[IntArray, IntArray]]:
    """Per stage tensor, the [start, end) each patch computes along `axis` (0 rows, 1 cols)."""
    layers = graph.layers[: split + 1]
    out = layers[-1].output
    region: dict[str, tuple[IntArray, IntArray]] = {
        out: (np.array([a for a, _ in out_intervals], np.int64),
              np.array([b for _, b in out_intervals], np.int64))}
    for layer in reversed(layers):
        start, end = region[layer.output]
        for src in dict.fromkeys(layer.inputs):
            t = graph.tensor(src)
            lo, hi, _, _ = _need(layer, axis, start, end, t.height if axis == 0 else t.width)
            if src in region:
                old_lo, old_hi = region[src]
                lo, hi = np.minimum(lo, old_lo), np.maximum(hi, old_hi)
            region[src] = (lo, hi)
    return region


@dataclass(frozen=True)
class _Profile:
    """One split walked for several patch counts at once (the sweep's fast path).

    Patch count k owns entries `blocks[k]` of the interval vectors and of both patch axes of
    `live` (per stage layer, per patch row, per patch column: working set + output buffer).
    """

    patch_counts: tuple[int, ...]
    blocks: tuple[slice, ...]
    rows: dict[str, tuple[IntArray, IntArray]]
    cols: dict[str, tuple[IntArray, IntArray]]
    layer_peak: tuple[npt.NDArray[np.float64], ...]  # per patch count: per stage layer
    layer_macs: npt.NDArray[np.int64]  # (stage layer, patch count)

    def peak(self, k: int) -> tuple[int, int]:
        """(peak bytes, stage layer index) for patch count number k."""
        i = int(np.argmax(self.layer_peak[k]))
        return int(self.layer_peak[k][i]), i

    def macs(self, k: int) -> int:
        """Stage MACs with recompute for patch count number k."""
        return int(self.layer_macs[:, k].sum())


def _profile(graph: Graph, split: int, patch_counts: Sequence[int],
             memory_model: MemoryModel, bytes_per_element: int | float) -> _Profile:
    """Walk the stage ending at layer `split` for every p in `patch_counts` at once."""
    out = graph.tensor(graph.layers[split].output)
    rows = _walk(graph, split, 0, [iv for p in patch_counts
                                   for iv in _tile_intervals(out.height, p)])
    cols = _walk(graph, split, 1, [iv for p in patch_counts
                                   for iv in _tile_intervals(out.width, p)])
    bounds = np.cumsum([0, *patch_counts])
    blocks = tuple(slice(int(bounds[k]), int(bounds[k + 1])) for k in range(len(patch_counts)))
    live = _stage_live(graph, split, rows, cols, memory_model, bytes_per_element)
    layer_peak = tuple(live[:, blk, blk].max(axis=(1, 2)) for blk in blocks)
    macs = np.zeros((split + 1, len(patch_counts)), np.int64)
    for i, layer in enumerate(graph.layers[: split + 1]):
        t = graph.tensor(layer.output)
        per_pixel = layer_macs(graph, layer) // (t.height * t.width)
        if per_pixel:
            rsum = np.add.reduceat(rows[t.name][1] - rows[t.name][0], bounds[:-1])
            csum = np.add.reduceat(cols[t.name][1] - cols[t.name][0], bounds[:-1])
            macs[i] = per_pixel * rsum * csum
    return _Profile(tuple(patch_counts), blocks, rows, cols, layer_peak, macs)


def _stage_live(graph: Graph, split: int, rows: Mapping[str, tuple[IntArray, IntArray]],
                cols: Mapping[str, tuple[IntArray, IntArray]], memory_model: MemoryModel,
                bytes_per_element: int | float) -> npt.NDArray[np.float64]:
    """Bytes live per (stage layer, patch row, patch column), the full output buffer included.

    Buffers follow `firmware.plan.memory.buffers`, with the stage output kept apart: the patches
    write their pieces straight into it.
    """
    out = graph.tensor(graph.layers[split].output)
    sizes: dict[str, npt.NDArray[np.float64]] = {}
    for name in rows:
        rlen = (rows[name][1] - rows[name][0]).astype(np.float64)
        clen = (cols[name][1] - cols[name][0]).astype(np.float64)
        sizes[name] = np.ceil(graph.tensor(name).channels * bytes_per_element
                              * np.outer(rlen, clen))
    span = lifetimes(graph, split + 1)
    live = np.full((split + 1, *sizes[out.name].shape),
                   float(np.ceil(out.numel * bytes_per_element)))
    for buf in buffers(graph, memory_model, split + 1, detached=(out.name,)):
        if buf.tensors == (out.name,):
            continue
        for i in range(max(buf.first, 0), min(buf.last, split) + 1):
            alive = [sizes[t] for t in buf.tensors if span[t][0] <= i <= span[t][1]]
            live[i] += alive[0] if len(alive) == 1 else np.maximum.reduce(alive)
    return live


def _suffix_peaks(report_live: Sequence[int]) -> list[tuple[int, int]]:
    """For each layer index i: (max live bytes over layers i.., the layer where it occurs)."""
    out: list[tuple[int, int]] = [(0, -1)] * (len(report_live) + 1)
    for i in range(len(report_live) - 1, -1, -1):
        # ties go to the earlier layer: that is where the peak is first reached
        out[i] = (report_live[i], i) if report_live[i] >= out[i + 1][0] else out[i + 1]
    return out


def _layer_based(graph: Graph, memory_model: MemoryModel, bytes_per_element: int | float,
                 report: MemoryReport | None = None) -> PatchPlan:
    report = report or analyze(graph, memory_model, bytes_per_element)
    t = graph.tensor(graph.input)
    return PatchPlan(
        schedule=Schedule(1, None, (t.height, t.width)), peak_bytes=report.peak_bytes,
        peak_layer=report.peak_layer, macs=report.macs, mac_overhead=0.0, stage_macs=0,
        stage_mac_overhead=0.0, uniform_stage_macs=0, stage_peak_bytes=0,
        rest_peak_bytes=report.peak_bytes,
        layer_peak_bytes=report.peak_bytes, stage=(), row_regions=MappingProxyType({}),
        col_regions=MappingProxyType({}), memory_model=memory_model,
        bytes_per_element=bytes_per_element)


def _check_split(graph: Graph, patches: int, split_after: str) -> int:
    points = split_points(graph)
    if split_after not in points:
        shown = ", ".join(points[:6]) + (", ..." if len(points) > 6 else "")
        raise InvalidModelError(f"cannot split {graph.name} after {split_after!r}: a patch stage "
                                f"must end where only one spatial tensor crosses ({shown})")
    split = graph.index(split_after)
    out = graph.tensor(graph.layers[split].output)
    if not 1 <= patches <= min(out.height, out.width):
        raise InvalidModelError(f"{patches}x{patches} patches do not fit the {out.height}x"
                                f"{out.width} output of {split_after} (p must be 1..."
                                f"{min(out.height, out.width)})")
    return split


def plan_patches(graph: Graph, patches: int, split_after: str | None,
                 memory_model: MemoryModel = MemoryModel.INPLACE,
                 bytes_per_element: int | float = 1) -> PatchPlan:
    """The cost of running layers up to `split_after` in `patches` x `patches` patches.

    `patches == 1` with `split_after` None is plain layer-based inference.
    """
    if split_after is None:
        if patches != 1:
            raise InvalidModelError(f"{patches}x{patches} patches need a split layer")
        return _layer_based(graph, memory_model, bytes_per_element)
    split = _check_split(graph, patches, split_after)
    report = analyze(graph, memory_model, bytes_per_element)
    profile = _profile(graph, split, [patches], memory_model, bytes_per_element)
    return _build_plan(graph, report.macs, [r.live_bytes for r in report.layers],
                       split, profile, 0, memory_model, bytes_per_element)


def _build_plan(graph: Graph, total_macs: int, live: Sequence[int], split: int,
                profile: _Profile, k: int, memory_model: MemoryModel,
                bytes_per_element: int | float) -> PatchPlan:
    p, blk = profile.patch_counts[k], profile.blocks[k]
    stage_peak, stage_at = profile.peak(k)
    rest_peak, rest_at = _suffix_peaks(live)[split + 1]
    base_stage = sum(layer_macs(graph, layer) for layer in graph.layers[: split + 1])
    stage_macs = profile.macs(k)
    macs = total_macs - base_stage + stage_macs
    rows = {t: tuple(zip(lo[blk].tolist(), hi[blk].tolist(), strict=True))
            for t, (lo, hi) in profile.rows.items()}
    cols = {t: tuple(zip(lo[blk].tolist(), hi[blk].tolist(), strict=True))
            for t, (lo, hi) in profile.cols.items()}
    stage = tuple(
        StageLayer(layer.name, (max(b - a for a, b in rows[layer.output]),
                                max(b - a for a, b in cols[layer.output])),
                   int(profile.layer_peak[k][i]), int(profile.layer_macs[i, k]))
        for i, layer in enumerate(graph.layers[: split + 1]))
    uniform = sum(p * p * s.out_patch[0] * s.out_patch[1] * (
        layer_macs(graph, layer) // graph.tensor(layer.output).height
        // graph.tensor(layer.output).width)
        for s, layer in zip(stage, graph.layers[: split + 1], strict=True))
    peak_at = stage_at if stage_peak >= rest_peak else rest_at
    return PatchPlan(
        schedule=Schedule(p, graph.layers[split].name,
                          (max(b - a for a, b in rows[graph.input]),
                           max(b - a for a, b in cols[graph.input]))),
        peak_bytes=max(stage_peak, rest_peak), peak_layer=graph.layers[peak_at].name,
        macs=macs, mac_overhead=macs / total_macs - 1, stage_macs=stage_macs,
        stage_mac_overhead=stage_macs / base_stage - 1 if base_stage else 0.0,
        uniform_stage_macs=uniform,
        stage_peak_bytes=stage_peak, rest_peak_bytes=rest_peak, layer_peak_bytes=max(live),
        stage=stage, row_regions=MappingProxyType(rows), col_regions=MappingProxyType(cols),
        memory_model=memory_model, bytes_per_element=bytes_per_element)


@dataclass(frozen=True)
class ScheduleOption:
    """One candidate schedule, costed but not yet built into a PatchPlan (`build_option`)."""

    peak_bytes: int
    macs: int
    peak_index: int  # layer where the peak occurs
    split: int  # index of the split layer, -1 for layer-based
    profile: _Profile | None
    k: int  # position of this patch count in the profile

    @property
    def patches(self) -> int:
        """p of this option's p x p patches (1: layer-based)."""
        return 1 if self.profile is None else self.profile.patch_counts[self.k]


def schedule_options(graph: Graph, memory_model: MemoryModel = MemoryModel.INPLACE,
                     bytes_per_element: int | float = 1, max_patches: int = 8,
                     patches: int | None = None, split_after: str | None = None,
                     report: MemoryReport | None = None) -> list[ScheduleOption]:
    """Every candidate schedule with its peak and MACs: layer-based and each (split, p).

    `patches` or `split_after` pin one of the two. InvalidModelError if nothing is left.
    `report`: the graph's `analyze` under the same settings, where already at hand.
    """
    report = report or analyze(graph, memory_model, bytes_per_element)
    live = [r.live_bytes for r in report.layers]
    suffix = _suffix_peaks(live)
    options: list[ScheduleOption] = []
    if patches in (None, 1):
        options.append(ScheduleOption(report.peak_bytes, report.macs,
                                      live.index(report.peak_bytes), -1, None, 0))
    if split_after is not None:
        _check_split(graph, patches or 1, split_after)
    for name in split_points(graph) if split_after is None else [split_after]:
        split = graph.index(name)
        out = graph.tensor(graph.layers[split].output)
        counts = list(range(2, min(max_patches, out.height, out.width) + 1))
        if patches is not None:
            counts = [p for p in counts if p == patches]
        if not counts:
            continue
        profile = _profile(graph, split, counts, memory_model, bytes_per_element)
        base_stage = int(sum(layer_macs(graph, layer) for layer in graph.layers[: split + 1]))
        rest_peak, rest_at = suffix[split + 1]
        for k in range(len(counts)):
            stage_peak, stage_at = profile.peak(k)
            peak, at = max((stage_peak, stage_at), (rest_peak, rest_at), key=lambda v: v[0])
            options.append(ScheduleOption(peak, report.macs - base_stage + profile.macs(k), at,
                                          split, profile, k))
    if not options:
        raise InvalidModelError(f"no split point of {graph.name} admits {patches}x{patches} "
                                f"patches")
    return options


def build_option(graph: Graph, option: ScheduleOption,
                 memory_model: MemoryModel = MemoryModel.INPLACE,
                 bytes_per_element: int | float = 1,
                 report: MemoryReport | None = None) -> PatchPlan:
    """The PatchPlan of a `schedule_options` entry (same memory model and element size)."""
    report = report or analyze(graph, memory_model, bytes_per_element)
    if option.profile is None:
        return _layer_based(graph, memory_model, bytes_per_element, report)
    return _build_plan(graph, report.macs, [r.live_bytes for r in report.layers],
                       option.split, option.profile, option.k, memory_model, bytes_per_element)


def best_schedule(graph: Graph, sram_budget_bytes: int | None = None,
                  memory_model: MemoryModel = MemoryModel.INPLACE,
                  bytes_per_element: int | float = 1, max_patches: int = 8,
                  patches: int | None = None, split_after: str | None = None) -> PatchPlan:
    """The schedule with the fewest MACs that fits the budget, or the lowest peak without one.

    Candidates: layer-based inference and every (p in 2..max_patches, split point); `patches`
    or `split_after` pin one of the two. Ties on the first key go to the second (peak, then
    MACs). Raises DoesNotFitError naming the smallest peak found, its layer and the budget
    when nothing fits. The budget is for the activation peak alone; what a device needs in
    all is `firmware.plan.account.fit_schedule`'s concern.
    """
    report = analyze(graph, memory_model, bytes_per_element)
    options = schedule_options(graph, memory_model, bytes_per_element, max_patches, patches,
                               split_after, report)
    if sram_budget_bytes is None:
        choice = min(options, key=lambda c: (c.peak_bytes, c.macs))
    else:
        fitting = [c for c in options if c.peak_bytes <= sram_budget_bytes]
        if not fitting:
            raise _does_not_fit(graph, min(options, key=lambda c: (c.peak_bytes, c.macs)),
                                sram_budget_bytes)
        choice = min(fitting, key=lambda c: (c.macs, c.peak_bytes))
    return build_option(graph, choice, memory_model, bytes_per_element, report)


def describe_option(graph: Graph, option: ScheduleOption) -> str:
    """'layer-based' or '4x4 patches split after b3.project'."""
    if option.profile is None:
        return "layer-based"
    return (f"{option.patches}x{option.patches} patches split after "
            f"{graph.layers[option.split].name}")


def _does_not_fit(graph: Graph, smallest: ScheduleOption,
                  budget_bytes: int) -> DoesNotFitError:
    peak, layer = smallest.peak_bytes, graph.layers[smallest.peak_index]
    how = describe_option(graph, smallest)
    return DoesNotFitError(
        f"{graph.name} does not fit: smallest peak {peak / 1024:.1f} kB ({peak} bytes, {how}) "
        f"> SRAM budget {budget_bytes / 1024:.1f} kB ({budget_bytes} bytes) at layer "
        f"{layer.name} ({layer.op.value})")


def tiles(graph: Graph, plan: PatchPlan) -> list[list[LayerTile]]:
    """Per patch (row-major), per stage layer: the exact region read, padded and written."""
    if plan.schedule.split_after is None:
        return []
    p = plan.schedule.patches
    stage = graph.layers[: graph.index(plan.schedule.split_after) + 1]
    # Rows and columns are independent: walk each axis once for all p patch rows (columns).
    axes = []
    for layer in stage:
        src = graph.tensor(layer.inputs[0])
        per_axis = []
        for axis, regions, size in ((0, plan.row_regions, src.height),
                                    (1, plan.col_regions, src.width)):
            out = regions[layer.output]
            lo, hi, before, after = _need(layer, axis, np.array([a for a, _ in out]),
                                          np.array([b for _, b in out]), size)
            per_axis.append([((int(lo[i]), int(hi[i])), int(before[i]), int(after[i]), out[i])
                             for i in range(p)])
        axes.append(per_axis)
    result: list[list[LayerTile]] = []
    for i in range(p):
        for j in range(p):
            patch: list[LayerTile] = []
            for layer, (rows, cols) in zip(stage, axes, strict=True):
                (r_in, ptop, pbot, r_out), (c_in, pleft, pright, c_out) = rows[i], cols[j]
                patch.append(LayerTile(layer.name, r_in, c_in, ptop, pleft, pbot, pright,
                                       r_out, c_out))
            result.append(patch)
    return result
