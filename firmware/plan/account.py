"""The SRAM account: what a device needs to run a model under a schedule (DESIGN, "One account").

    total = arena + scratch + static + stack (+ training, when personalization is on)

- arena: the static activation arena the generated code declares, laid out by the planner
  (`firmware.plan.arena.arena_bytes`; at least the planner's peak);
- scratch: the kernels' scratch buffer, the largest `get_buffer_size` over the schedule
  (`firmware.plan.kernels.scratch_buffer_bytes`);
- static: .data and .bss besides the arena and scratch (the runtime's state and the model's
  output buffer) and the alignment the linker adds between these sections;
- stack: a sound bound on the deepest stack on the core (`RUNTIME_FOOTPRINTS`): start-up,
  main, tf_model_run and the deepest kernel chain from gcc's call graph, a library leaf and
  one exception frame (`firmware.toolchain.stack`); every model build checks its own image
  against this figure and the linker reserves exactly this much;
- training: the on-device training step's memory (the sparse-update issue supplies it).

`plan`, `search`, the compile report and the campaign's fit check all use this one figure,
and the linker script reserves the same parts, so a schedule that fits the account links at
the device's SRAM. Public API: `sram_account` (the account of one schedule), `fit_schedule`
(the fewest-MAC schedule whose account fits a device, or `SramDoesNotFitError` naming the
numbers), `runtime_footprint` (per-core static and stack figures). kB = 1024 bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from firmware.errors import DoesNotFitError
from firmware.ir import Graph
from firmware.plan.arena import arena_bytes
from firmware.plan.kernels import NONE_GENERIC, scratch_buffer_bytes
from firmware.plan.memory import MemoryModel, analyze
from firmware.plan.patch import (
    PatchPlan,
    build_option,
    describe_option,
    schedule_options,
)
from firmware.targets import KIB, Cpu

# .noinit (arena, scratch) and the stack reserve start 8-byte aligned (AAPCS stack alignment,
# TF_NOINIT's aligned(8)).
SECTION_ALIGN = 8


@dataclass(frozen=True)
class RuntimeFootprint:
    """What the runtime and the firmware's main need on one core, besides the model's buffers.

    `static_bytes`: .data + .bss of the runtime and main.c, the output buffer not included
    (it is the model's: `output_buffer_bytes`). `stack_bytes`: a sound bound on the stack of
    any generated model on this core (see the module docstring). `measured` is False where no
    toolchain here builds for the core and the figures are an estimate.
    """

    static_bytes: int
    stack_bytes: int
    measured: bool = True


# Measured from linked images by `python -m bench.runtime_footprint` (arm-none-eabi-gcc 12.2,
# -O2, SMLAD and plain-C paths, layer- and patch-based models): the largest static base and
# the largest call-graph stack bound, plus STACK_HEADROOM_BYTES for tf_model_run frames the
# probes did not show. The bench prints this table; tests check builds against it.
STACK_HEADROOM_BYTES = 64
RUNTIME_FOOTPRINTS: Mapping[Cpu, RuntimeFootprint] = MappingProxyType({
    Cpu.CORTEX_M0PLUS: RuntimeFootprint(static_bytes=4, stack_bytes=968),
    Cpu.CORTEX_M3: RuntimeFootprint(static_bytes=4, stack_bytes=944),
    Cpu.CORTEX_M4: RuntimeFootprint(static_bytes=4, stack_bytes=968),
    Cpu.CORTEX_M7: RuntimeFootprint(static_bytes=4, stack_bytes=952),
    Cpu.CORTEX_M33: RuntimeFootprint(static_bytes=4, stack_bytes=960),
    # No Xtensa toolchain here: twice the largest Arm figure (windowed-ABI frames are larger).
    Cpu.XTENSA_LX7: RuntimeFootprint(static_bytes=4, stack_bytes=2 * 968, measured=False),
})


def runtime_footprint(cpu: Cpu) -> RuntimeFootprint:
    """The runtime's static data and stack bound on `cpu`."""
    return RUNTIME_FOOTPRINTS[cpu]


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class HasGraph(Protocol):
    """Anything that carries an IR graph (a `firmware.int8.quantize.QuantizedGraph`)."""

    @property
    def graph(self) -> Graph: ...


def _graph(model: Graph | HasGraph) -> Graph:
    return model if isinstance(model, Graph) else model.graph


@dataclass(frozen=True)
class SramAccount:
    """SRAM a device needs for one model and schedule, by part (bytes)."""

    arena_bytes: int
    scratch_bytes: int
    static_bytes: int
    stack_bytes: int
    training_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        """Everything the device's SRAM must hold."""
        return (self.arena_bytes + self.scratch_bytes + self.static_bytes + self.stack_bytes
                + self.training_bytes)

    def fits(self, sram_bytes: int) -> bool:
        """True when the total fits `sram_bytes`."""
        return self.total_bytes <= sram_bytes

    def to_dict(self) -> dict[str, int]:
        """JSON-ready: every part and the total."""
        return {"arena_bytes": self.arena_bytes, "scratch_bytes": self.scratch_bytes,
                "static_bytes": self.static_bytes, "stack_bytes": self.stack_bytes,
                "training_bytes": self.training_bytes, "total_bytes": self.total_bytes}

    def describe(self) -> str:
        """'arena 12.0 kB + scratch 1.3 kB + static 0.1 kB + stack 0.9 kB = 14.3 kB'."""
        parts = [("arena", self.arena_bytes), ("scratch", self.scratch_bytes),
                 ("static", self.static_bytes), ("stack", self.stack_bytes)]
        if self.training_bytes:
            parts.append(("training", self.training_bytes))
        return (" + ".join(f"{name} {n / KIB:,.1f} kB" for name, n in parts)
                + f" = {self.total_bytes / KIB:,.1f} kB")


def output_buffer_bytes(graph: Graph) -> int:
    """main.c's buffer for one inference's output (int8, word-aligned in .bss)."""
    return _round_up(graph.tensor(graph.output).numel, 4)


def static_bytes(graph: Graph, cpu: Cpu, arena: int, scratch: int,
                 extra_static_bytes: int = 0) -> int:
    """.data + .bss (runtime state + output buffer + `extra_static_bytes`, e.g. a weights
    overlay's pointers) and the alignment around arena/scratch."""
    data = _round_up(runtime_footprint(cpu).static_bytes + output_buffer_bytes(graph)
                     + extra_static_bytes, SECTION_ALIGN)
    scratch_array = _round_up(scratch, 2)  # tf_scratch is an int16 array
    return (data + (_round_up(arena, SECTION_ALIGN) - arena)
            + (_round_up(scratch_array, SECTION_ALIGN) - scratch))


def sram_account(model: Graph | HasGraph, plan: PatchPlan, cpu: Cpu,
                 training_bytes: int = 0, extra_static_bytes: int = 0,
                 generic: frozenset[str] = NONE_GENERIC) -> SramAccount:
    """The account of running `model` (a graph or a quantized graph) under `plan` on `cpu`
    (`generic`: the kinds of layer run by the generic kernels, whose scratch is never
    larger)."""
    graph = _graph(model)
    if plan.bytes_per_element != 1:
        raise ValueError(f"the SRAM account is for int8 activations, the plan has "
                         f"{plan.bytes_per_element} bytes per element")
    arena = arena_bytes(graph, plan)
    scratch = scratch_buffer_bytes(graph, plan, generic)
    return SramAccount(arena_bytes=arena, scratch_bytes=scratch,
                       static_bytes=static_bytes(graph, cpu, arena, scratch,
                                                 extra_static_bytes),
                       stack_bytes=runtime_footprint(cpu).stack_bytes,
                       training_bytes=training_bytes)


@dataclass(frozen=True)
class Fit:
    """A schedule and its account, and the kinds of layer it runs on the generic kernels
    (firmware.plan.kernels.SPECIALIZED_KINDS; less code, as many bytes of scratch or fewer)."""

    plan: PatchPlan
    account: SramAccount
    generic: frozenset[str] = NONE_GENERIC


class SramDoesNotFitError(DoesNotFitError):
    """No schedule's account fits: `needed` is the smallest one's (`plan` its schedule)."""

    def __init__(self, message: str, needed: SramAccount, plan: PatchPlan,
                 sram_bytes: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.plan = plan
        self.sram_bytes = sram_bytes


def fit_schedule(model: Graph | HasGraph, sram_bytes: int, cpu: Cpu,
                 memory_model: MemoryModel = MemoryModel.INPLACE, training_bytes: int = 0,
                 patches: int | None = None, split_after: str | None = None,
                 max_patches: int = 8, extra_static_bytes: int = 0) -> Fit:
    """The schedule with the fewest MACs whose account fits `sram_bytes` on `cpu`.

    Candidates are `firmware.plan.patch.schedule_options` (layer-based and every split and
    p up to `max_patches`; `patches` / `split_after` pin them). Raises SramDoesNotFitError
    naming the smallest account (that of the lowest-peak schedule) when none fits.
    """
    graph = _graph(model)
    report = analyze(graph, memory_model)
    if patches is None and split_after is None:
        # Layer-based inference recomputes nothing: when it fits, no schedule has fewer MACs,
        # so the sweep over splits and patch counts (most of the time) is skipped.
        whole = build_option(graph, schedule_options(graph, memory_model, 1, patches=1,
                                                     report=report)[0], memory_model,
                             report=report)
        account = sram_account(graph, whole, cpu, training_bytes, extra_static_bytes)
        if account.fits(sram_bytes):
            return Fit(whole, account)
    options = schedule_options(graph, memory_model, 1, max_patches, patches, split_after,
                               report)
    runtime = runtime_footprint(cpu)
    # The arena holds at least the peak, and static is at least the data sections: a cheap
    # lower bound that skips building plans that cannot fit.
    floor = (runtime.stack_bytes + training_bytes
             + _round_up(runtime.static_bytes + output_buffer_bytes(graph) + extra_static_bytes,
                         SECTION_ALIGN))
    for option in sorted(options, key=lambda o: (o.macs, o.peak_bytes)):
        if option.peak_bytes + floor > sram_bytes:
            continue
        plan = build_option(graph, option, memory_model, report=report)
        account = sram_account(graph, plan, cpu, training_bytes, extra_static_bytes)
        if account.fits(sram_bytes):
            return Fit(plan, account)
    smallest = min(options, key=lambda o: (o.peak_bytes, o.macs))
    plan = build_option(graph, smallest, memory_model, report=report)
    needed = sram_account(graph, plan, cpu, training_bytes, extra_static_bytes)
    layer = graph.layer(plan.peak_layer)
    raise SramDoesNotFitError(
        f"{graph.name} does not fit: needs {needed.total_bytes / KIB:,.1f} kB SRAM "
        f"({needed.total_bytes} bytes: {needed.describe()}; {describe_option(graph, smallest)},"
        f" peak at layer {layer.name} ({layer.op.value})), device has "
        f"{sram_bytes / KIB:,.1f} kB ({sram_bytes} bytes) on {cpu.value}",
        needed, plan, sram_bytes)
