"""Built-in networks: an IR `Graph` from an architecture config (`firmware.arch.NetConfig`).

The graph is MobileNetV2's layout: stem conv -> inverted-residual blocks ([1x1 expand ReLU6]
-> kxk depthwise ReLU6 -> 1x1 linear project [-> residual add]) -> 1x1 head ReLU6 -> global
average pool -> flatten -> classifier. Batch normalization is taken as already folded into
each conv's bias. Convs use torch's "same" padding: k // 2 on each side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from firmware.arch import BlockConfig, NetConfig, make_divisible, mobilenet_v2
from firmware.errors import InvalidModelError
from firmware.ir import Activation, Graph, Layer, OpKind, Tensor

FloatArray = npt.NDArray[np.float32]

INPUT_NAME = "input"


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


class _Builder:
    """Accumulates layers, tensors and parameter shapes in execution order."""

    def __init__(self, config: NetConfig) -> None:
        h, w = config.input_size
        self.tensors: dict[str, Tensor] = {INPUT_NAME: Tensor(INPUT_NAME, config.in_channels, h, w)}
        self.layers: list[Layer] = []
        self.param_shapes: dict[str, tuple[int, ...]] = {}

    def conv(self, name: str, src: str, out_channels: int, kernel: int, stride: int,
             groups: int, activation: Activation) -> str:
        x = self.tensors[src]
        pad = kernel // 2
        out = Tensor(name, out_channels, _conv_out(x.height, kernel, stride, pad),
                     _conv_out(x.width, kernel, stride, pad))
        if out.height < 1 or out.width < 1:
            raise InvalidModelError(f"layer {name}: input {x.height}x{x.width} too small for "
                                    f"kernel {kernel} stride {stride}")
        self.tensors[name] = out
        self.layers.append(Layer(
            name=name, op=OpKind.CONV, inputs=(src,), output=name, kernel=(kernel, kernel),
            stride=(stride, stride), padding=(pad, pad, pad, pad), groups=groups,
            activation=activation, weight=f"{name}.weight", bias=f"{name}.bias"))
        self.param_shapes[f"{name}.weight"] = (out_channels, x.channels // groups, kernel, kernel)
        self.param_shapes[f"{name}.bias"] = (out_channels,)
        return name

    def simple(self, name: str, op: OpKind, inputs: tuple[str, ...], out: Tensor) -> str:
        self.tensors[name] = out
        self.layers.append(Layer(name=name, op=op, inputs=inputs, output=name))
        return name

    def block(self, index: int, src: str, cfg: BlockConfig) -> str:
        x = self.tensors[src]
        hidden = x.channels * cfg.expand_ratio
        y = src
        if cfg.expand_ratio != 1:
            y = self.conv(f"b{index}.expand", y, hidden, 1, 1, 1, Activation.RELU6)
        y = self.conv(f"b{index}.dw", y, hidden, cfg.kernel, cfg.stride, hidden,
                      Activation.RELU6)
        y = self.conv(f"b{index}.project", y, cfg.out_channels, 1, 1, 1, Activation.NONE)
        shapes_match = cfg.stride == 1 and x.channels == cfg.out_channels
        residual = shapes_match if cfg.residual is None else cfg.residual
        if residual:
            if not shapes_match:
                raise InvalidModelError(
                    f"block b{index}: residual needs stride 1 and equal channels, got stride "
                    f"{cfg.stride}, {x.channels}->{cfg.out_channels}")
            add = f"b{index}.add"
            y = self.simple(add, OpKind.ADD, (src, y), Tensor(add, *self.tensors[y].shape))
        return y


def build_graph(config: NetConfig, params: Mapping[str, npt.NDArray[np.generic]] | None = None,
                seed: int | None = 0, *, with_weights: bool = True) -> Graph:
    """The IR graph of `config`; random He-initialized float32 weights unless `params` given.

    `with_weights=False` (and no `params`) builds a shape-only graph, which is all the memory
    planner needs and avoids drawing millions of random numbers.
    """
    b = _Builder(config)
    y = b.conv("stem", INPUT_NAME, config.stem_channels, config.stem_kernel,
               config.stem_stride, 1, Activation.RELU6)
    for i, block in enumerate(config.blocks):
        y = b.block(i, y, block)
    if config.head_channels:
        y = b.conv("head", y, config.head_channels, 1, 1, 1, Activation.RELU6)
    c = b.tensors[y].channels
    y = b.simple("pool", OpKind.GLOBAL_AVG_POOL, (y,), Tensor("pool", c, 1, 1))
    y = b.simple("flatten", OpKind.RESHAPE, (y,), Tensor("flatten", c, 1, 1))
    b.tensors["classifier"] = Tensor("classifier", config.num_classes, 1, 1)
    b.layers.append(Layer(name="classifier", op=OpKind.FULLY_CONNECTED, inputs=(y,),
                          output="classifier", weight="classifier.weight",
                          bias="classifier.bias"))
    b.param_shapes["classifier.weight"] = (config.num_classes, c)
    b.param_shapes["classifier.bias"] = (config.num_classes,)

    if params is not None:
        _check_params(params, b.param_shapes)
        values: Mapping[str, npt.NDArray[np.generic]] = MappingProxyType(dict(params))
    elif with_weights:
        values = MappingProxyType(dict(random_params(b.param_shapes, seed)))
    else:
        values = MappingProxyType({})
    return Graph(name=config.name, input=INPUT_NAME, output="classifier",
                 tensors=MappingProxyType(b.tensors), layers=tuple(b.layers), params=values)


def random_params(shapes: Mapping[str, tuple[int, ...]], seed: int | None) -> dict[str, FloatArray]:
    """He-normal weights (fan-in) and small random biases, float32, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    out: dict[str, FloatArray] = {}
    for name, shape in shapes.items():
        if name.endswith(".bias"):
            out[name] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            fan_in = math.prod(shape[1:])
            out[name] = (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)
    return out


def _check_params(params: Mapping[str, npt.NDArray[np.generic]],
                  shapes: Mapping[str, tuple[int, ...]]) -> None:
    for name, shape in shapes.items():
        if name not in params:
            raise InvalidModelError(f"parameter {name!r} missing (expected shape {shape})")
        if tuple(params[name].shape) != shape:
            raise InvalidModelError(f"parameter {name!r} has shape {tuple(params[name].shape)}, "
                                    f"expected {shape}")


# The receptive-field-redistributed MobileNetV2 (MCUNetV2 Section 3.2, "MbV2-RD"): the blocks
# at high resolution use 3x3 kernels with no stride-1 depthwise before 28x28 (input patch 63 for
# a 7x7 output patch at 224), and the receptive field is won back later with 5x5/7x7 kernels
# and the 24-channel block moved behind the patch stage. (kernel, t, first stride, c, n).
MOBILENETV2_RD_SETTINGS: tuple[tuple[int, int, int, int, int], ...] = (
    (3, 1, 2, 16, 1),
    (3, 6, 2, 24, 1),
    (5, 6, 1, 24, 1),
    (5, 6, 1, 32, 3),
    (5, 6, 2, 64, 4),
    (5, 6, 1, 96, 3),
    (7, 6, 2, 160, 3),
    (7, 6, 1, 320, 1),
)


def mobilenet_v2_rd(width: float = 1.0, resolution: int | tuple[int, int] = 224,
                    num_classes: int = 1000) -> NetConfig:
    """MobileNetV2 with its receptive field redistributed away from the patch stage."""
    size = (resolution, resolution) if isinstance(resolution, int) else resolution
    blocks: list[BlockConfig] = []
    for k, t, s, c, n in MOBILENETV2_RD_SETTINGS:
        out = make_divisible(c * width)
        for i in range(n):
            blocks.append(BlockConfig(kernel=k, expand_ratio=t, stride=s if i == 0 else 1,
                                      out_channels=out))
    return NetConfig(
        name=f"mobilenetv2-rd-w{width:g}-r{size[0]}" + (f"x{size[1]}" if size[1] != size[0]
                                                        else ""),
        input_size=size,
        stem_channels=make_divisible(32 * width),
        blocks=tuple(blocks),
        head_channels=make_divisible(1280 * max(1.0, width)),
        num_classes=num_classes,
    )


# Built-in network names accepted by `tinyfleet plan --builtin`.
BUILTIN_NETWORKS = ("mobilenetv2", "mobilenetv2-rd")


def builtin_config(name: str, width: float = 1.0, resolution: int | tuple[int, int] = 224,
                   num_classes: int = 1000) -> NetConfig:
    """The config of the built-in network `name` (one of BUILTIN_NETWORKS)."""
    if name == "mobilenetv2":
        return mobilenet_v2(width, resolution, num_classes)
    if name == "mobilenetv2-rd":
        return mobilenet_v2_rd(width, resolution, num_classes)
    raise InvalidModelError(f"unknown built-in network {name!r}; known: "
                            f"{', '.join(BUILTIN_NETWORKS)}")
