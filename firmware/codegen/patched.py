"""Patch-based execution (MCUNetV2): the per-patch loop over `firmware.plan.patch.tiles`.

For each of the p*p patches (row-major) the generated loop reads the input patch from
`read_input` one row at a time (only the patch is ever in SRAM), runs every stage layer on
its tile exactly as the planner describes it ("valid" convs, zero-point padding only where a
tile crosses the image border, via each tile's tf_window), and stores the last layer's piece
into the full stage output with `tf_patch_store_s8`. The rest of the network then runs layer
by layer on the planner's arena.

Arena: the rest is planned by `plan_arena` on the sub-graph after the split (its input is
the full stage output S). The stage's per-patch buffers are planned by `plan_arena` too, on
a stage graph whose tensors have their largest patch region; where a layer reads a strict
sub-region of what its producer computed (the skip input of a residual add), a *view* copy
(`tf_patch_load_s8`) is inserted as its own tensor, before the projection so that, under
`inplace`, the projection can still accumulate into it. The stage buffers go below S when
they fit there, else above it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from firmware.codegen.cformat import c_comment
from firmware.codegen.emitters import (
    Call,
    Kind,
    Operand,
    add_fields,
    emit_call,
    kind_of,
    scratch_bytes,
)
from firmware.codegen.render import (
    Body,
    emit_layers,
    fused_projections,
    hwc,
    layer_prefix,
    tensor_idents,
    used_decls,
    window_fields,
)
from firmware.errors import UnsupportedOpError
from firmware.int8.quantize import QuantizedGraph
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


def _size(region: Region) -> tuple[int, int]:
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
        rows = max(_size(r)[0] for r in per_patch)
        cols = max(_size(r)[1] for r in per_patch)
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


def _tables(stage: Stage, graph: Graph, idents: Mapping[str, str],
            patches: int) -> list[tuple[str, str]]:
    """Per-patch tables: buffer dims, view origins, layer windows, input region."""
    decls: list[tuple[str, str]] = []
    for name, per_patch in stage.regions.items():
        ident = idents[name]
        c = stage.graph.tensor(name).channels
        rows = ", ".join(f"{{{h}, {w}, {c}}}" for h, w in map(_size, per_patch))
        decls.append((f"{ident}_dims", f"static const tf_dims {ident}_dims[{patches}] = "
                      f"{{{rows}}};\n"))
    for view, (src, _) in stage.views.items():
        origins = ", ".join(f"{{{v[0][0] - s[0][0]}, {v[1][0] - s[1][0]}}}"
                            for v, s in zip(stage.regions[view], stage.regions[src],
                                            strict=True))
        decls.append((f"{idents[view]}_origin", f"static const int32_t {idents[view]}_origin"
                       f"[{patches}][2] = {{{origins}}};\n"))
    for name, per_patch_tiles in stage.tiles.items():
        layer = graph.layer(name)
        prefix = layer_prefix(graph.index(name))
        wins = ", ".join("{" + ", ".join(str(v) for v in window_fields(
            layer, (t.pad_top, t.pad_left, t.pad_bottom, t.pad_right))) + "}"
            for t in per_patch_tiles)
        decls.append((f"{prefix}_win", f"static const tf_window {prefix}_win[{patches}] = "
                      f"{{{wins}}};\n"))
    region = ", ".join(f"{{{r[0][0]}, {r[0][1]}, {r[1][0]}, {r[1][1]}}}"
                       for r in stage.regions[graph.input])
    decls.append(("tf_input_region", f"static const int32_t tf_input_region[{patches}][4] = "
                  f"{{{region}}};  /* rows, cols of the input patch */\n"))
    out = stage.regions[stage.graph.output]
    origin = ", ".join(f"{{{r[0][0]}, {r[1][0]}}}" for r in out)
    decls.append(("tf_store_origin", f"static const int32_t tf_store_origin[{patches}][2] = "
                  f"{{{origin}}};  /* where each piece of the stage output goes */\n"))
    return decls


def _patch_operand(ident: str) -> Operand:
    return Operand(ptr=ident, dims=f"&{ident}_dims[p]", numel=f"tf_numel(&{ident}_dims[p])")


def _stage_statements(qgraph: QuantizedGraph, stage: Stage, idents: Mapping[str, str],
                      fused: Mapping[str, str], full_out: str) -> list[str]:
    graph = qgraph.graph
    ih, iw, ic = hwc(graph, graph.input)
    inp = idents[graph.input]
    lines = ["/* the input patch, one row at a time: only the patch is ever in SRAM */",
             "{",
             "    const int32_t *r = tf_input_region[p];",
             "    const int32_t cols = r[3] - r[2];",
             "    for (int32_t y = r[0]; y < r[1]; y++) {",
             f"        TF_READ(read_input, ctx, ((uint32_t)y * {iw}u + (uint32_t)r[2]) * {ic}u,",
             f"                {inp} + (y - r[0]) * cols * {ic}, cols * {ic});",
             "    }", "}"]
    del ih
    fused_adds = set(fused.values())
    for layer in stage.graph.layers:
        if layer.name in stage.views:
            src, consumer = stage.views[layer.name]
            v = idents[layer.name]
            lines.append(f"/* view of {c_comment(src)} for {c_comment(consumer)} */")
            lines.append(f"TF_CHECK(tf_patch_load_s8(&{idents[src]}_dims[p], {idents[src]}, "
                         f"{v}_origin[p][0], {v}_origin[p][1], &{v}_dims[p], {v}, 0));")
            continue
        ql = qgraph.layer(layer.name)
        prefix = layer_prefix(graph.index(layer.name))
        kind = kind_of(graph, graph.layer(layer.name))
        lines.append(f"/* {prefix}: {c_comment(layer.name)} ({kind.value}) */")
        if layer.name in fused_adds:
            lines.append("/* fused into its projection (inplace residual) */")
            continue
        output = _patch_operand(idents[layer.output])
        fused_add = ""
        if layer.name in fused:
            add = stage.graph.layer(fused[layer.name])
            skip = next(t for t in add.inputs if t != layer.output)
            fused_add = f"{prefix}_fused_add"
            output = _patch_operand(idents[skip])
        window = f"&{prefix}_win[p]" if kind in (Kind.CONV, Kind.DEPTHWISE, Kind.AVG_POOL,
                                                  Kind.MAX_POOL) else ""
        call = Call(prefix=prefix, ql=ql, kind=kind,
                    inputs=tuple(_patch_operand(idents[t]) for t in layer.inputs),
                    output=output, window=window,
                    out_channels=stage.graph.tensor(layer.output).channels,
                    fused_add=fused_add)
        lines.extend(emit_call(call))
    piece = idents[stage.graph.output]
    lines.append(f"TF_CHECK(tf_patch_store_s8(&{piece}_dims[p], {piece}, &{full_out}_dims, "
                 f"{full_out}, tf_store_origin[p][0], tf_store_origin[p][1]));")
    return lines


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


def patch_based(qgraph: QuantizedGraph, plan: PatchPlan, memory_model: MemoryModel) -> Body:
    """The per-patch loop for the stage, then the rest layer by layer (module docstring)."""
    graph = qgraph.graph
    assert plan.schedule.split_after is not None
    patches = plan.schedule.patches ** 2
    stage = build_stage(graph, plan)
    rest = rest_graph(graph, plan.schedule.split_after)
    full_out = rest.input
    stage_offsets, rest_offsets, arena_bytes = arena_layout(stage, rest, memory_model)

    base_idents = tensor_idents(qgraph)
    idents = _stage_idents(graph, stage, base_idents)
    decls: list[tuple[str, str]] = []
    for name in stage.regions:
        t = stage.graph.tensor(name)
        decls.append((idents[name], f"static int8_t *const {idents[name]} = tf_arena + "
                      f"{stage_offsets[name]};  /* {c_comment(name)}, per patch: "
                      f"up to {t.height}x{t.width}x{t.channels} */\n"))
    decls.extend(_tables(stage, graph, idents, patches))
    fused = fused_projections(stage.graph, stage_offsets)
    decls.extend(_fused_add_decls(qgraph, stage, fused))
    emitted = emit_layers(qgraph, rest, rest_offsets, base_idents)
    body = _stage_statements(qgraph, stage, idents, fused, base_idents[full_out])
    loop = [f"for (int32_t p = 0; p < {patches}; p++) {{  /* {plan.schedule.patches}x"
            f"{plan.schedule.patches} patches, row-major */",
            *(f"    {line}" for stmt in body for line in stmt.splitlines()), "}"]
    statements = [*loop, *emitted.statements]
    scratch = max([emitted.scratch_bytes, *(
        scratch_bytes(graph, layer, kind_of(graph, layer), in_w=_largest_input(stage, layer).width,
                      in_h=_largest_input(stage, layer).height)
        for layer in graph.layers[: graph.index(plan.schedule.split_after) + 1])])
    all_decls = [*decls, *emitted.decls]
    buffers = {idents[n]: (stage_offsets[n], stage.graph.tensor(n).numel)
               for n in stage.regions}
    buffers.update({base_idents[t]: (rest_offsets[t], rest.tensor(t).numel)
                    for t in rest.tensors})
    return Body(decls=used_decls(all_decls, [*statements, base_idents[graph.output]]),
                statements=tuple(statements), read_input=(), arena_bytes=arena_bytes,
                scratch_bytes=scratch, buffers=buffers,
                param_free=frozenset(fused.values()) | emitted.fused_adds)


def _stage_idents(graph: Graph, stage: Stage, base: Mapping[str, str]) -> dict[str, str]:
    """C names of the per-patch buffers: l3_pw_out_patch, and l5_in0_view for views."""
    idents = dict(base)
    for name in stage.regions:
        if name in stage.views:
            _, consumer = stage.views[name]
            pos = stage.graph.layer(consumer).inputs.index(name)
            idents[name] = f"{layer_prefix(graph.index(consumer))}_in{pos}_view"
        else:
            idents[name] = f"{base[name]}_patch"
    return idents


def _fused_add_decls(qgraph: QuantizedGraph, stage: Stage,
                     fused: Mapping[str, str]) -> list[tuple[str, str]]:
    """tf_add_quant of every projection that accumulates into its residual inside a patch."""
    decls = []
    for proj, add_name in fused.items():
        add = stage.graph.layer(add_name)
        add_ql = qgraph.layer(add_name)
        assert add_ql.add is not None
        prefix = layer_prefix(qgraph.graph.index(proj))
        fields = add_fields(add_ql.add, add_ql.act_min, add_ql.act_max,
                            swap=add.inputs[0] != stage.graph.layer(proj).output)
        decls.append((f"{prefix}_fused_add", f"static const tf_add_quant {prefix}_fused_add = "
                      f"{{{', '.join(str(v) for v in fields)}}};\n"))
    return decls


def _largest_input(stage: Stage, layer: Layer) -> Tensor:
    """The first input of a stage layer at its largest patch region (bounds its scratch)."""
    return stage.graph.tensor(stage.graph.layer(layer.name).inputs[0])
