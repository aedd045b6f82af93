"""Architecture configs: MobileNetV2 and MCUNet-style inverted-residual networks.

One config type serves the built-in networks, the supernet's subnets and the search: a stem
conv, a list of inverted-residual blocks, an optional 1x1 head conv, global pooling and a
classifier. `firmware.frontend.builtin.build_graph(config)` turns a config into an IR `Graph`.
"""

from __future__ import annotations

from dataclasses import dataclass


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels as MobileNetV2 does: to a multiple of `divisor`, never below 90 %."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


@dataclass(frozen=True)
class BlockConfig:
    """One inverted-residual block: [1x1 expand] -> kxk depthwise -> 1x1 project.

    `expand_ratio` 1 means no expand conv (MobileNetV2's first block). `residual` None means
    "when the shapes allow it" (stride 1 and in_channels == out_channels).
    """

    kernel: int
    expand_ratio: int
    stride: int
    out_channels: int
    residual: bool | None = None


@dataclass(frozen=True)
class NetConfig:
    """A whole network. `input_size` is (height, width)."""

    name: str
    input_size: tuple[int, int]
    stem_channels: int
    blocks: tuple[BlockConfig, ...]
    head_channels: int | None
    num_classes: int
    in_channels: int = 3
    stem_kernel: int = 3
    stem_stride: int = 2


# (expand ratio t, channels c, repeats n, first stride s) from the MobileNetV2 paper, Table 2.
MOBILENETV2_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def mobilenet_v2(
    width: float = 1.0, resolution: int | tuple[int, int] = 224, num_classes: int = 1000
) -> NetConfig:
    """MobileNetV2 (Sandler et al. 2018) at a width multiplier and input resolution."""
    size = (resolution, resolution) if isinstance(resolution, int) else resolution
    blocks: list[BlockConfig] = []
    for t, c, n, s in MOBILENETV2_SETTINGS:
        out = make_divisible(c * width)
        for i in range(n):
            blocks.append(BlockConfig(kernel=3, expand_ratio=t, stride=s if i == 0 else 1,
                                      out_channels=out))
    head = make_divisible(1280 * max(1.0, width))
    return NetConfig(
        name=f"mobilenetv2-w{width:g}-r{size[0]}" + (f"x{size[1]}" if size[1] != size[0] else ""),
        input_size=size,
        stem_channels=make_divisible(32 * width),
        blocks=tuple(blocks),
        head_channels=head,
        num_classes=num_classes,
    )
