"""model.c / model.h of a QuantizedGraph: Flash parameters, one static arena, the layer calls.

Layer-based execution places every tensor at the planner's offset (`plan_arena`, both memory
models). Under `inplace` a depthwise conv whose output shares its input's offset runs in
place, and a 1x1 projection that shares its residual's offset runs as the fused
`tf_conv2d_1x1_add_s8` (the add layer then emits nothing). Patch-based execution is in
`firmware.codegen.patched`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from firmware.codegen.cformat import c_comment, c_struct
from firmware.codegen.emitters import (
    Call,
    Kind,
    Operand,
    add_fields,
    emit_call,
    kind_of,
)
from firmware.errors import UnsupportedOpError
from firmware.int8.quantize import QuantizedGraph
from firmware.ir import Graph, Layer
from firmware.plan.kernels import NONE_GENERIC, scratch_buffer_bytes
from firmware.plan.memory import MemoryModel, plan_arena

INPUT_IDENT = "model_in"


@dataclass(frozen=True)
class Body:
    """The generated parts of model.c between the parameters and the run function."""

    decls: tuple[str, ...]  # static pointers, dims, windows, tile tables
    statements: tuple[str, ...]  # inside tf_model_run, after the input is read
    read_input: tuple[str, ...]  # statements reading the input (layer-based: all of it)
    arena_bytes: int
    scratch_bytes: int  # tf_scratch as declared (firmware.plan.kernels.scratch_buffer_bytes)
    buffers: Mapping[str, tuple[int, int]]  # named buffer -> (arena offset, bytes)
    param_free: frozenset[str] = frozenset()  # layers whose parameters nothing reads


def used_decls(decls: list[tuple[str, str]], statements: list[str]) -> tuple[str, ...]:
    """The declarations (identifier, text) whose identifier the statements mention."""
    text = "\n".join(statements)
    words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text))
    return tuple(decl for ident, decl in decls if ident in words)


def layer_prefix(index: int) -> str:
    """Identifier prefix of the index-th layer: l3."""
    return f"l{index}"


def tensor_idents(qgraph: QuantizedGraph) -> dict[str, str]:
    """C identifier of every activation tensor: model_in, l3_dw_out, ..."""
    graph = qgraph.graph
    names = {graph.input: INPUT_IDENT}
    for i, layer in enumerate(graph.layers):
        names[layer.output] = f"{layer_prefix(i)}_{kind_of(graph, layer).value}_out"
    return names


def hwc(graph: Graph, tensor: str) -> tuple[int, int, int]:
    """(h, w, c) of a tensor."""
    t = graph.tensor(tensor)
    return (t.height, t.width, t.channels)


def window_fields(layer: Layer, pads: tuple[int, int, int, int] | None = None) -> list[int]:
    """tf_window initialiser: kernel, stride, padding (top, left, bottom, right)."""
    top, left, bottom, right = layer.padding if pads is None else pads
    return [layer.kernel[0], layer.kernel[1], layer.stride[0], layer.stride[1], top, left,
            bottom, right]


def fused_projections(graph: Graph, offsets: Mapping[str, int]) -> dict[str, str]:
    """{projection layer: its add layer} for residual adds planned in place (shared offsets)."""
    fused: dict[str, str] = {}
    for layer in graph.layers:
        if kind_of(graph, layer) is not Kind.ADD or len(set(layer.inputs)) != 2:
            continue
        a, b = layer.inputs
        if not offsets[a] == offsets[b] == offsets[layer.output]:
            continue
        for proj in (a, b):
            producer = graph.producer(proj)
            if (producer is None or graph.consumers(proj) != (layer,)
                    or kind_of(graph, producer) not in (Kind.POINTWISE, Kind.CONV)):
                continue
            if kind_of(graph, producer) is not Kind.POINTWISE:
                raise UnsupportedOpError(
                    f"layer {producer.name}: the inplace memory model accumulates it into the "
                    f"residual of {layer.name}, which needs a 1x1 stride-1 conv; use the "
                    f"separate memory model")
            fused[producer.name] = layer.name
            break
        else:
            raise UnsupportedOpError(f"layer {layer.name}: residual add planned in place but "
                                     "no projection can accumulate into it")
    return fused


@dataclass(frozen=True)
class Emitted:
    """Declarations and statements of a run of layers over whole tensors."""

    decls: list[tuple[str, str]]
    statements: list[str]
    fused_adds: frozenset[str]


def emit_layers(qgraph: QuantizedGraph, graph: Graph, offsets: Mapping[str, int],
                idents: Mapping[str, str], generic: frozenset[str] = NONE_GENERIC) -> Emitted:
    """Whole-tensor calls of `graph`'s layers (all of qgraph's, or the part after a patch
    stage), every tensor at its arena offset (`generic`: the kinds on the generic kernels)."""
    full = qgraph.graph
    fused = fused_projections(graph, offsets)
    fused_adds = set(fused.values())
    decls: list[tuple[str, str]] = []
    for tensor in graph.tensors:
        ident = idents[tensor]
        h, w, c = hwc(graph, tensor)
        decls.append((ident, f"static int8_t *const {ident} = tf_arena + "
                      f"{offsets[tensor]};  /* {c_comment(tensor)}: {h}x{w}x{c} */\n"))
        decls.append((f"{ident}_dims", c_struct("tf_dims", f"{ident}_dims", [h, w, c])))
    statements: list[str] = []
    for layer in graph.layers:
        ql = qgraph.layer(layer.name)
        prefix = layer_prefix(full.index(layer.name))
        kind = kind_of(graph, layer)
        statements.append(f"/* {prefix}: {c_comment(layer.name)} ({kind.value}) */")
        if layer.name in fused_adds:
            statements.append("/* fused into its projection (inplace residual) */")
            continue
        window = ""
        if kind in (Kind.CONV, Kind.DEPTHWISE, Kind.AVG_POOL, Kind.MAX_POOL):
            decls.append((f"{prefix}_win",
                          c_struct("tf_window", f"{prefix}_win", window_fields(layer))))
            window = f"&{prefix}_win"
        operands = tuple(_operand(graph, idents, t) for t in layer.inputs)
        output = _operand(graph, idents, layer.output)
        if kind is Kind.RESHAPE and offsets[layer.inputs[0]] == offsets[layer.output]:
            output = operands[0]  # a view: same bytes, nothing to move
        fused_add = ""
        if layer.name in fused:
            add = graph.layer(fused[layer.name])
            skip = next(t for t in add.inputs if t != layer.output)
            add_ql = qgraph.layer(add.name)
            assert add_ql.add is not None
            fused_add = f"{prefix}_fused_add"
            decls.append((fused_add, c_struct(
                "tf_add_quant", fused_add,
                add_fields(add_ql.add, add_ql.act_min, add_ql.act_max,
                           swap=add.inputs[0] != layer.output))))
            output = _operand(graph, idents, skip)
            statements.append(f"/* accumulates into {idents[skip]}, = "
                              f"{layer_prefix(full.index(add.name))}'s output */")
        call = Call(prefix=prefix, ql=ql, kind=kind, inputs=operands, output=output,
                    window=window, out_channels=graph.tensor(layer.output).channels,
                    fused_add=fused_add, generic=generic)
        statements.extend(emit_call(call))
    return Emitted(decls, statements, frozenset(fused_adds))


def layer_based(qgraph: QuantizedGraph, memory_model: MemoryModel,
                generic: frozenset[str] = NONE_GENERIC) -> Body:
    """Every layer over the whole tensor, tensors at the planner's arena offsets."""
    graph = qgraph.graph
    plan = plan_arena(graph, memory_model)
    idents = tensor_idents(qgraph)
    emitted = emit_layers(qgraph, graph, plan.offsets, idents, generic)
    sizes = {t: graph.tensor(t).numel for t in idents}
    read = f"TF_READ(read_input, ctx, 0, {INPUT_IDENT}, {sizes[graph.input]});"
    return Body(decls=used_decls(emitted.decls, [*emitted.statements, read,
                                                 idents[graph.output]]),
                statements=tuple(emitted.statements), read_input=(read,),
                arena_bytes=plan.size_bytes,
                scratch_bytes=scratch_buffer_bytes(graph, generic=generic),
                buffers={idents[t]: (plan.offsets[t], sizes[t]) for t in idents},
                param_free=emitted.fused_adds)


def _operand(graph: Graph, idents: Mapping[str, str], tensor: str) -> Operand:
    ident = idents[tensor]
    return Operand(ptr=ident, dims=f"&{ident}_dims", numel=str(graph.tensor(tensor).numel))
