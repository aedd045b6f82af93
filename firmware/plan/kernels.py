"""Kernel scratch: what each int8 runtime kernel needs in SRAM besides its tensors.

Each function mirrors a C kernel's `tf_<op>_get_buffer_size` (firmware/runtime/src) byte for
byte, and a test compares them on the host library. This module is the one source of the
scratch figure: the code generator declares `tf_scratch` with `schedule_scratch_bytes`, and
the SRAM account (`firmware.plan.account`) charges the same number, so what is predicted,
declared, linked and touched agree.

- Dense k x k conv: im2col columns of int16, k*k*cin each; two columns (two output pixels
  per pass) unless the output has a single pixel.
- Dense 3x3 conv of 3 input channels (an RGB input layer, tf_conv2d_rgb_s8): two columns
  of 28 int16 and, per pair of output channels, 144 bytes of expanded weights and
  requantization constants (4 * (28 + 36 * ceil(out / 2))), at least the generic figure.
- 1x1 conv (stride 1, no padding): the same with k = 1.
- Fully connected: one int16 column of the input features (one output pixel).
- Depthwise with a square 3x3 / 5x5 / 7x7 window and stride 1 or 2 runs the specialized
  kernel (tf_depthwise_conv2d_fast_s8): one padded channel plane plus 16 bytes of slack
  ((h + pads) * (w + pads) + 16). Other depthwise windows run the generic kernel: the smaller
  of a ring of kh zero-point-padded input rows ((w + pads) * c bytes each) and one padded
  channel plane ((h + pads) * (w + pads) bytes).
- Add, pooling, reshape, patch load/store: none.

Kinds of layer the compiler runs on the generic kernels (`generic`, a subset of
SPECIALIZED_KINDS: its choice when the specialized kernels' code does not fit the Flash slot)
need the generic figures.

In a patch stage a layer runs on tiles: the figure is taken for every tile (its own input
region and border padding, `firmware.plan.patch.tiles`), and the largest counts.
"""

from __future__ import annotations

import itertools

from firmware.ir import Graph, Layer, OpKind
from firmware.plan.patch import LayerTile, PatchPlan, tiles

INT16_BYTES = 2

Pads = tuple[int, int, int, int]  # top, left, bottom, right


def columns(out_pixels: int) -> int:
    """im2col columns a matmul pass fills: two output pixels at a time, one if only one."""
    return 2 if out_pixels >= 2 else 1


def conv_scratch_bytes(in_channels: int, kernel: tuple[int, int], out_pixels: int) -> int:
    """tf_conv2d_get_buffer_size (and tf_conv2d_1x1_get_buffer_size with kernel (1, 1))."""
    return columns(out_pixels) * kernel[0] * kernel[1] * in_channels * INT16_BYTES


RGB_KERNEL = (3, 3)
RGB_CHANNELS = 3
RGB_COLUMN_WORDS = 14  # 27 taps and a zero one, as int16 pairs
RGB_PAIR_WORDS = 36  # per pair of output channels: 8 constants and 2 x 14 weight words


def rgb_conv(in_channels: int, kernel: tuple[int, int]) -> bool:
    """The dense conv runs tf_conv2d_rgb_s8: a 3x3 window over 3 input channels."""
    return in_channels == RGB_CHANNELS and kernel == RGB_KERNEL


def rgb_conv_scratch_bytes(out_pixels: int, out_channels: int) -> int:
    """tf_conv2d_rgb_get_buffer_size: its columns and channel-pair blocks."""
    fast = 4 * (2 * RGB_COLUMN_WORDS + (out_channels + 1) // 2 * RGB_PAIR_WORDS)
    return max(fast, conv_scratch_bytes(RGB_CHANNELS, RGB_KERNEL, out_pixels))


def fully_connected_scratch_bytes(in_features: int) -> int:
    """tf_fully_connected_get_buffer_size: one int16 column of the input."""
    return in_features * INT16_BYTES


def depthwise_scratch_bytes(in_h: int, in_w: int, channels: int, kernel_h: int,
                            pads: Pads) -> int:
    """tf_depthwise_conv2d_get_buffer_size: min(ring of kh padded rows, one padded plane)."""
    top, left, bottom, right = pads
    padded_w = in_w + left + right
    ring = kernel_h * padded_w * channels
    plane = (in_h + top + bottom) * padded_w
    return min(ring, plane)


FAST_DEPTHWISE_KERNELS = (3, 5, 7)
FAST_DEPTHWISE_STRIDES = (1, 2)
FAST_DEPTHWISE_SLACK = 16  # bytes the last group of 4 outputs may read past the plane


def fast_depthwise(kernel: tuple[int, int], stride: tuple[int, int]) -> bool:
    """tf_depthwise_conv2d_fast_supported: the window has a specialized depthwise kernel."""
    return (kernel[0] == kernel[1] and kernel[0] in FAST_DEPTHWISE_KERNELS
            and stride[0] == stride[1] and stride[0] in FAST_DEPTHWISE_STRIDES)


def fast_depthwise_scratch_bytes(in_h: int, in_w: int, pads: Pads) -> int:
    """tf_depthwise_conv2d_fast_get_buffer_size: one padded channel plane and the slack."""
    top, left, bottom, right = pads
    return (in_h + top + bottom) * (in_w + left + right) + FAST_DEPTHWISE_SLACK


def is_depthwise(graph: Graph, layer: Layer) -> bool:
    """True for a conv with one filter per channel (groups == in == out channels)."""
    if layer.op is not OpKind.CONV or layer.groups == 1:
        return False
    cin = graph.tensor(layer.inputs[0]).channels
    return layer.groups == cin == graph.tensor(layer.output).channels


# Kinds of layer with specialized kernels ("conv": dense k x k, "dw": depthwise, "pw": 1x1,
# as firmware.codegen.emitters.Kind names them), from the one whose specialized kernels save
# the fewest instructions (a network's stem: ~10 % of them) to the most (1x1: ~60 %).
SPECIALIZED_KINDS = ("conv", "dw", "pw")
NONE_GENERIC: frozenset[str] = frozenset()


def generic_steps() -> list[frozenset[str]]:
    """Which kinds to run on the generic kernels, in the order the compiler tries them when
    the specialized kernels' code does not fit the Flash slot: none, then every subset of
    SPECIALIZED_KINDS by what it gives up (each kind outweighs all before it together).
    Not by code size: a generic kernel may be larger than the specialized one it replaces
    (the specialized depthwise kernels do not link the generic one)."""
    subsets = [frozenset(c) for n in range(len(SPECIALIZED_KINDS) + 1)
               for c in itertools.combinations(SPECIALIZED_KINDS, n)]
    return sorted(subsets, key=lambda s: sum(2 ** SPECIALIZED_KINDS.index(k) for k in s))


def layer_scratch_bytes(graph: Graph, layer: Layer, tile: LayerTile | None = None,
                        generic: frozenset[str] = NONE_GENERIC) -> int:
    """Scratch of one layer run whole, or on one tile of a patch stage (`generic`: the
    kinds run by the generic kernels)."""
    x = graph.tensor(layer.inputs[0])
    if layer.op is OpKind.FULLY_CONNECTED:
        return fully_connected_scratch_bytes(x.numel)
    if layer.op is not OpKind.CONV:
        return 0
    if tile is None:
        in_h, in_w, pads = x.height, x.width, layer.padding
        out = graph.tensor(layer.output)
        out_pixels = out.height * out.width
    else:
        in_h = tile.in_rows[1] - tile.in_rows[0]
        in_w = tile.in_cols[1] - tile.in_cols[0]
        pads = (tile.pad_top, tile.pad_left, tile.pad_bottom, tile.pad_right)
        out_pixels = ((tile.out_rows[1] - tile.out_rows[0])
                      * (tile.out_cols[1] - tile.out_cols[0]))
    if is_depthwise(graph, layer):
        if "dw" not in generic and fast_depthwise(layer.kernel, layer.stride):
            return fast_depthwise_scratch_bytes(in_h, in_w, pads)
        return depthwise_scratch_bytes(in_h, in_w, x.channels, layer.kernel[0], pads)
    if "conv" not in generic and rgb_conv(x.channels // layer.groups, layer.kernel):
        return rgb_conv_scratch_bytes(out_pixels, graph.tensor(layer.output).channels)
    return conv_scratch_bytes(x.channels // layer.groups, layer.kernel, out_pixels)


def schedule_scratch_bytes(graph: Graph, plan: PatchPlan | None = None,
                           generic: frozenset[str] = NONE_GENERIC) -> int:
    """The scratch buffer a schedule needs: the largest any of its kernel calls asks for."""
    split = None if plan is None else plan.schedule.split_after
    if split is None:
        return max((layer_scratch_bytes(graph, layer, generic=generic)
                    for layer in graph.layers), default=0)
    assert plan is not None
    stage_end = graph.index(split) + 1
    rest = max((layer_scratch_bytes(graph, layer, generic=generic)
                for layer in graph.layers[stage_end:]), default=0)
    stage = max((layer_scratch_bytes(graph, graph.layer(tile.layer), tile, generic)
                 for patch in tiles(graph, plan) for tile in patch), default=0)
    return max(rest, stage)


# C has no zero-length arrays: a model whose kernels need no scratch still declares a little.
MIN_SCRATCH_BYTES = 4


def scratch_buffer_bytes(graph: Graph, plan: PatchPlan | None = None,
                         generic: frozenset[str] = NONE_GENERIC) -> int:
    """Bytes of `tf_scratch` as generated code declares it (TF_MODEL_SCRATCH_BYTES)."""
    return max(schedule_scratch_bytes(graph, plan, generic), MIN_SCRATCH_BYTES)
