"""Sound stack bounds of linked firmware from GCC's call-graph files (-fcallgraph-info=su).

For every translation unit gcc writes a .ci file (VCG text): each function it compiled with
its frame ("N bytes (static)", or "(dynamic,bounded)"), and each call it makes. The bound of
an image is the deepest chain of frames from the reset handler, plus
- the library: functions outside our sources (newlib's memcpy / memset / strlen, libgcc's
  division and 64-bit multiply helpers) are leaves of at most LIBRARY_FRAME_BYTES; any of our
  functions may call one (libgcc calls appear in no call graph), so that much is charged once,
  below the deepest chain;
- one exception: SysTick (or a fault) can arrive at the deepest point; the core then stacks
  8 words plus 4 bytes of alignment (soft-float: no FP context), and the handler runs its own
  chain. Handlers do not nest here (one priority).
Frames an inline asm block extends (ASM_FRAME_BYTES) are added to gcc's figure.
Calls through a function pointer are resolved by INDIRECT_CALLS (the generated model's input
reader, the matmul's column fillers). An unknown indirect call, recursion or an unbounded
dynamic frame raises BuildError: then no sound bound exists.

Measured stack (QEMU, painted RAM) must come out at or below this bound; the SRAM account's
per-core stack figure (`firmware.plan.account.RUNTIME_FOOTPRINTS`) must be at or above it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from firmware.errors import BuildError

RESET_HANDLER = "Reset_Handler"
HANDLERS = ("SysTick_Handler", "HardFault_Handler", "Default_Handler")
# Who calls through a pointer, and every function that pointer can hold.
INDIRECT_CALLS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "tf_matmul_columns": ("tf_fill_im2col", "tf_fill_pixel"),  # tf_fill_fn
    "tf_model_run": ("read_input",),  # tf_input_fn (main.c's reader)
})
# Largest frame of a newlib / libgcc leaf routine the images link (memcpy and memset push 5
# registers: 20 bytes); tests/firmware/toolchain checks the linked routines against it.
LIBRARY_FRAME_BYTES = 32
# Basic exception frame (r0-r3, r12, lr, pc, xPSR) + the 4 bytes the core may add to keep
# the stack 8-byte aligned.
EXCEPTION_FRAME_BYTES = 36
INDIRECT = "__indirect_call"
# Stack an inline asm block takes below its function's frame, which gcc's frame sizes do not
# see: the 1x1 kernels' channel-pair loops keep their loop state there (src/tf_pw_fast.c).
ASM_FRAME_BYTES: Mapping[str, int] = MappingProxyType({
    "tf_pwf_pairs_full": 40, "tf_pwf_pairs_k8": 24, "tf_pwf_pairs_k16": 24,
})

_NODE = re.compile(r'node: \{ title: "([^"]*)" label: "([^"]*)"')
_EDGE = re.compile(r'edge: \{ sourcename: "([^"]*)" targetname: "([^"]*)"')
_FRAME = re.compile(r"\\n(\d+) bytes \(([a-z,]+)\)")


@dataclass(frozen=True)
class CallGraph:
    """Functions (by gcc's title: `name`, or `file:name` for static ones) and their calls."""

    frames: Mapping[str, int]  # title -> frame bytes
    calls: Mapping[str, frozenset[str]]  # title -> titles (or bare names) it calls

    def title(self, name: str) -> str | None:
        """The title of the function called `name` (bare or qualified); None if external."""
        if name in self.frames:
            return name
        found = [t for t in self.frames if t.rsplit(":", 1)[-1] == name]
        if len(found) > 1:
            raise BuildError(f"stack analysis: {len(found)} static functions are called "
                             f"{name!r}; give them distinct names")
        return found[0] if found else None


@dataclass(frozen=True)
class StackBound:
    """A sound bound on an image's stack and the chain that sets it."""

    chain: tuple[tuple[str, int], ...]  # (function, frame bytes), outermost first
    chain_bytes: int
    library_bytes: int
    exception_bytes: int  # exception frame + the deepest handler chain

    @property
    def total_bytes(self) -> int:
        """Chain + library leaf + exception frame and handler."""
        return self.chain_bytes + self.library_bytes + self.exception_bytes

    def describe(self) -> str:
        """'Reset_Handler 8 > main 112 > ... + library 32 + exception 36 = 756 B'."""
        chain = " > ".join(f"{name} {size}" for name, size in self.chain)
        return (f"{chain} + library {self.library_bytes} + exception {self.exception_bytes}"
                f" = {self.total_bytes} B")


def read_callgraph(paths: Iterable[Path]) -> CallGraph:
    """Parse gcc's .ci files into one call graph; BuildError on an unbounded frame."""
    frames: dict[str, int] = {}
    calls: dict[str, set[str]] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            node = _NODE.search(line)
            if node is not None:
                title, label = node.groups()
                frame = _FRAME.search(label)
                if frame is None:
                    continue  # a function declared here, defined elsewhere (or nowhere)
                size, kind = int(frame.group(1)), frame.group(2)
                if kind.startswith("dynamic") and "bounded" not in kind:
                    raise BuildError(f"stack analysis: {title} has an unbounded dynamic frame "
                                     f"({kind}): no sound stack bound")
                frames[title] = size + ASM_FRAME_BYTES.get(title.rsplit(":", 1)[-1], 0)
                continue
            edge = _EDGE.search(line)
            if edge is not None:
                calls.setdefault(edge.group(1), set()).add(edge.group(2))
    return CallGraph(MappingProxyType(frames),
                     MappingProxyType({k: frozenset(v) for k, v in calls.items()}))


def deepest_chain(graph: CallGraph, root: str) -> tuple[tuple[str, int], ...]:
    """The chain of frames from `root` with the largest sum (external callees count 0)."""
    memo: dict[str, tuple[int, tuple[tuple[str, int], ...]]] = {}

    def visit(title: str, path: tuple[str, ...]) -> tuple[int, tuple[tuple[str, int], ...]]:
        if title in memo:
            return memo[title]
        if title in path:
            cycle = " -> ".join((*path[path.index(title):], title))
            raise BuildError(f"stack analysis: recursion {cycle}: no sound stack bound")
        name = title.rsplit(":", 1)[-1]
        callees = set(graph.calls.get(title, ()))
        if INDIRECT in callees:
            if name not in INDIRECT_CALLS:
                raise BuildError(f"stack analysis: {name} calls through a pointer; add its "
                                 f"possible targets to INDIRECT_CALLS in {__name__}")
            callees.discard(INDIRECT)
            callees.update(INDIRECT_CALLS[name])
        best: tuple[int, tuple[tuple[str, int], ...]] = (0, ())
        for callee in sorted(callees):
            target = graph.title(callee)
            if target is None:
                continue  # outside our sources: a library leaf, charged once by the caller
            below = visit(target, (*path, title))
            if below[0] > best[0]:
                best = below
        frame = graph.frames[title]
        memo[title] = (frame + best[0], ((name, frame), *best[1]))
        return memo[title]

    start = graph.title(root)
    if start is None:
        raise BuildError(f"stack analysis: no function {root!r} in the call graph")
    return visit(start, ())[1]


def stack_bound(graph: CallGraph, root: str = RESET_HANDLER,
                handlers: Iterable[str] = HANDLERS) -> StackBound:
    """The bound of everything reachable from `root`, with one exception on top."""
    chain = deepest_chain(graph, root)
    handler_bytes = max((sum(f for _, f in deepest_chain(graph, h)) for h in handlers
                         if graph.title(h) is not None), default=0)
    return StackBound(chain=chain, chain_bytes=sum(f for _, f in chain),
                      library_bytes=LIBRARY_FRAME_BYTES,
                      exception_bytes=EXCEPTION_FRAME_BYTES + handler_bytes)
