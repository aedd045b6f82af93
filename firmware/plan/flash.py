"""The Flash account: what one OTA slot must hold for a model under a schedule (DESIGN,
"Flash = weights + biases + requantization params + code").

    total = params + runtime code + generated code

- params: the int8 weights, int32 biases and per-channel multipliers and shifts
  (`firmware.plan.memory.MemoryReport.weights_bytes`; the generated arrays are exactly these);
- runtime code: the runtime's functions and constants the image links, from a table measured
  on the cross-compiled objects (`code_sizes.json`, written by `python -m bench.code_size`):
  every section of the runtime's objects (-ffunction-sections -fdata-sections, the sizes
  arm-none-eabi-size reports) and of the C library members the runtime pulls in, each with
  the sections it references, so that a model is charged the union of what its kernels reach
  (shared helpers once), as `--gc-sections` links it;
- generated code: model.c and main.c besides the params (tf_model_run, descriptors: tf_dims,
  tf_window, quantization structs, the patch stage's per-patch tables), a linear function of
  the kernel calls and the descriptor bytes fitted on linked probe images by the same script
  and raised by its largest miss + 128 B, so that the account is not below a linked image.

`plan`, `search` and the compiler's fit check use `flash_account`; the compile report puts it
beside the linked image (`arm-none-eabi-size`), and a test checks predicted >= linked and
within 2 % of it. Images with a weights overlay (personalization) add the code that reads it
(tf_model_use_overlay) and reserve its region at the end of the slot
(`firmware.plan.overlay`): the account charges both, so a personalized pick fits its slot.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from types import MappingProxyType
from typing import Any

from firmware.errors import FirmwareError
from firmware.ir import Graph, Layer, OpKind
from firmware.plan.arena import arena_layout, build_stage, rest_graph
from firmware.plan.kernels import NONE_GENERIC, fast_depthwise, is_depthwise, rgb_conv
from firmware.plan.memory import MemoryModel, analyze, plan_arena
from firmware.plan.overlay import graph_overlay_layout
from firmware.plan.patch import PatchPlan
from firmware.targets import KIB, Cpu

TABLE_FILE = "code_sizes.json"
TABLE_FORMAT = 1

# C struct sizes of the descriptors the code generator declares (tinyfleet_nn.h: int32 fields).
DIMS_BYTES = 12  # tf_dims {h, w, c}
WINDOW_BYTES = 32  # tf_window: kernel, stride, padding (4)
CONV_QUANT_BYTES = 24  # tf_conv_quant: 4 int32 + 2 pointers
ADD_QUANT_BYTES = 48  # tf_add_quant: 12 int32
INPUT_REGION_BYTES = 16  # per patch: rows, cols of the input patch
ORIGIN_BYTES = 8  # per patch: where a piece goes (stage output) or comes from (a view)

# Arguments of each kernel call (code per call grows with them).
_ARGS = {"tf_conv2d_fast_s8": 9, "tf_conv2d_rgb_s8": 9, "tf_conv2d_1x1_fast_s8": 8,
         "tf_conv2d_1x1_add_fast_s8": 9, "tf_conv2d_s8": 9, "tf_conv2d_1x1_s8": 8,
         "tf_conv2d_1x1_add_s8": 9, "tf_depthwise_conv2d_s8": 9,
         "tf_fully_connected_s8": 8, "tf_add_s8": 5, "tf_avg_pool_s8": 9, "tf_max_pool_s8": 7,
         "tf_global_avg_pool_s8": 5, "memmove": 3, "tf_patch_store_s8": 6,
         "tf_patch_load_s8": 7}
_DW_ARGS = 9
FEATURES = ("const", "calls", "call_args", "stage", "stage_calls", "descriptor_bytes")


class CodeSizeTableError(FirmwareError):
    """The code-size table has no entry for a core, or names a symbol it does not hold."""


@dataclass(frozen=True)
class CodeUse:
    """What a model's generated code uses: runtime entry points and the generated part's
    features (see FEATURES)."""

    entries: frozenset[str]
    features: Mapping[str, int]


@dataclass(frozen=True)
class FlashAccount:
    """Flash one OTA slot must hold for one model and schedule, by part (bytes)."""

    params_bytes: int
    runtime_code_bytes: int
    generated_bytes: int
    overlay_bytes: int = 0  # personalization: the overlay region at the slot's end

    @property
    def code_bytes(self) -> int:
        """Everything but the params: runtime and generated code and descriptors."""
        return self.runtime_code_bytes + self.generated_bytes

    @property
    def image_bytes(self) -> int:
        """What the linked image holds: params and code (the overlay region is not in it)."""
        return self.params_bytes + self.code_bytes

    @property
    def total_bytes(self) -> int:
        """What the slot must hold: the image and the overlay region."""
        return self.image_bytes + self.overlay_bytes

    def fits(self, slot_bytes: int) -> bool:
        """True when the total fits `slot_bytes`."""
        return self.total_bytes <= slot_bytes

    def to_dict(self) -> dict[str, int]:
        """JSON-ready: every part, the code and the total."""
        return {"params_bytes": self.params_bytes,
                "runtime_code_bytes": self.runtime_code_bytes,
                "generated_bytes": self.generated_bytes, "code_bytes": self.code_bytes,
                "overlay_bytes": self.overlay_bytes, "image_bytes": self.image_bytes,
                "total_bytes": self.total_bytes}

    def describe(self) -> str:
        """'params 468.2 kB + runtime code 19.2 kB + generated 7.0 kB = 494.5 kB'."""
        parts = [("params", self.params_bytes), ("runtime code", self.runtime_code_bytes),
                 ("generated", self.generated_bytes)]
        if self.overlay_bytes:
            parts.append(("overlay region", self.overlay_bytes))
        return (" + ".join(f"{name} {n / KIB:,.1f} kB" for name, n in parts)
                + f" = {self.total_bytes / KIB:,.1f} kB")


@dataclass(frozen=True)
class CodeSizeTable:
    """One core's (and DSP setting's) measured table: sections, references, the fit."""

    sections: Mapping[str, int]  # section key -> bytes (size rounded up to its alignment)
    refs: Mapping[str, tuple[str, ...]]  # section key -> section keys it references
    symbols: Mapping[str, str]  # global symbol -> its section key
    base: tuple[str, ...]  # symbols every image links (start-up, main.c's calls)
    coefficients: Mapping[str, float]  # generated bytes = sum(coef * feature)

    def closure_bytes(self, symbols: Iterable[str]) -> int:
        """Bytes of every section reachable from `symbols` and the base, each once."""
        seen: set[str] = set()
        todo = []
        for name in (*self.base, *symbols):
            if name not in self.symbols:
                raise CodeSizeTableError(f"the code-size table has no symbol {name!r}: "
                                         "refresh it (python -m bench.code_size --write)")
            todo.append(self.symbols[name])
        while todo:
            key = todo.pop()
            if key in seen:
                continue
            seen.add(key)
            todo.extend(self.refs.get(key, ()))
        return sum(self.sections[k] for k in seen)

    def generated_bytes(self, features: Mapping[str, int]) -> int:
        """The fitted generated-code bytes for `features` (rounded up)."""
        total = sum(self.coefficients[name] * features.get(name, 0) for name in FEATURES)
        return max(0, -int(-total // 1))


def variant_key(cpu: Cpu, dsp: bool) -> str:
    """'cortex-m4+dsp' / 'cortex-m4': the table's key for a core and DSP setting."""
    return f"{cpu.value}+dsp" if dsp and cpu.has_dsp else cpu.value


@cache
def _tables() -> Mapping[str, Any]:
    text = resources.files("firmware.plan").joinpath(TABLE_FILE).read_text()
    doc = json.loads(text)
    if doc.get("format") != TABLE_FORMAT:
        raise CodeSizeTableError(f"{TABLE_FILE}: format {doc.get('format')}, expected "
                                 f"{TABLE_FORMAT}")
    return MappingProxyType(doc)


@cache
def code_size_table(cpu: Cpu, dsp: bool = True) -> CodeSizeTable:
    """The measured table of `cpu` (the DSP build where the core has one and `dsp`).

    Cores no toolchain here builds for (Xtensa) take the Cortex-M0+ table (the largest code:
    Thumb-1), an estimate.
    """
    doc = _tables()
    key = variant_key(cpu, dsp)
    if key not in doc["variants"]:
        key = variant_key(Cpu.CORTEX_M0PLUS, False)
    v = doc["variants"][key]
    return CodeSizeTable(
        sections=MappingProxyType(dict(v["sections"])),
        refs=MappingProxyType({k: tuple(r) for k, r in v["refs"].items()}),
        symbols=MappingProxyType(dict(v["symbols"])), base=tuple(v["base"]),
        coefficients=MappingProxyType(dict(v["coefficients"])))


def _weighted(layer: Layer) -> bool:
    return layer.op in (OpKind.CONV, OpKind.FULLY_CONNECTED)


def _windowed(graph: Graph, layer: Layer) -> bool:
    if layer.op in (OpKind.AVG_POOL, OpKind.MAX_POOL):
        return True
    return layer.op is OpKind.CONV and not _pointwise(graph, layer)


def _pointwise(graph: Graph, layer: Layer) -> bool:
    return (layer.op is OpKind.CONV and not is_depthwise(graph, layer)
            and layer.kernel == (1, 1) and layer.stride == (1, 1)
            and layer.padding == (0, 0, 0, 0))


def _fused(graph: Graph, offsets: Mapping[str, int]) -> dict[str, str]:
    """{projection: add} for residual adds planned in place (firmware.codegen.render's rule:
    the add's inputs and output share one offset; the projection is a 1x1 conv)."""
    fused = {}
    for layer in graph.layers:
        if layer.op is not OpKind.ADD or len(set(layer.inputs)) != 2:
            continue
        if not offsets[layer.inputs[0]] == offsets[layer.inputs[1]] == offsets[layer.output]:
            continue
        for proj in layer.inputs:
            producer = graph.producer(proj)
            if (producer is not None and graph.consumers(proj) == (layer,)
                    and _pointwise(graph, producer)):
                fused[producer.name] = layer.name
                break
    return fused


def _entry(graph: Graph, layer: Layer, fused_add: bool, offsets: Mapping[str, int],
           generic: frozenset[str] = NONE_GENERIC) -> str:
    """The runtime function one layer calls (firmware.codegen.emitters), '' for none;
    `generic`: the kinds of layer ("conv", "dw", "pw") run by the generic kernels."""
    if layer.op is OpKind.CONV:
        kind = ("dw" if is_depthwise(graph, layer) else
                "pw" if _pointwise(graph, layer) else "conv")
        if kind in generic:
            return {"dw": "tf_depthwise_conv2d_s8", "conv": "tf_conv2d_s8",
                    "pw": "tf_conv2d_1x1_add_s8" if fused_add else "tf_conv2d_1x1_s8"}[kind]
        if is_depthwise(graph, layer):
            if fast_depthwise(layer.kernel, layer.stride):
                return f"tf_depthwise_conv2d_{layer.kernel[0]}x{layer.kernel[0]}s" \
                       f"{layer.stride[0]}_s8"
            return "tf_depthwise_conv2d_s8"
        if _pointwise(graph, layer):
            return "tf_conv2d_1x1_add_fast_s8" if fused_add else "tf_conv2d_1x1_fast_s8"
        if rgb_conv(graph.tensor(layer.inputs[0]).channels, layer.kernel):
            return "tf_conv2d_rgb_s8"
        return "tf_conv2d_fast_s8"
    if layer.op is OpKind.RESHAPE:
        return "" if offsets[layer.inputs[0]] == offsets[layer.output] else "memmove"
    return {OpKind.FULLY_CONNECTED: "tf_fully_connected_s8", OpKind.ADD: "tf_add_s8",
            OpKind.AVG_POOL: "tf_avg_pool_s8", OpKind.MAX_POOL: "tf_max_pool_s8",
            OpKind.GLOBAL_AVG_POOL: "tf_global_avg_pool_s8"}[layer.op]


def _calls(graph: Graph, offsets: Mapping[str, int], copies: int = 1,
           views: Collection[str] = (),
           generic: frozenset[str] = NONE_GENERIC) -> tuple[list[str], int]:
    """(entry per call, descriptor bytes) of `graph`'s layers at `offsets`; the windows and
    views of a patch stage's body are declared `copies` times (once per patch), and its
    `views` read a piece of the stage's input (tf_patch_load_s8)."""
    fused = _fused(graph, offsets)
    fused_adds = set(fused.values())
    entries = []
    descriptors = 0
    for layer in graph.layers:
        if layer.name in views:
            entries.append("tf_patch_load_s8")
            descriptors += copies * ORIGIN_BYTES
            continue
        if _weighted(layer):
            descriptors += CONV_QUANT_BYTES
        if layer.op is OpKind.ADD:
            descriptors += ADD_QUANT_BYTES
        if layer.name in fused_adds:
            continue
        if _windowed(graph, layer) or is_depthwise(graph, layer):
            descriptors += copies * WINDOW_BYTES
        entry = _entry(graph, layer, layer.name in fused, offsets, generic)
        if entry:
            entries.append(entry)
    return entries, descriptors


def _args(entry: str) -> int:
    return _ARGS.get(entry, _DW_ARGS)


def code_use(graph: Graph, plan: PatchPlan | None = None,
             memory_model: MemoryModel | None = None,
             generic: frozenset[str] = NONE_GENERIC) -> CodeUse:
    """The runtime entry points and generated-code features of `graph` under `plan`
    (None: layer-based under `memory_model`, default INPLACE), the kinds of layer in
    `generic` on the generic kernels."""
    mm = memory_model or (plan.memory_model if plan is not None else MemoryModel.INPLACE)
    split = None if plan is None else plan.schedule.split_after
    if split is None:
        calls, descriptors = _calls(graph, plan_arena(graph, mm).offsets,
                                    generic=generic)
        descriptors += DIMS_BYTES * len(graph.tensors)
        stage_calls: list[str] = []
    else:
        assert plan is not None
        patches = plan.schedule.patches ** 2
        stage = build_stage(graph, plan)
        rest = rest_graph(graph, split)
        stage_offsets, rest_offsets, _ = arena_layout(stage, rest, mm)
        calls, descriptors = _calls(rest, rest_offsets, generic=generic)
        body_calls, body_descriptors = _calls(stage.graph, stage_offsets, patches, stage.views,
                                              generic)
        stage_calls = ["tf_patch_store_s8", *body_calls]
        descriptors += (DIMS_BYTES * len(rest.tensors) + body_descriptors
                        + patches * DIMS_BYTES * len(stage.regions)
                        + patches * (INPUT_REGION_BYTES + ORIGIN_BYTES))
    everything = [*calls, *stage_calls]
    features = {"const": 1, "calls": len(everything),
                "call_args": sum(_args(e) for e in everything),
                "stage": int(split is not None), "stage_calls": len(stage_calls),
                "descriptor_bytes": descriptors}
    return CodeUse(frozenset(everything), MappingProxyType(features))


def code_bytes(graph: Graph, cpu: Cpu, plan: PatchPlan | None = None, dsp: bool = True,
               memory_model: MemoryModel | None = None) -> int:
    """Flash for code (runtime and generated, params excluded) of `graph` on `cpu`."""
    use = code_use(graph, plan, memory_model)
    table = code_size_table(cpu, dsp)
    return table.closure_bytes(use.entries) + table.generated_bytes(use.features)


def flash_account(graph: Graph, cpu: Cpu, plan: PatchPlan | None = None, dsp: bool = True,
                  memory_model: MemoryModel | None = None,
                  overlay_layers: Sequence[str] = (),
                  generic: frozenset[str] = NONE_GENERIC) -> FlashAccount:
    """The Flash account of `graph` under `plan` (None: layer-based) on `cpu`; with
    `overlay_layers` (a sparse-update scheme's trainable layers), the code that reads the
    weights overlay and its region at the end of the slot; `generic`: the kinds of layer run by
    the generic kernels (the compiler's fallback when the specialized ones do not fit)."""
    use = code_use(graph, plan, memory_model, generic)
    table = code_size_table(cpu, dsp)
    mm = memory_model or (plan.memory_model if plan is not None else MemoryModel.INPLACE)
    overlay = graph_overlay_layout(graph, overlay_layers)
    return FlashAccount(params_bytes=analyze(graph, mm).weights_bytes,
                        runtime_code_bytes=table.closure_bytes(use.entries),
                        generated_bytes=table.generated_bytes(use.features) + overlay.code_bytes,
                        overlay_bytes=overlay.region_bytes)
