"""The weights overlay's layout and its Flash: which layers, how many bytes each, the region.

On-device personalization rewrites the sparse-update scheme's trainable layers' parameters
into a region at the end of the OTA slot (the format and the C that reads it:
`firmware.codegen.overlay`). Its size follows from the graph's shapes alone, so the search
and the compiler's Flash account charge it before any weights exist.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from firmware.errors import FirmwareError
from firmware.ir import Graph, OpKind

OVERLAY_MAGIC = b"TFOV"
OVERLAY_FORMAT = 1
OVERLAY_HEADER = struct.Struct("<4sHHIIII")
ERASE_SECTOR_BYTES = 4096  # the region is whole Flash sectors, so that a rewrite erases it
# RAM each overlaid layer adds on a 32-bit core: two pointers (weights, bias) and a writable
# tf_conv_quant (4 int32 + 2 pointers) in .data; the SRAM account counts it.
RAM_BYTES_PER_LAYER = 32
# Flash of the code that reads an overlay (tf_model_use_overlay, tf_crc32, tf_le32) and of
# each overlaid layer's pointer set-up, reset and writable quant struct: measured on linked
# images of the digits TinyNet with 0, 3 and 6 overlaid layers (arm-none-eabi-size): 289 B +
# 181 B per layer on the Cortex-M7, 224 B + 181 B on the M4; rounded up
# (tests/firmware/plan/test_flash.py checks account >= linked, within 2 %).
OVERLAY_CODE_BYTES = 320
OVERLAY_CODE_PER_LAYER_BYTES = 192


class OverlayError(FirmwareError):
    """An overlay that does not match its layout, or layers that cannot be overlaid."""


@dataclass(frozen=True)
class OverlayEntry:
    """One overlaid layer: its C prefix and the byte sizes of its parts."""

    layer: str
    prefix: str  # l12
    weight_count: int
    channels: int

    @property
    def weight_bytes(self) -> int:
        """int8 weights padded to a 4-byte boundary."""
        return -(-self.weight_count // 4) * 4

    @property
    def bytes(self) -> int:
        """The entry's size in the body."""
        return 16 + self.weight_bytes + 12 * self.channels


@dataclass(frozen=True)
class OverlayLayout:
    """Which layers an overlay carries, in order, and its sizes."""

    entries: tuple[OverlayEntry, ...]

    @property
    def body_bytes(self) -> int:
        """Bytes after the header."""
        return sum(e.bytes for e in self.entries)

    @property
    def total_bytes(self) -> int:
        """Header + body."""
        return OVERLAY_HEADER.size + self.body_bytes

    @property
    def region_bytes(self) -> int:
        """Flash reserved for it: whole erase sectors (0 when there is nothing to overlay)."""
        if not self.entries:
            return 0
        return -(-self.total_bytes // ERASE_SECTOR_BYTES) * ERASE_SECTOR_BYTES

    @property
    def code_bytes(self) -> int:
        """Flash of the code that reads it (0 when there is nothing to overlay)."""
        if not self.entries:
            return 0
        return OVERLAY_CODE_BYTES + OVERLAY_CODE_PER_LAYER_BYTES * len(self.entries)

    def text(self) -> str:
        """The canonical description its layout id is the crc32 of."""
        return ";".join(f"{e.layer}:{e.weight_count}x{e.channels}" for e in self.entries)

    @property
    def layout_id(self) -> int:
        """crc32 of `text()`: an overlay for another layout is refused by the C."""
        return zlib.crc32(self.text().encode())

    @property
    def ram_bytes(self) -> int:
        """Static RAM of the overlay's pointers and quant structs (RAM_BYTES_PER_LAYER each)."""
        return RAM_BYTES_PER_LAYER * len(self.entries)

    @property
    def layers(self) -> tuple[str, ...]:
        """The overlaid layer names."""
        return tuple(e.layer for e in self.entries)


def graph_overlay_layout(graph: Graph, layers: Sequence[str]) -> OverlayLayout:
    """The layout for `layers` of `graph` (in graph order), from its shapes; OverlayError
    for a layer that is not in the graph or has no weights."""
    wanted = set(layers)
    unknown = wanted - {layer.name for layer in graph.layers}
    if unknown:
        raise OverlayError(f"overlay layers {sorted(unknown)} are not in {graph.name}")
    entries = []
    for i, layer in enumerate(graph.layers):
        if layer.name not in wanted:
            continue
        cout = graph.tensor(layer.output).channels
        source = graph.tensor(layer.inputs[0])
        if layer.op is OpKind.CONV:
            count = cout * (source.channels // layer.groups) * layer.kernel[0] * layer.kernel[1]
        elif layer.op is OpKind.FULLY_CONNECTED:
            count = cout * source.numel
        else:
            raise OverlayError(f"layer {layer.name} ({layer.op.value}) has no weights to "
                               "overlay")
        entries.append(OverlayEntry(layer.name, f"l{i}", count, cout))
    return OverlayLayout(tuple(entries))
