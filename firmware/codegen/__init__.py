"""C code generation: model.c / model.h / main.c from a QuantizedGraph and a schedule.

`render_model(qgraph, plan=None, memory_model=MemoryModel.INPLACE)` -> `GeneratedModel`
(the file texts plus the arena and scratch sizes and the named buffers), and
`write_model(qgraph, plan, out_dir, memory_model)` writes the files. `plan` is the
planner's PatchPlan: patches == 1 (or no plan) gives layer-based execution, otherwise the
patch stage runs as a per-patch loop over `firmware.plan.patch.tiles` and the rest layer by layer.

model.c holds every parameter as `const` (Flash), one static arena `tf_arena` whose size and
offsets come from `firmware.plan.arena` (the planner's layout), a scratch buffer `tf_scratch`
(the largest im2col / line buffer a kernel asks for: `firmware.plan.kernels`), and
`tf_model_run(read_input, ctx, output)`: it reads the HWC int8 input through `read_input`
(whole, or one patch row at a time), runs the layers and copies the output to `output` in the
IR's (C, H, W) order. Output is deterministic:
identifiers derive from layer positions and op kinds (l12_pw_out), arrays print 16 values a
line. The C is rendered by a table from op kind to emitter (`firmware.codegen.emitters`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from firmware.codegen.cformat import c_comment
from firmware.codegen.emitters import emit_params, kind_of
from firmware.codegen.main_c import main_c
from firmware.codegen.overlay import OverlayLayout, overlay_c, overlay_layout
from firmware.codegen.render import Body, hwc, layer_based, layer_prefix, tensor_idents
from firmware.int8.quantize import QuantizedGraph
from firmware.ir import Graph
from firmware.plan.kernels import NONE_GENERIC
from firmware.plan.memory import MemoryModel
from firmware.plan.patch import PatchPlan

__all__ = ["PROFILE_FILE", "GeneratedModel", "render_model", "write_model"]

PROFILE_FILE = "profile.bin"


@dataclass(frozen=True)
class GeneratedModel:
    """The generated sources and the memory they reserve."""

    files: Mapping[str, str]  # file name -> text: model.c, model.h, main.c
    arena_bytes: int
    scratch_bytes: int
    patches: int
    buffers: Mapping[str, tuple[int, int]]  # named buffer -> (arena offset, bytes)
    overlay: OverlayLayout | None = None  # layers a weights overlay may replace


def render_model(qgraph: QuantizedGraph, plan: PatchPlan | None = None,
                 memory_model: MemoryModel = MemoryModel.INPLACE,
                 overlay_layers: Sequence[str] = (), profile: bool = False,
                 generic: frozenset[str] = NONE_GENERIC) -> GeneratedModel:
    """The C sources of a quantized graph under a schedule (see the module docstring).

    `generic` names the kinds of layer ("conv", "dw", "pw") that call the generic kernels
    (less code, the same results; their scratch, firmware.plan.kernels): the compiler's
    choice when the specialized kernels' code does not fit the Flash slot.
    `overlay_layers` (the sparse-update scheme's trainable layers) read their parameters
    through pointers that `tf_model_use_overlay` may redirect (firmware.codegen.overlay).
    `profile` adds a SysTick reading at every layer boundary; main.c then writes
    profile.bin (`PROFILE_FILE`: u64 ticks per layer index, summed over the run's images and
    patches; time before the first layer, such as reading the input, counts as index 0).
    """
    overlay = overlay_layout(qgraph, overlay_layers) if overlay_layers else None
    patches = 1 if plan is None or plan.schedule.split_after is None else plan.schedule.patches
    if patches > 1:
        assert plan is not None
        from firmware.codegen.patched import patch_based

        body = patch_based(qgraph, plan, memory_model, generic)
    else:
        body = layer_based(qgraph, memory_model, generic)
    files = {"model.h": _header(qgraph, body, overlay, profile),
             "model.c": _source(qgraph, body, patches, memory_model, overlay, profile),
             "main.c": main_c(overlay is not None, profile)}
    return GeneratedModel(files=MappingProxyType(files), arena_bytes=body.arena_bytes,
                          scratch_bytes=body.scratch_bytes, patches=patches,
                          buffers=MappingProxyType(dict(body.buffers)), overlay=overlay)


def write_model(qgraph: QuantizedGraph, plan: PatchPlan | None, out_dir: Path,
                memory_model: MemoryModel = MemoryModel.INPLACE,
                overlay_layers: Sequence[str] = (), profile: bool = False,
                generic: frozenset[str] = NONE_GENERIC) -> GeneratedModel:
    """Render and write model.c, model.h and main.c into `out_dir` (created if needed)."""
    model = render_model(qgraph, plan, memory_model, overlay_layers, profile, generic)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in model.files.items():
        (out_dir / name).write_text(text)
    return model


def _overlay_header(overlay: OverlayLayout | None) -> str:
    if overlay is None:
        return ""
    return f"""
/* Weights overlay of {len(overlay.entries)} layers (firmware/codegen/overlay.py). */
#define TF_OVERLAY_LAYOUT_ID {overlay.layout_id:#010x}u
#define TF_OVERLAY_BODY_BYTES {overlay.body_bytes}u
#define TF_OVERLAY_BYTES {overlay.total_bytes}u
/* Points the overlaid layers at `overlay` (NULL: the built-in weights). TF_OK when in use;
 * TF_ERR_NULL when no overlay is there (blank), TF_ERR_ARG when it is torn or foreign: the
 * built-in weights stay in use either way. */
tf_status tf_model_use_overlay(const uint8_t *overlay, uint32_t nbytes);
"""


def _profile_header(graph: Graph) -> str:
    return f"""
/* Per-layer profile: SysTick ticks by layer index (render_model(profile=True)). */
#define TF_PROF_LAYERS {len(graph.layers)}
extern uint64_t tf_prof_ticks[TF_PROF_LAYERS];
"""


def _header(qgraph: QuantizedGraph, body: Body, overlay: OverlayLayout | None = None,
            profile: bool = False) -> str:
    graph = qgraph.graph
    ih, iw, ic = hwc(graph, graph.input)
    oh, ow, oc = hwc(graph, graph.output)
    qi, qo = qgraph.input, qgraph.output
    return f"""/* Generated by firmware.codegen from {c_comment(graph.name)}. Do not edit. */
#ifndef TF_MODEL_H
#define TF_MODEL_H

#include <stdint.h>

#include "tinyfleet_nn.h"

/* Input: int8 HWC {ih}x{iw}x{ic}, real = {qi.scale!r} * (q - {qi.zero_point}). */
#define TF_MODEL_INPUT_H {ih}
#define TF_MODEL_INPUT_W {iw}
#define TF_MODEL_INPUT_C {ic}
#define TF_MODEL_INPUT_BYTES {ih * iw * ic}u
/* Output: int8 in (C, H, W) order, {oc}x{oh}x{ow}, real = {qo.scale!r} * (q - {qo.zero_point}). */
#define TF_MODEL_OUTPUT_BYTES {oh * ow * oc}u
#define TF_MODEL_ARENA_BYTES {body.arena_bytes}u
#define TF_MODEL_SCRATCH_BYTES {body.scratch_bytes}u

/* Copies `count` bytes of the HWC input image from byte `offset` into dst; 0 on success. */
typedef int32_t (*tf_input_fn)(void *ctx, uint32_t offset, int8_t *dst, uint32_t count);

extern int8_t tf_arena[TF_MODEL_ARENA_BYTES];
extern int16_t tf_scratch[(TF_MODEL_SCRATCH_BYTES + 1u) / 2u];

/* Runs one inference: reads the input through read_input, writes TF_MODEL_OUTPUT_BYTES. */
tf_status tf_model_run(tf_input_fn read_input, void *ctx, int8_t *output);
{_overlay_header(overlay)}{_profile_header(graph) if profile else ""}
#endif /* TF_MODEL_H */
"""


def _output_copy(qgraph: QuantizedGraph, out_ident: str) -> list[str]:
    h, w, c = hwc(qgraph.graph, qgraph.graph.output)
    if h * w == 1:
        return [f"memcpy(output, {out_ident}, {c}u);"]
    return [f"for (int32_t ch = 0; ch < {c}; ch++) {{",
            f"    for (int32_t p = 0; p < {h * w}; p++) {{",
            f"        output[ch * {h * w} + p] = {out_ident}[p * {c} + ch];  /* HWC -> CHW */",
            "    }", "}"]


_LAYER_COMMENT = re.compile(r"^(\s*)/\* l(\d+): ")

_PROFILE_C = """/* Per-layer profile (render_model(profile=True)): SysTick ticks since the previous
 * layer boundary, added to the layer that just ran. */
uint64_t tf_prof_ticks[TF_PROF_LAYERS];
static uint64_t tf_prof_last;
static uint32_t tf_prof_layer;
#define TF_PROF(i)                                         \\
    do {                                                   \\
        const uint64_t now_ = tf_clock_ticks();            \\
        tf_prof_ticks[tf_prof_layer] += now_ - tf_prof_last; \\
        tf_prof_last = now_;                               \\
        tf_prof_layer = (i);                               \\
    } while (0)

"""


def _profiled(run: list[str]) -> list[str]:
    """`run` with TF_PROF(k) before each layer's comment and before the return."""
    out = ["tf_prof_last = tf_clock_ticks();", "tf_prof_layer = 0;"]
    for stmt in run:
        lines = []
        for line in stmt.splitlines():
            m = _LAYER_COMMENT.match(line)
            if m:
                lines.append(f"{m.group(1)}TF_PROF({m.group(2)});")
            elif line.strip() == "return TF_OK;":
                lines.append("TF_PROF(0);")
            lines.append(line)
        out.append("\n".join(lines))
    return out


def _source(qgraph: QuantizedGraph, body: Body, patches: int,
            memory_model: MemoryModel, overlay: OverlayLayout | None = None,
            profile: bool = False) -> str:
    graph = qgraph.graph
    overlaid = set(overlay.layers) if overlay else set()
    params = [emit_params(graph, layer_prefix(i), ql, kind_of(graph, ql.layer),
                          overlaid=ql.name in overlaid)
              for i, ql in enumerate(qgraph.ordered_layers()) if ql.name not in body.param_free]
    out_ident = tensor_idents(qgraph)[graph.output]
    run = [*body.read_input, *body.statements, *_output_copy(qgraph, out_ident),
           "return TF_OK;"]
    if profile:
        run = _profiled(run)
    schedule = "layer-based" if patches == 1 else f"{patches}x{patches} patches"
    return "".join([
        f"/* Generated by firmware.codegen from {c_comment(graph.name)}: {schedule}, "
        f"{memory_model.value} memory model, {len(graph.layers)} layers. Do not edit. */\n",
        "#include <stdint.h>\n#include <string.h>\n\n#include \"model.h\"\n"
        "#include \"tinyfleet_platform.h\"\n\n",
        "#define TF_CHECK(call)                   \\\n"
        "    do {                                 \\\n"
        "        const tf_status st_ = (call);    \\\n"
        "        if (st_ != TF_OK) {              \\\n"
        "            return st_;                  \\\n"
        "        }                                \\\n"
        "    } while (0)\n"
        "#define TF_READ(fn, ctx, offset, dst, count)                                  \\\n"
        "    do {                                                                      \\\n"
        "        if ((fn)((ctx), (uint32_t)(offset), (dst), (uint32_t)(count)) != 0) { \\\n"
        "            return TF_ERR_IO;                                                 \\\n"
        "        }                                                                     \\\n"
        "    } while (0)\n\n",
        "static inline int32_t tf_numel(const tf_dims *d)\n{\n"
        "    return d->h * d->w * d->c;\n}\n\n",
        "/* One static arena (offsets from firmware.plan.memory.plan_arena) and the kernels'\n"
        " * scratch; both painted at reset, not zeroed, so that a run's high-water mark can\n"
        " * be measured. */\n",
        "int8_t tf_arena[TF_MODEL_ARENA_BYTES] TF_NOINIT;\n",
        "int16_t tf_scratch[(TF_MODEL_SCRATCH_BYTES + 1u) / 2u] TF_NOINIT;\n\n",
        _PROFILE_C if profile else "",
        "/* ---- parameters (Flash) ---- */\n", *params,
        "\n/* ---- activations (arena) ---- */\n", *body.decls,
        "\ntf_status tf_model_run(tf_input_fn read_input, void *ctx, int8_t *output)\n{\n",
        *(f"    {line}\n" for stmt in run for line in stmt.splitlines()),
        "}\n",
        overlay_c(overlay) if overlay else "",
    ])
