"""The arena of a schedule: where every activation lives in the one static arena.

Layer-based: `firmware.plan.memory.plan_arena` over the whole graph. Patch-based (MCUNetV2):
the rest (the layers after the split) is planned by `plan_arena` on the sub-graph after the
split (its input is the full stage output S). The stage's per-patch buffers are planned by
`plan_arena` too, on a stage graph whose tensors have their largest patch region; where a
layer reads a strict sub-region of what its producer computed (the skip input of a residual
add), a *view* copy (`tf_patch_load_s8`) is inserted as its own tensor, before the projection
so that, under `inplace`, the projection can still accumulate into it. The stage buffers go
below S when they fit there, else above it, unless one joint plan of stage and rest is
smaller (`arena_layout`).

The code generator places tensors at these offsets and declares an arena of
`arena_bytes(graph, plan)`; the SRAM account (`firmware.plan.account`) charges the same figure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from firmware.errors import UnsupportedOpError
from firmware.ir import Graph, Layer, OpKind, Tensor
from firmware.plan.memory import MemoryModel, plan_arena
from firmware.plan.patch import LayerTile, PatchPlan, tiles

Region = tuple[tuple[int, int], tuple[int, int]]  # (rows, cols), end exclusive


@dataclass(frozen=True)
class Stage:
    """The patch stage as a graph of per-patch buffers, with the region of every buffer."""

    graph: Graph  # stage layers + view copies; tensors at their largest region
    regions: Mapping[str, tuple[Region, ...]]  # buffer -> region per patch
    views: Mapping[str, tuple[str, str]]  # view buffer -> (source buffer, consumer layer)
    tiles: Mapping[str, tuple[LayerTile, ...]]  # stage layer -> tile per patch


def region_size(region: Region) -> tuple[int, int]:
    (r0, r1), (c0, c1) = region
    return r1 - r0, c1 - c0


def _input_regions(graph: Graph, patches: Sequence[Sequence[LayerTile]]) -> tuple[Region, ...]:
    """Per patch, the union of the input regions the graph input's readers need."""
    out = []
    for patch in patches:
        readers = [t for t in patch if graph.input in graph.layer(t.layer).inputs]
        out.append(((min(t.in_rows[0] for t in readers), max(t.in_rows[1] for t in readers)),
                     (min(t.in_cols[0] for t in readers), max(t.in_cols[1] for t in readers))))
    return tuple(out)


def _view_position(graph: Graph, stage_layers: Sequence[Layer], consumer: Layer,
                   source: str) -> int:
    """Where a view of `source` for `consumer` goes: before a projection that will accumulate
    into it (a residual add's other input), else right before the consumer."""
    index = stage_layers.index(consumer)
    if consumer.op is OpKind.ADD:
        for other in consumer.inputs:
            producer = graph.producer(other)
            if (other != source and producer is not None and producer in stage_layers
                    and graph.consumers(other) == (consumer,)):
                return min(index, stage_layers.index(producer))
    return index


def build_stage(graph: Graph, plan: PatchPlan) -> Stage:
    """The stage graph, regions and views of a patch plan."""
    patches = tiles(graph, plan)
    assert plan.schedule.split_after is not None
    stage_layers = list(graph.layers[: graph.index(plan.schedule.split_after) + 1])
    by_layer = {layer.name: tuple(patch[k] for patch in patches)
                for k, layer in enumerate(stage_layers)}
    regions: dict[str, tuple[Region, ...]] = {graph.input: _input_regions(graph, patches)}
    for layer in stage_layers:
        regions[layer.output] = tuple((t.out_rows, t.out_cols) for t in by_layer[layer.name])
    inserts: dict[int, list[Layer]] = {}
    rename: dict[tuple[str, int], str] = {}  # (layer, input position) -> view buffer
    views: dict[str, tuple[str, str]] = {}
    for layer in stage_layers:
        wanted = tuple((t.in_rows, t.in_cols) for t in by_layer[layer.name])
        for pos, src in enumerate(layer.inputs):
            if wanted == regions[src]:
                continue
            view = f"{layer.name}.in{pos}.view"
            regions[view] = wanted
            views[view] = (src, layer.name)
            rename[(layer.name, pos)] = view
            at = _view_position(graph, stage_layers, layer, src)
            inserts.setdefault(at, []).append(
                Layer(name=view, op=OpKind.AVG_POOL, inputs=(src,), output=view))
    layers: list[Layer] = []
    for k, layer in enumerate(stage_layers):
        layers.extend(inserts.get(k, []))
        inputs = tuple(rename.get((layer.name, pos), src)
                       for pos, src in enumerate(layer.inputs))
        layers.append(Layer(name=layer.name, op=layer.op, inputs=inputs, output=layer.output,
                            kernel=layer.kernel, stride=layer.stride, padding=layer.padding,
                            groups=layer.groups, activation=layer.activation,
                            weight=layer.weight, bias=layer.bias))
    tensors = {}
    for name, per_patch in regions.items():
        channels = graph.tensor(views[name][0] if name in views else name).channels
        rows = max(region_size(r)[0] for r in per_patch)
        cols = max(region_size(r)[1] for r in per_patch)
        tensors[name] = Tensor(name, channels, rows, cols)
    stage_graph = Graph(name=f"{graph.name}.stage", input=graph.input,
                        output=stage_layers[-1].output, tensors=MappingProxyType(tensors),
                        layers=tuple(layers), params=graph.params)
    return Stage(graph=stage_graph, regions=MappingProxyType(regions),
                 views=MappingProxyType(views), tiles=MappingProxyType(by_layer))


def rest_graph(graph: Graph, split_after: str) -> Graph:
    """The layers after the split, reading the full stage output as their input."""
    split = graph.index(split_after)
    layers = graph.layers[split + 1:]
    stage_out = graph.layers[split].output
    names = [stage_out, *(layer.output for layer in layers)]  # ordered: output is stable
    for layer in layers:
        if not set(layer.inputs) <= set(names):
            raise UnsupportedOpError(f"layer {layer.name} reads a tensor of the patch stage "
                                     f"other than its output {stage_out}")
    return Graph(name=f"{graph.name}.rest", input=stage_out,
                 output=graph.output if layers else stage_out,
                 tensors=MappingProxyType({n: graph.tensor(n) for n in names}), layers=layers,
                 params=graph.params)



def place_stage(s_offset: int, s_bytes: int, rest_bytes: int,
                stage_bytes: int) -> tuple[int, int, int]:
    """(stage base, rest shift, arena bytes): the smallest of the stage's buffers below the
    stage output S (the rest's arena shifted up as needed) or above it."""
    below_shift = max(0, stage_bytes - s_offset)
    below = (0, below_shift, max(stage_bytes, below_shift + rest_bytes))
    above = (s_offset + s_bytes, 0, max(rest_bytes, s_offset + s_bytes + stage_bytes))
    return min(below, above, key=lambda option: option[2])


def joint_graph(stage: Stage, rest: Graph) -> Graph:
    """Stage and rest as one graph for one arena plan: a pseudo layer first allocates the full
    stage output S (so that it stays live through every patch), then the stage's per-patch
    layers, then the rest reading S."""
    full = f"{rest.input}.full"
    s = rest.tensor(rest.input)
    first = stage.graph.input
    tensors = {**stage.graph.tensors, full: Tensor(full, s.channels, s.height, s.width)}
    tensors.update({n: t for n, t in rest.tensors.items() if n != rest.input})
    layers = [Layer(name=f"{full}.alloc", op=OpKind.AVG_POOL, inputs=(first,), output=full),
              *stage.graph.layers,
              *(dataclasses.replace(layer, inputs=tuple(full if t == rest.input else t
                                                         for t in layer.inputs))
                for layer in rest.layers)]
    return Graph(name=f"{rest.name}.joint", input=first,
                 output=full if rest.output == rest.input else rest.output,
                 tensors=MappingProxyType(tensors), layers=tuple(layers), params=rest.params)


def arena_layout(stage: Stage, rest: Graph, memory_model: MemoryModel
                 ) -> tuple[dict[str, int], dict[str, int], int]:
    """(stage buffer offsets, rest tensor offsets, arena bytes): the smaller of one joint
    `plan_arena` and two separate plans placed side by side (`place_stage`)."""
    rest_plan = plan_arena(rest, memory_model)
    stage_plan = plan_arena(stage.graph, memory_model)
    s_name = rest.input
    base, shift, size = place_stage(rest_plan.offsets[s_name], rest.tensor(s_name).numel,
                                    rest_plan.size_bytes, stage_plan.size_bytes)
    joint = plan_arena(joint_graph(stage, rest), memory_model)
    if joint.size_bytes < size:
        rest_offsets = {t: joint.offsets[t] for t in rest.tensors if t != s_name}
        rest_offsets[s_name] = joint.offsets[f"{s_name}.full"]
        return ({n: joint.offsets[n] for n in stage.graph.tensors}, rest_offsets,
                joint.size_bytes)
    return ({n: base + off for n, off in stage_plan.offsets.items()},
            {t: off + shift for t, off in rest_plan.offsets.items()}, size)


def arena_bytes(graph: Graph, plan: PatchPlan) -> int:
    """Bytes of the static arena a schedule's generated code declares (planner offsets)."""
    if plan.schedule.split_after is None:
        return plan_arena(graph, plan.memory_model, plan.bytes_per_element).size_bytes
    stage = build_stage(graph, plan)
    rest = rest_graph(graph, plan.schedule.split_after)
    return arena_layout(stage, rest, plan.memory_model)[2]
