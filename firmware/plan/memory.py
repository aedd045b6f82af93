"""Layer-based memory analysis and static arena planning (DESIGN.md, "Memory accounting").

Every tensor lives from the layer that writes it to the last layer that reads it (the graph
input from before the first layer, the graph output to the end). Tensors that share storage
form one *buffer*, as large as its largest tensor and live over the union of their lifetimes.
The live bytes of a layer are the sum, over buffers, of the largest tensor of the buffer alive
while the layer runs; the peak is their max.

Two memory models decide which tensors share storage:
- `inplace` (TinyEngine, MCUNetV2): a depthwise conv writes over its input when that input dies
  there; a residual block's projection accumulates into the block input's buffer, which the
  add then hands on (the add needs no buffer of its own).
- `separate` (the MCUNet model zoo's "Act" figures): every layer has its own output buffer.
A flatten (RESHAPE) moves no bytes in either model: its output is a view of its input.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from firmware.ir import Graph, Layer, OpKind

# Per output channel of a conv/FC: an int32 bias and the int32 (multiplier, shift) pair of
# per-channel requantization, as the int8 runtime stores them in Flash.
BIAS_BYTES_PER_CHANNEL = 4
REQUANT_BYTES_PER_CHANNEL = 8


class MemoryModel(enum.Enum):
    """How activations share SRAM (see the module docstring)."""

    INPLACE = "inplace"
    SEPARATE = "separate"


@dataclass(frozen=True)
class LayerMemory:
    """Memory and compute of one layer run whole (layer-based inference)."""

    name: str
    op: str
    in_bytes: int
    out_bytes: int
    live_bytes: int  # everything in SRAM while the layer runs, its input and output included
    macs: int
    weights_bytes: int


@dataclass(frozen=True)
class MemoryReport:
    """The layer-based analysis of a graph."""

    layers: tuple[LayerMemory, ...]
    peak_bytes: int
    peak_layer: str
    macs: int
    weights_bytes: int  # int8 weights + int32 biases + per-channel requantization params
    memory_model: MemoryModel
    bytes_per_element: int | float


@dataclass(frozen=True)
class Buffer:
    """Tensors sharing one piece of storage, live from layer `first` to layer `last`.

    Layer indices are positions in `Graph.layers`; the graph input starts at -1 and the graph
    output ends at len(layers).
    """

    tensors: tuple[str, ...]
    first: int
    last: int


@dataclass(frozen=True)
class ArenaPlan:
    """Byte offsets of every tensor in one static arena of `size_bytes`."""

    size_bytes: int
    offsets: Mapping[str, int]
    memory_model: MemoryModel
    bytes_per_element: int | float


def tensor_bytes(numel: int, bytes_per_element: int | float) -> int:
    """Bytes of `numel` elements; sub-byte types (int4: 0.5) round up to whole bytes."""
    return math.ceil(numel * bytes_per_element)


def layer_macs(graph: Graph, layer: Layer) -> int:
    """Multiply-accumulates of a conv or fully connected layer (0 for every other op)."""
    out = graph.tensor(layer.output)
    if layer.op is OpKind.CONV:
        cin = graph.tensor(layer.inputs[0]).channels
        return out.numel * (cin // layer.groups) * layer.kernel[0] * layer.kernel[1]
    if layer.op is OpKind.FULLY_CONNECTED:
        return out.numel * graph.tensor(layer.inputs[0]).numel
    return 0


def layer_weights_bytes(graph: Graph, layer: Layer) -> int:
    """Flash bytes of a layer's int8 weights, int32 biases and requantization params."""
    if layer.op not in (OpKind.CONV, OpKind.FULLY_CONNECTED):
        return 0
    cout = graph.tensor(layer.output).channels
    cin = graph.tensor(layer.inputs[0])
    if layer.op is OpKind.CONV:
        weights = cout * (cin.channels // layer.groups) * layer.kernel[0] * layer.kernel[1]
    else:
        weights = cout * cin.numel
    return weights + cout * (BIAS_BYTES_PER_CHANNEL + REQUANT_BYTES_PER_CHANNEL)


def lifetimes(graph: Graph, stop: int | None = None) -> dict[str, tuple[int, int]]:
    """(first, last) layer index of every tensor used by layers[:stop]."""
    n = len(graph.layers) if stop is None else stop
    span: dict[str, tuple[int, int]] = {graph.input: (-1, -1)}
    for i, layer in enumerate(graph.layers[:n]):
        for name in layer.inputs:
            first, _ = span[name]
            span[name] = (first, i)
        span[layer.output] = (i, i)
    if graph.output in span:
        span[graph.output] = (span[graph.output][0], len(graph.layers))
    return span


def buffers(graph: Graph, memory_model: MemoryModel, stop: int | None = None,
            detached: Collection[str] = ()) -> list[Buffer]:
    """The storage buffers of layers[:stop] under `memory_model`.

    Tensors in `detached` never share storage (the patch scheduler keeps its stage output in a
    buffer of its own).
    """
    span = lifetimes(graph, stop)
    parent = {name: name for name in span}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    def join(child: str, onto: str) -> None:
        if child not in detached and onto not in detached:
            parent[root(child)] = root(onto)

    layers = graph.layers if stop is None else graph.layers[:stop]
    producer_index = {layer.output: i for i, layer in enumerate(layers)}
    for i, layer in enumerate(layers):
        src = layer.inputs[0]
        dies_here = span[src][1] == i
        if layer.op is OpKind.RESHAPE and dies_here:
            join(layer.output, src)
        elif memory_model is MemoryModel.SEPARATE:
            continue
        elif _is_depthwise(graph, layer) and dies_here:
            join(layer.output, src)
        elif layer.op is OpKind.ADD and len(set(layer.inputs)) == 2:
            skip, proj = _residual_pair(graph, layers, layer, i, span, producer_index)
            if skip is not None and proj is not None:
                join(proj, skip)
                join(layer.output, skip)

    groups: dict[str, list[str]] = {}
    for name in span:
        groups.setdefault(root(name), []).append(name)
    return [Buffer(tuple(names), min(span[t][0] for t in names), max(span[t][1] for t in names))
            for names in groups.values()]


def _is_depthwise(graph: Graph, layer: Layer) -> bool:
    if layer.op is not OpKind.CONV or layer.groups == 1:
        return False
    cin = graph.tensor(layer.inputs[0]).channels
    return layer.groups == cin == graph.tensor(layer.output).channels


def _residual_pair(graph: Graph, layers: tuple[Layer, ...] | list[Layer], add: Layer, i: int,
                   span: Mapping[str, tuple[int, int]],
                   producer_index: Mapping[str, int]) -> tuple[str | None, str | None]:
    """(skip, projection) of a residual add whose projection can accumulate into the skip."""
    for skip, proj in (add.inputs, add.inputs[::-1]):
        j = producer_index.get(proj)
        if j is None or layers[j].op is not OpKind.CONV or span[proj][1] != i:
            continue
        if span[skip][1] != i or graph.tensor(skip).shape != graph.tensor(proj).shape:
            continue
        # The skip may be read by others only before the projection starts overwriting it.
        readers = [k for k, layer in enumerate(layers) if skip in layer.inputs and k != i]
        if all(k < j for k in readers):
            return skip, proj
    return None, None


def live_bytes(graph: Graph, bufs: list[Buffer], span: Mapping[str, tuple[int, int]],
               nbytes: Mapping[str, int]) -> list[int]:
    """Bytes in SRAM while each layer runs: per buffer, its largest tensor alive at that layer.

    A buffer shrinks back once its larger tensor dies: after an in-place depthwise conv only
    the (smaller) output remains and the rest of the storage is free again.
    """
    n = len(graph.layers)
    live = [0] * n
    for buf in bufs:
        for i in range(max(buf.first, 0), min(buf.last, n - 1) + 1):
            live[i] += max(nbytes[t] for t in buf.tensors if span[t][0] <= i <= span[t][1])
    return live


def analyze(graph: Graph, memory_model: MemoryModel = MemoryModel.INPLACE,
            bytes_per_element: int | float = 1, layers: slice | None = None) -> MemoryReport:
    """Per-layer memory and MACs of layer-based inference; peak over `layers` (default all)."""
    if bytes_per_element <= 0:
        raise ValueError(f"bytes_per_element must be positive, got {bytes_per_element}")
    nbytes = {name: tensor_bytes(t.numel, bytes_per_element) for name, t in graph.tensors.items()}
    live = live_bytes(graph, buffers(graph, memory_model), lifetimes(graph), nbytes)
    rows: list[LayerMemory] = []
    for i, layer in enumerate(graph.layers):
        rows.append(LayerMemory(
            name=layer.name, op=_op_label(graph, layer),
            in_bytes=sum(nbytes[t] for t in dict.fromkeys(layer.inputs)),
            out_bytes=nbytes[layer.output], live_bytes=live[i],
            macs=layer_macs(graph, layer), weights_bytes=layer_weights_bytes(graph, layer)))
    chosen = tuple(rows[layers]) if layers is not None else tuple(rows)
    if not chosen:
        raise ValueError(f"graph {graph.name}: layer range {layers} selects no layer")
    peak = max(chosen, key=lambda r: r.live_bytes)
    return MemoryReport(
        layers=chosen, peak_bytes=peak.live_bytes, peak_layer=peak.name,
        macs=sum(r.macs for r in chosen), weights_bytes=sum(r.weights_bytes for r in chosen),
        memory_model=memory_model, bytes_per_element=bytes_per_element)


def _op_label(graph: Graph, layer: Layer) -> str:
    """A short human description: 'conv2d 16->96 1x1', 'dwconv2d 96 3x3/2', 'add'."""
    if layer.op is not OpKind.CONV:
        return str(layer.op.value)
    cin = graph.tensor(layer.inputs[0]).channels
    cout = graph.tensor(layer.output).channels
    k = f"{layer.kernel[0]}x{layer.kernel[1]}"
    s = f"/{layer.stride[0]}" if layer.stride != (1, 1) else ""
    if _is_depthwise(graph, layer):
        return f"dwconv2d {cout} {k}{s}"
    g = f" g{layer.groups}" if layer.groups > 1 else ""
    return f"conv2d {cin}->{cout} {k}{s}{g}"


def plan_arena(graph: Graph, memory_model: MemoryModel = MemoryModel.INPLACE,
               bytes_per_element: int | float = 1) -> ArenaPlan:
    """Offsets in one static arena: buffers with overlapping lifetimes never overlap in bytes.

    Greedy best-fit by decreasing size (as TFLite Micro's planner): each buffer goes at the
    lowest offset free over its whole lifetime. The arena is at least the analyzed peak.
    """
    nbytes = {name: tensor_bytes(t.numel, bytes_per_element) for name, t in graph.tensors.items()}
    bufs = buffers(graph, memory_model)
    sizes = [max(nbytes[t] for t in b.tensors) for b in bufs]
    order = sorted(range(len(bufs)), key=lambda k: (-sizes[k], bufs[k].first))
    placed: list[tuple[int, int, Buffer]] = []  # (offset, size, buffer)
    offsets: dict[str, int] = {}
    arena = 0
    for k in order:
        buf, size = bufs[k], sizes[k]
        busy = sorted((off, off + sz) for off, sz, other in placed
                      if other.first <= buf.last and buf.first <= other.last)
        offset = 0
        for start, end in busy:
            if offset + size <= start:
                break
            offset = max(offset, end)
        placed.append((offset, size, buf))
        arena = max(arena, offset + size)
        for t in buf.tensors:
            offsets[t] = offset
    return ArenaPlan(size_bytes=arena, offsets=MappingProxyType(offsets),
                     memory_model=memory_model, bytes_per_element=bytes_per_element)
