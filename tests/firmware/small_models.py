"""Small deterministic networks for the int8 reference, codegen and golden-file tests."""

from __future__ import annotations

import numpy as np

from firmware.arch import BlockConfig, NetConfig
from firmware.frontend.builtin import build_graph
from firmware.int8.quantize import QuantizedGraph, quantize_graph
from firmware.ir import Graph

# Every kernel the code generator emits: stem conv s2, an expand-less block, expand/dw/project
# with stride 2, two residual blocks (fused 1x1 + add), a 5x5 depthwise, head, pool, fc.
TINY = NetConfig(
    name="tiny", input_size=(16, 16), stem_channels=8,
    blocks=(BlockConfig(3, 1, 1, 8), BlockConfig(3, 3, 2, 12), BlockConfig(3, 3, 1, 12),
            BlockConfig(5, 2, 1, 12)),
    head_channels=24, num_classes=10)


def tiny_graph(seed: int = 0) -> Graph:
    """TINY with He-initialized weights from `seed`."""
    return build_graph(TINY, seed=seed)


def tiny_quantized(seed: int = 0) -> QuantizedGraph:
    """TINY quantized on 16 fixed calibration images."""
    graph = tiny_graph(seed)
    calib = np.random.default_rng(seed).standard_normal((16, 3, 16, 16)).astype(np.float32)
    return quantize_graph(graph, calib)


def tiny_inputs(qgraph: QuantizedGraph, count: int, seed: int = 1) -> np.ndarray:
    """int8 NCHW test inputs."""
    x = np.random.default_rng(seed).standard_normal((count, 3, 16, 16)).astype(np.float32)
    return qgraph.input.quantize(x)


def small_rd_quantized(seed: int = 0) -> QuantizedGraph:
    """MobileNetV2-RD w0.35 at 32x32, 10 classes, head 64: 65 layers, quantized.

    Patch-based with 2x2 patches to b1.project, its stage and rest are laid out best by one
    joint arena plan (firmware.plan.arena.arena_layout).
    """
    import dataclasses

    from firmware.frontend.builtin import builtin_config

    config = dataclasses.replace(builtin_config("mobilenetv2-rd", 0.35, 32, num_classes=10),
                                 head_channels=64)
    graph = build_graph(config, seed=seed)
    calib = np.random.default_rng(seed).standard_normal((8, 3, 32, 32)).astype(np.float32)
    return quantize_graph(graph, calib)
