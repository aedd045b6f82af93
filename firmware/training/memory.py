"""The training memory model: every named buffer of one training step, and its peak SRAM.

One step at batch size 1 is a program of allocations (`training_program`) over named buffers:

    act:T        int8 activation T of the forward pass, in the inference arena's buffers (the
                 memory model of firmware.plan.memory: under `inplace` a depthwise conv's
                 output shares its input's buffer, a residual projection the block input's)
    saved:T      int8 copy of the first k channels of T that a weight gradient needs (k from
                 the scheme's ratio; all channels for the classifier and for a max pool)
    mask:T       1 bit per element of T: where the int8 output lay strictly inside its clamp
                 (ReLU/ReLU6 and saturation), i.e. where the gradient passes
    grad:T       fp32 gradient of activation T (the backward working set; grad of the graph
                 output holds the fp32 logits first, then d loss / d logits)
    wgrad:P      fp32 gradient of the trained slice of parameter P ("b13.project.weight")
    master:P     fp32 master copy of the trained slice of P (the int8 original stays in Flash)
    momentum:P   SGD momentum of P (only with momentum > 0)

Forward: layer i allocates its output, the masks and saved copies the backward will need,
then frees the inputs it read last. Loss: grad of the output. Backward, from the last layer to
the first one that trains: for each input that needs a gradient, allocate (or accumulate
into) its gradient; then the bias and weight gradients. With operator reordering each
parameter is updated as soon as its gradient exists and the gradient freed at once; without,
all weight gradients live until the update after the backward pass. Gradient accumulation
over several samples keeps every weight gradient for the whole step. Then the layer's output
gradient, mask and last-used saved copies are freed.

The peak of the whole program (`step_peak_bytes`) is what one arena holding everything needs;
`training_bytes` is the peak of the training buffers alone (everything but act:*), the term
the one memory account adds to the inference arena: the forward pass runs in the inference
arena, the training buffers in an arena of their own. `firmware.training.engine` allocates
exactly these buffers, in this order, from an arena that checks them by name.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from firmware.ir import Graph, Layer, OpKind
from firmware.plan.memory import (
    LayerMemory,
    MemoryModel,
    analyze,
    buffers,
    lifetimes,
    tensor_bytes,
)
from firmware.training.positions import positions
from firmware.training.scheme import ClassifierMode, ResolvedScheme, SparseUpdateScheme, resolve

FP32_BYTES = 4


class BufferKind(enum.Enum):
    """What a named buffer holds (module docstring)."""

    ACTIVATION = "act"
    SAVED = "saved"
    MASK = "mask"
    GRADIENT = "grad"
    WEIGHT_GRAD = "wgrad"
    MASTER = "master"
    MOMENTUM = "momentum"


TRAINING_KINDS = frozenset(set(BufferKind) - {BufferKind.ACTIVATION})


class Phase(enum.Enum):
    """Where in the step an allocation happens."""

    SETUP = "setup"  # persistent buffers, allocated once before the first step
    FORWARD = "forward"
    LOSS = "loss"
    BACKWARD = "backward"
    UPDATE = "update"


def buffer_name(kind: BufferKind, what: str) -> str:
    """"saved:b3.dw", "wgrad:b3.project.weight": kind, colon, tensor or parameter."""
    return f"{kind.value}:{what}"


@dataclass(frozen=True)
class Alloc:
    """Allocate `nbytes` for `name`; buffers of one `group` share storage (max of the live)."""

    name: str
    nbytes: int
    kind: BufferKind
    group: str | None = None


@dataclass(frozen=True)
class Free:
    """Release `name`."""

    name: str


@dataclass(frozen=True)
class Rename:
    """Buffer `old` now holds `new` (a flatten's gradient is its input's: no bytes move)."""

    old: str
    new: str


@dataclass(frozen=True)
class Mark:
    """The operations that follow belong to `phase` of `layer` ("" for setup/loss/update)."""

    phase: Phase
    layer: str = ""


Op = Alloc | Free | Rename | Mark


def mask_bytes(numel: int) -> int:
    """Bytes of a 1-bit-per-element mask."""
    return (numel + 7) // 8


def needs_mask(layer: Layer, classifier: str, mode: ClassifierMode) -> bool:
    """Layers whose int8 output is clamped: conv, fully connected (int8 head), add."""
    if layer.op in (OpKind.CONV, OpKind.ADD):
        return True
    return layer.op is OpKind.FULLY_CONNECTED and not (
        layer.name == classifier and mode is ClassifierMode.FP32)


@dataclass(frozen=True)
class StepNeeds:
    """What the backward pass of one scheme on one graph needs (derived once)."""

    resolved: ResolvedScheme
    in_region: frozenset[str]  # layers the backward pass runs through
    grad_tensors: frozenset[str]  # tensors that get a gradient
    saved_channels: Mapping[str, int]  # tensor -> channels kept for the backward pass
    masked: frozenset[str]  # tensors whose clamp mask is kept
    saved_last_user: Mapping[str, str]  # tensor -> layer whose backward frees its saved copy


def step_needs(resolved: ResolvedScheme) -> StepNeeds:
    """The region, gradients, saved copies and masks of `resolved` (module docstring)."""
    graph = resolved.graph
    index = {layer.name: i for i, layer in enumerate(graph.layers)}
    producer = {layer.output: layer for layer in graph.layers}
    reaches = {graph.output}
    for layer in reversed(graph.layers):
        if layer.output in reaches:
            reaches.update(layer.inputs)
    start = resolved.region_start
    region = frozenset(layer.name for layer in graph.layers[start:] if layer.output in reaches)
    grads = frozenset(t for t in reaches
                      if t in producer and producer[t].name in region)
    saved: dict[str, int] = {}
    users: dict[str, list[str]] = {}
    for t in resolved.trainable.values():
        if t.weight_channels:
            src = t.layer.inputs[0]
            if t.layer.op is OpKind.FULLY_CONNECTED:
                channels = graph.tensor(src).channels  # all of the features
            else:
                channels = t.weight_channels
            saved[src] = max(saved.get(src, 0), channels)
            users.setdefault(src, []).append(t.name)
    for name in region:
        layer = graph.layers[index[name]]
        if layer.op is OpKind.MAX_POOL and layer.inputs[0] in grads:
            saved[layer.inputs[0]] = graph.tensor(layer.inputs[0]).channels
            users.setdefault(layer.inputs[0], []).append(name)
    masked = frozenset(graph.layers[index[name]].output for name in region
                       if needs_mask(graph.layers[index[name]], resolved.classifier,
                                     resolved.scheme.classifier))
    last_user = {t: min(names, key=index.__getitem__) for t, names in users.items()}
    return StepNeeds(resolved, region, grads, MappingProxyType(saved), masked,
                     MappingProxyType(last_user))


def saved_bytes(graph: Graph, tensor: str, channels: int) -> int:
    """Bytes of an int8 copy of the first `channels` channels of `tensor`."""
    t = graph.tensor(tensor)
    return channels * t.height * t.width


def param_sizes(resolved: ResolvedScheme) -> list[tuple[str, int]]:
    """(parameter, elements) of every trained slice, in layer order: bias, then weights."""
    out = []
    for name, t in resolved.trainable.items():
        if t.bias:
            out.append((f"{name}.bias", resolved.graph.tensor(t.layer.output).channels))
        if t.weight_channels:
            out.append((f"{name}.weight", math.prod(resolved.weight_shape(name))))
    return out


def activation_groups(graph: Graph, memory_model: MemoryModel) -> dict[str, str]:
    """Tensor -> id of the inference buffer that holds it (shared storage under `inplace`)."""
    groups: dict[str, str] = {}
    for buf in buffers(graph, memory_model):
        for t in buf.tensors:
            groups[t] = buf.tensors[0]
    return groups


def training_program(needs: StepNeeds, memory_model: MemoryModel = MemoryModel.INPLACE,
                     reorder: bool = True, groups: Mapping[str, str] | None = None
                     ) -> list[Op]:
    """The allocations of one training step, in order (module docstring).

    `groups` (activation_groups of the graph) may be passed to skip recomputing them.
    """
    resolved = needs.resolved
    graph, scheme = resolved.graph, resolved.scheme
    ops: list[Op] = [Mark(Phase.SETUP)]
    accumulate = scheme.accumulate_steps > 1
    for param, numel in param_sizes(resolved):
        ops.append(Alloc(buffer_name(BufferKind.MASTER, param), FP32_BYTES * numel,
                         BufferKind.MASTER))
        if scheme.momentum > 0:
            ops.append(Alloc(buffer_name(BufferKind.MOMENTUM, param), FP32_BYTES * numel,
                             BufferKind.MOMENTUM))
        if accumulate:
            ops.append(Alloc(buffer_name(BufferKind.WEIGHT_GRAD, param), FP32_BYTES * numel,
                             BufferKind.WEIGHT_GRAD))
    if groups is None:
        groups = activation_groups(graph, memory_model)
    ops.extend(_forward(needs, groups))
    ops.extend(_loss(needs))
    ops.extend(_backward(needs, reorder and not accumulate, accumulate))
    if not reorder and not accumulate:
        ops.append(Mark(Phase.UPDATE))
        ops.extend(Free(buffer_name(BufferKind.WEIGHT_GRAD, p)) for p, _ in param_sizes(resolved))
    return ops


def _keep(needs: StepNeeds, tensor: str) -> Iterator[Op]:
    graph = needs.resolved.graph
    if tensor in needs.masked:
        yield Alloc(buffer_name(BufferKind.MASK, tensor), mask_bytes(graph.tensor(tensor).numel),
                    BufferKind.MASK)
    if tensor in needs.saved_channels:
        yield Alloc(buffer_name(BufferKind.SAVED, tensor),
                    saved_bytes(graph, tensor, needs.saved_channels[tensor]), BufferKind.SAVED)


def _forward(needs: StepNeeds, groups: Mapping[str, str]) -> Iterator[Op]:
    graph = needs.resolved.graph
    span = lifetimes(graph)
    nbytes = {name: tensor_bytes(t.numel, 1) for name, t in graph.tensors.items()}
    yield Mark(Phase.FORWARD, graph.layers[0].name)
    yield Alloc(buffer_name(BufferKind.ACTIVATION, graph.input), nbytes[graph.input],
                BufferKind.ACTIVATION, groups[graph.input])
    yield from _keep(needs, graph.input)
    for i, layer in enumerate(graph.layers):
        if i:
            yield Mark(Phase.FORWARD, layer.name)
        yield Alloc(buffer_name(BufferKind.ACTIVATION, layer.output), nbytes[layer.output],
                    BufferKind.ACTIVATION, groups[layer.output])
        yield from _keep(needs, layer.output)
        for name in dict.fromkeys(layer.inputs):
            if span[name][1] == i and name != graph.output:
                yield Free(buffer_name(BufferKind.ACTIVATION, name))


def _loss(needs: StepNeeds) -> Iterator[Op]:
    graph = needs.resolved.graph
    yield Mark(Phase.LOSS)
    yield Alloc(buffer_name(BufferKind.GRADIENT, graph.output),
                FP32_BYTES * graph.tensor(graph.output).numel, BufferKind.GRADIENT)
    yield Free(buffer_name(BufferKind.ACTIVATION, graph.output))


def _backward(needs: StepNeeds, free_at_once: bool, accumulate: bool) -> Iterator[Op]:
    resolved = needs.resolved
    graph = resolved.graph
    live: set[str] = {graph.output}
    for i in range(len(graph.layers) - 1, resolved.region_start - 1, -1):
        layer = graph.layers[i]
        if layer.name not in needs.in_region or layer.output not in live:
            continue
        yield Mark(Phase.BACKWARD, layer.name)
        out_grad = buffer_name(BufferKind.GRADIENT, layer.output)
        renamed = False
        for src in dict.fromkeys(layer.inputs):
            if src not in needs.grad_tensors:
                continue
            if layer.op is OpKind.RESHAPE and src not in live:
                yield Rename(out_grad, buffer_name(BufferKind.GRADIENT, src))
                renamed = True
            elif src not in live:
                yield Alloc(buffer_name(BufferKind.GRADIENT, src),
                            FP32_BYTES * graph.tensor(src).numel, BufferKind.GRADIENT)
            live.add(src)
        trained = resolved.trainable.get(layer.name)
        if trained is not None and not accumulate:
            params = []
            if trained.bias:
                params.append((f"{layer.name}.bias", graph.tensor(layer.output).channels))
            if trained.weight_channels:
                params.append((f"{layer.name}.weight",
                               math.prod(resolved.weight_shape(layer.name))))
            for param, numel in params:
                name = buffer_name(BufferKind.WEIGHT_GRAD, param)
                yield Alloc(name, FP32_BYTES * numel, BufferKind.WEIGHT_GRAD)
                if free_at_once:
                    yield Free(name)
        if not renamed:
            yield Free(out_grad)
        live.discard(layer.output)
        if layer.output in needs.masked:
            yield Free(buffer_name(BufferKind.MASK, layer.output))
        for src in dict.fromkeys(layer.inputs):
            if needs.saved_last_user.get(src) == layer.name:
                yield Free(buffer_name(BufferKind.SAVED, src))
    # Gradients that reached tensors made before the region (none for a chain) are dropped.
    for src in sorted(live):
        yield Free(buffer_name(BufferKind.GRADIENT, src))


@dataclass(frozen=True)
class LayerTrainingMemory:
    """One layer's row: bytes live at its forward and backward, and what it keeps or trains."""

    name: str
    op: str
    position: str  # "1.project" or "" for layers without weights
    trains: str  # "W 1/2 + b", "b", "W", "" (frozen)
    forward_bytes: int  # whole-step live bytes (one arena) while its forward runs
    forward_training_bytes: int  # of which training buffers
    kept_bytes: int  # masks and saved copies it leaves for the backward pass
    backward_bytes: int  # whole-step live bytes during its backward (0: not in the region)
    weight_grad_bytes: int  # gradient bytes of its trained parameters
    master_bytes: int  # fp32 master copies (and momentum) of its trained parameters


@dataclass(frozen=True)
class TrainingMemoryReport:
    """The training memory model of one scheme on one graph."""

    graph: str
    scheme: SparseUpdateScheme
    memory_model: MemoryModel
    reorder: bool
    step_peak_bytes: int  # one arena for everything (what the paper's Fig. 10a counts)
    step_peak_at: str  # "backward b13.project"
    training_bytes: int  # peak of the training buffers alone (the account's training term)
    training_peak_at: str
    inference_peak_bytes: int  # layer-based inference peak (the forward pass's arena)
    persistent_bytes: int  # masters, momentum (and accumulated gradients)
    by_kind: Mapping[BufferKind, int]  # each kind's bytes at the training peak
    layers: tuple[LayerTrainingMemory, ...]
    buffers: Mapping[str, int]  # every named buffer's bytes
    program: tuple[Op, ...]

    def to_dict(self) -> dict[str, object]:
        """JSON-ready (no program)."""
        return {
            "graph": self.graph, "scheme": self.scheme.to_dict(),
            "memory_model": self.memory_model.value, "reorder": self.reorder,
            "step_peak_bytes": self.step_peak_bytes, "step_peak_at": self.step_peak_at,
            "training_bytes": self.training_bytes, "training_peak_at": self.training_peak_at,
            "inference_peak_bytes": self.inference_peak_bytes,
            "persistent_bytes": self.persistent_bytes,
            "training_by_kind": {k.value: v for k, v in self.by_kind.items()},
            "layers": [vars(r) for r in self.layers],
        }


@dataclass
class Tracker:
    """Live bytes of a program as it runs: grouped buffers count the max of their live members.

    Also used by the engine's arena, so that the model and the engine count alike.
    """

    live: dict[str, tuple[int, BufferKind, str | None]]
    groups: dict[str, dict[str, int]]
    total: int = 0
    training: int = 0

    @classmethod
    def empty(cls) -> Tracker:
        """A tracker with nothing live."""
        return cls({}, {})

    def _group_size(self, group: str) -> int:
        return max(self.groups.get(group, {}).values(), default=0)

    def alloc(self, name: str, nbytes: int, kind: BufferKind, group: str | None) -> None:
        """Add a buffer (ValueError if the name is live: a bug in the program)."""
        if name in self.live:
            raise ValueError(f"buffer {name} allocated twice")
        self.live[name] = (nbytes, kind, group)
        if group is None:
            self.total += nbytes
        else:
            before = self._group_size(group)
            self.groups.setdefault(group, {})[name] = nbytes
            self.total += self._group_size(group) - before
        if kind is not BufferKind.ACTIVATION:
            self.training += nbytes

    def free(self, name: str) -> None:
        """Release a buffer (its group shrinks to its largest remaining member)."""
        nbytes, kind, group = self.live.pop(name)
        if group is None:
            self.total -= nbytes
        else:
            before = self._group_size(group)
            del self.groups[group][name]
            self.total -= before - self._group_size(group)
        if kind is not BufferKind.ACTIVATION:
            self.training -= nbytes

    def rename(self, old: str, new: str) -> None:
        """Buffer `old` is now called `new`."""
        if new in self.live:
            raise ValueError(f"buffer {new} exists; cannot rename {old} to it")
        entry = self.live.pop(old)
        self.live[new] = entry
        group = entry[2]
        if group is not None:
            self.groups[group][new] = self.groups[group].pop(old)

    def by_kind(self) -> dict[BufferKind, int]:
        """Live bytes of each training kind."""
        out = {k: 0 for k in BufferKind if k in TRAINING_KINDS}
        for nbytes, kind, _ in self.live.values():
            if kind in TRAINING_KINDS:
                out[kind] += nbytes
        return out


def simulate(program: Sequence[Op]) -> tuple[int, str, int, str, dict[BufferKind, int],
                                              dict[tuple[Phase, str], tuple[int, int]]]:
    """Run a program: (step peak, where, training peak, where, kinds at training peak,
    per (phase, layer) the max (total, training) live bytes).

    Buffers allocated in the setup phase persist across steps and are never freed; anything
    else still live at the end is a leak (ValueError)."""
    tracker = Tracker.empty()
    peak = training_peak = 0
    peak_at = training_at = ""
    kinds: dict[BufferKind, int] = {}
    segments: dict[tuple[Phase, str], tuple[int, int]] = {}
    where = (Phase.SETUP, "")
    persistent: set[str] = set()
    for op in program:
        if isinstance(op, Mark):
            where = (op.phase, op.layer)
            continue
        if isinstance(op, Alloc):
            tracker.alloc(op.name, op.nbytes, op.kind, op.group)
            if where[0] is Phase.SETUP:
                persistent.add(op.name)
        elif isinstance(op, Free):
            tracker.free(op.name)
        else:
            tracker.rename(op.old, op.new)
        label = f"{where[0].value} {where[1]}".strip()
        if tracker.total > peak:
            peak, peak_at = tracker.total, label
        if tracker.training > training_peak:
            training_peak, training_at = tracker.training, label
            kinds = tracker.by_kind()
        seen = segments.get(where, (0, 0))
        segments[where] = (max(seen[0], tracker.total), max(seen[1], tracker.training))
    leaked = sorted(set(tracker.live) - persistent)
    if leaked:
        raise ValueError(f"program leaks {leaked[:5]}")
    return peak, peak_at, training_peak, training_at, kinds, segments


class StepModel:
    """The memory model of one graph, for many schemes (the planner's inner loop).

    Caches what does not depend on the scheme: activation buffers and the inference report.
    """

    def __init__(self, graph: Graph, memory_model: MemoryModel = MemoryModel.INPLACE) -> None:
        self.graph = graph
        self.memory_model = memory_model
        self.groups = activation_groups(graph, memory_model)
        self.inference = analyze(graph, memory_model)

    def program(self, scheme: SparseUpdateScheme | ResolvedScheme, reorder: bool = True
                ) -> tuple[ResolvedScheme, list[Op]]:
        """The resolved scheme and its allocation program."""
        resolved = scheme if isinstance(scheme, ResolvedScheme) else resolve(scheme, self.graph)
        return resolved, training_program(step_needs(resolved), self.memory_model, reorder,
                                          self.groups)

    def peaks(self, scheme: SparseUpdateScheme | ResolvedScheme, reorder: bool = True
              ) -> tuple[int, int]:
        """(step peak, training peak) bytes, without the per-layer report."""
        _, program = self.program(scheme, reorder)
        peak, _, training, _, _, _ = simulate(program)
        return peak, training

    def report(self, scheme: SparseUpdateScheme | ResolvedScheme, reorder: bool = True
               ) -> TrainingMemoryReport:
        """The full report (see `training_memory`)."""
        resolved, program = self.program(scheme, reorder)
        peak, peak_at, tpeak, tat, kinds, segments = simulate(program)
        sizes: dict[str, int] = {}
        for op in program:
            if isinstance(op, Alloc):
                sizes[op.name] = op.nbytes
        persistent = sum(op.nbytes for op in program if isinstance(op, Alloc)
                         and op.kind in (BufferKind.MASTER, BufferKind.MOMENTUM))
        if resolved.scheme.accumulate_steps > 1:
            persistent += sum(op.nbytes for op in program
                              if isinstance(op, Alloc) and op.kind is BufferKind.WEIGHT_GRAD)
        rows = _rows(self.graph, resolved, program, segments, self.inference.layers)
        return TrainingMemoryReport(
            graph=self.graph.name, scheme=resolved.scheme, memory_model=self.memory_model,
            reorder=reorder, step_peak_bytes=peak, step_peak_at=peak_at, training_bytes=tpeak,
            training_peak_at=tat, inference_peak_bytes=self.inference.peak_bytes,
            persistent_bytes=persistent, by_kind=MappingProxyType(kinds), layers=tuple(rows),
            buffers=MappingProxyType(sizes), program=tuple(program))


def training_memory(graph: Graph, scheme: SparseUpdateScheme | ResolvedScheme,
                    memory_model: MemoryModel = MemoryModel.INPLACE,
                    reorder: bool = True) -> TrainingMemoryReport:
    """The training memory of `scheme` on `graph` (shapes only: weights are not read)."""
    return StepModel(graph, memory_model).report(scheme, reorder)


def _rows(graph: Graph, resolved: ResolvedScheme, program: Sequence[Op],
          segments: Mapping[tuple[Phase, str], tuple[int, int]],
          inference: Sequence[LayerMemory]) -> list[LayerTrainingMemory]:
    kept: dict[str, int] = {}
    grads: dict[str, int] = {}
    masters: dict[str, int] = {}
    where = (Phase.SETUP, "")
    for op in program:
        if isinstance(op, Mark):
            where = (op.phase, op.layer)
        elif isinstance(op, Alloc):
            if op.kind in (BufferKind.SAVED, BufferKind.MASK) and where[0] is Phase.FORWARD:
                kept[where[1]] = kept.get(where[1], 0) + op.nbytes
            owner = op.name.split(":", 1)[1].rsplit(".", 1)[0]
            if op.kind is BufferKind.WEIGHT_GRAD:
                grads[owner] = grads.get(owner, 0) + op.nbytes
            elif op.kind in (BufferKind.MASTER, BufferKind.MOMENTUM):
                masters[owner] = masters.get(owner, 0) + op.nbytes
    pos = positions(graph)
    rows = []
    for layer, inf in zip(graph.layers, inference, strict=True):
        t = resolved.trainable.get(layer.name)
        trains = ""
        if t is not None:
            parts = []
            if t.weight_channels:
                parts.append("W" if t.weight_ratio == 1.0 else
                             f"W 1/{round(1 / t.weight_ratio)}")
            if t.bias:
                parts.append("b")
            trains = " + ".join(parts)
        fwd = segments.get((Phase.FORWARD, layer.name), (0, 0))
        bwd = segments.get((Phase.BACKWARD, layer.name), (0, 0))
        rows.append(LayerTrainingMemory(
            name=layer.name, op=inf.op,
            position=pos[layer.name].key if layer.name in pos else "", trains=trains,
            forward_bytes=fwd[0], forward_training_bytes=fwd[1],
            kept_bytes=kept.get(layer.name, 0), backward_bytes=bwd[0],
            weight_grad_bytes=grads.get(layer.name, 0), master_bytes=masters.get(layer.name, 0)))
    return rows
