"""The weights overlay: updated parameters of chosen layers, read by the generated C at boot.

On-device personalization changes a few layers' int8 parameters. The firmware keeps its
own in Flash (`const`) and, for the layers named at build time (the sparse-update scheme's
trainable layers), reads them through pointers that `tf_model_use_overlay` points at an
overlay: on an MCU the bytes in the Flash region the manifest names (`overlay` field), on the
host an argument. Blank, torn or foreign overlays leave the built-in weights in use.

Layout (little endian, every part 4-byte aligned):

    offset  size  field
    0       4     magic b"TFOV"
    4       2     format version (1)
    6       2     reserved, 0
    8       4     layout id: crc32 of the layout text (which layers, how many bytes each)
    12      4     round: the personalization round that wrote it (the overlay's version)
    16      4     body bytes B
    20      4     crc32 of the body (zlib's, as the C computes it)
    24      B     per layer, in layout order: int32 input_offset, output_offset, act_min,
                  act_max; int8 weights as the kernel reads them (padded to 4); int32 bias,
                  multiplier, shift (one per output channel)
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from firmware.codegen.emitters import Kind, kernel_weights, kind_of
from firmware.int8.quantize import QuantizedGraph
from firmware.plan.overlay import (
    OVERLAY_FORMAT,
    OVERLAY_HEADER,
    OVERLAY_MAGIC,
    OverlayEntry,
    OverlayError,
    OverlayLayout,
    graph_overlay_layout,
)

WEIGHTED = (Kind.CONV, Kind.POINTWISE, Kind.DEPTHWISE, Kind.FULLY_CONNECTED)
__all__ = ["OVERLAY_FORMAT", "OVERLAY_HEADER", "OVERLAY_MAGIC", "OverlayEntry", "OverlayError",
           "OverlayLayout", "encode_overlay", "overlay_c", "overlay_layout", "overlay_round"]


def overlay_layout(qgraph: QuantizedGraph, layers: Sequence[str]) -> OverlayLayout:
    """The layout for `layers` (in graph order); OverlayError for layers without weights."""
    graph = qgraph.graph
    for layer in graph.layers:
        if layer.name in layers and kind_of(graph, layer) not in WEIGHTED:
            raise OverlayError(f"layer {layer.name} ({kind_of(graph, layer).value}) has no "
                               "weights to overlay")
    return graph_overlay_layout(graph, layers)


def encode_overlay(qgraph: QuantizedGraph, layout: OverlayLayout, round_id: int) -> bytes:
    """The overlay of `qgraph`'s parameters for the layout's layers, tagged `round_id`."""
    graph = qgraph.graph
    parts = []
    for e in layout.entries:
        ql = qgraph.layer(e.layer)
        assert ql.bias_q is not None and ql.multiplier is not None and ql.shift is not None
        weights = kernel_weights(graph, ql, kind_of(graph, ql.layer)).reshape(-1)
        if weights.size != e.weight_count or np.asarray(ql.bias_q).size != e.channels:
            raise OverlayError(f"layer {e.layer}: {weights.size} weights and "
                               f"{np.asarray(ql.bias_q).size} channels, the layout has "
                               f"{e.weight_count} and {e.channels}")
        parts.append(np.array([ql.input_offset, ql.output_offset, ql.act_min, ql.act_max],
                              dtype="<i4").tobytes())
        padded = np.zeros(e.weight_bytes, dtype=np.int8)
        padded[:e.weight_count] = weights
        parts.append(padded.tobytes())
        for values in (ql.bias_q, ql.multiplier, ql.shift):
            parts.append(np.asarray(values, dtype="<i4").tobytes())
    body = b"".join(parts)
    assert len(body) == layout.body_bytes
    return OVERLAY_HEADER.pack(OVERLAY_MAGIC, OVERLAY_FORMAT, 0, layout.layout_id,
                               round_id, len(body), zlib.crc32(body)) + body


def overlay_round(data: bytes, layout: OverlayLayout) -> int:
    """The round of a well-formed overlay for `layout`; OverlayError says what is wrong."""
    if len(data) < OVERLAY_HEADER.size:
        raise OverlayError(f"overlay is {len(data)} bytes, shorter than its header")
    magic, version, reserved, layout_id, round_id, body, crc = OVERLAY_HEADER.unpack_from(data)
    if magic != OVERLAY_MAGIC or version != OVERLAY_FORMAT or reserved != 0:
        raise OverlayError(f"not a format-{OVERLAY_FORMAT} overlay (magic {magic!r}, "
                           f"version {version})")
    if layout_id != layout.layout_id or body != layout.body_bytes:
        raise OverlayError(f"overlay is for layout {layout_id:#010x} ({body} bytes), the "
                           f"firmware's is {layout.layout_id:#010x} ({layout.body_bytes} bytes)")
    if len(data) != OVERLAY_HEADER.size + body:
        raise OverlayError(f"overlay is {len(data)} bytes, its header says "
                           f"{OVERLAY_HEADER.size + body}")
    if zlib.crc32(data[OVERLAY_HEADER.size:]) != crc:
        raise OverlayError("overlay body does not match its crc32 (torn or altered)")
    return int(round_id)


def overlay_c(layout: OverlayLayout) -> str:
    """tf_model_use_overlay for model.c: the pointers reset, checked, then redirected."""
    reset = []
    point = []
    offset = 0
    for e in layout.entries:
        p = e.prefix
        reset += [f"{p}_w = {p}_w_base;", f"{p}_b = {p}_b_base;", f"{p}_q = {p}_q_base;"]
        w, b = offset + 16, offset + 16 + e.weight_bytes
        m, s = b + 4 * e.channels, b + 8 * e.channels
        point += [f"{p}_q.input_offset = tf_le32(body + {offset});",
                  f"{p}_q.output_offset = tf_le32(body + {offset + 4});",
                  f"{p}_q.act_min = tf_le32(body + {offset + 8});",
                  f"{p}_q.act_max = tf_le32(body + {offset + 12});",
                  f"{p}_w = (const int8_t *)(body + {w});",
                  f"{p}_b = (const int32_t *)(body + {b});",
                  f"{p}_q.multiplier = (const int32_t *)(body + {m});",
                  f"{p}_q.shift = (const int32_t *)(body + {s});"]
        offset += e.bytes
    lines = "\n".join(f"    {x}" for x in reset)
    points = "\n".join(f"    {x}" for x in point)
    return f"""
/* ---- weights overlay (format: firmware/codegen/overlay.py) ---- */
static uint32_t tf_crc32(const uint8_t *data, uint32_t n)
{{
    uint32_t crc = 0xFFFFFFFFu;
    for (uint32_t i = 0; i < n; i++) {{
        crc ^= data[i];
        for (int32_t k = 0; k < 8; k++) {{
            crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
        }}
    }}
    return ~crc;
}}

static int32_t tf_le32(const uint8_t *p)
{{
    return (int32_t)((uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
                     ((uint32_t)p[3] << 24));
}}

tf_status tf_model_use_overlay(const uint8_t *overlay, uint32_t nbytes)
{{
{lines}
    if (overlay == NULL) {{
        return TF_OK; /* asked for the built-in weights */
    }}
    if (nbytes < 4u || memcmp(overlay, "TFOV", 4) != 0) {{
        return TF_ERR_NULL; /* blank region, no overlay: the built-in weights */
    }}
    if (((uintptr_t)overlay & 3u) != 0u || nbytes < {OVERLAY_HEADER.size}u ||
        tf_le32(overlay + 4) != {OVERLAY_FORMAT} ||
        (uint32_t)tf_le32(overlay + 8) != TF_OVERLAY_LAYOUT_ID ||
        (uint32_t)tf_le32(overlay + 16) != TF_OVERLAY_BODY_BYTES ||
        nbytes < {OVERLAY_HEADER.size}u + TF_OVERLAY_BODY_BYTES) {{
        return TF_ERR_ARG;
    }}
    const uint8_t *body = overlay + {OVERLAY_HEADER.size};
    if (tf_crc32(body, TF_OVERLAY_BODY_BYTES) != (uint32_t)tf_le32(overlay + 20)) {{
        return TF_ERR_ARG;
    }}
{points}
    return TF_OK;
}}
"""
