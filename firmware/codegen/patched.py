"""Patch-based execution (MCUNetV2): the per-patch loop over `firmware.plan.patch.tiles`.

For each of the p*p patches (row-major) the generated loop reads the input patch from
`read_input` one row at a time (only the patch is ever in SRAM), runs every stage layer on
its tile exactly as the planner describes it ("valid" convs, zero-point padding only where a
tile crosses the image border, via each tile's tf_window), and stores the last layer's piece
into the full stage output with `tf_patch_store_s8`. The rest of the network then runs layer
by layer on the planner's arena.

The stage graph (per-patch buffers, their regions, the view copies a residual's skip input
needs) and every tensor's arena offset come from `firmware.plan.arena`, and the scratch
buffer's size from `firmware.plan.kernels`: the same figures the SRAM account charges.
"""

from __future__ import annotations

from collections.abc import Mapping

from firmware.codegen.cformat import c_comment
from firmware.codegen.emitters import (
    Call,
    Kind,
    Operand,
    add_fields,
    emit_call,
    kind_of,
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
from firmware.int8.quantize import QuantizedGraph
from firmware.ir import Graph
from firmware.plan.arena import Stage, arena_layout, build_stage, region_size, rest_graph
from firmware.plan.kernels import NONE_GENERIC, scratch_buffer_bytes
from firmware.plan.memory import MemoryModel
from firmware.plan.patch import PatchPlan


def _tables(stage: Stage, graph: Graph, idents: Mapping[str, str],
            patches: int) -> list[tuple[str, str]]:
    """Per-patch tables: buffer dims, view origins, layer windows, input region."""
    decls: list[tuple[str, str]] = []
    for name, per_patch in stage.regions.items():
        ident = idents[name]
        c = stage.graph.tensor(name).channels
        rows = ", ".join(f"{{{h}, {w}, {c}}}" for h, w in map(region_size, per_patch))
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
                      fused: Mapping[str, str], full_out: str,
                      generic: frozenset[str] = NONE_GENERIC) -> list[str]:
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
                    fused_add=fused_add, generic=generic)
        lines.extend(emit_call(call))
    piece = idents[stage.graph.output]
    lines.append(f"TF_CHECK(tf_patch_store_s8(&{piece}_dims[p], {piece}, &{full_out}_dims, "
                 f"{full_out}, tf_store_origin[p][0], tf_store_origin[p][1]));")
    return lines


def patch_based(qgraph: QuantizedGraph, plan: PatchPlan, memory_model: MemoryModel,
                generic: frozenset[str] = NONE_GENERIC) -> Body:
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
    emitted = emit_layers(qgraph, rest, rest_offsets, base_idents, generic)
    body = _stage_statements(qgraph, stage, idents, fused, base_idents[full_out], generic)
    loop = [f"for (int32_t p = 0; p < {patches}; p++) {{  /* {plan.schedule.patches}x"
            f"{plan.schedule.patches} patches, row-major */",
            *(f"    {line}" for stmt in body for line in stmt.splitlines()), "}"]
    statements = [*loop, *emitted.statements]
    scratch = scratch_buffer_bytes(graph, plan, generic)
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

