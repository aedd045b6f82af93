"""Built-in networks: an IR `Graph` from an architecture config (`firmware.arch.NetConfig`).

The graph is MobileNetV2's layout: stem conv -> inverted-residual blocks ([1x1 expand ReLU6]
-> kxk depthwise ReLU6 -> 1x1 linear project [-> residual add]) -> 1x1 head ReLU6 -> global
average pool -> flatten -> classifier. Batch normalization is taken as already folded into
each conv's bias. Convs use torch's "same" padding: k // 2 on each side.

Besides MobileNetV2 and its receptive-field-redistributed variant, published block lists
(the MCUNet model zoo's JSON format, see `config_from_block_list`) are built-in networks: every
`networks/*.json` file beside this module is one, named by its "name" field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

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


# --- published block lists (the MCUNet model zoo's format) --------------------------------

NETWORKS_DIR = Path(__file__).resolve().parent / "networks"


def _ints(value: Any, count: int, what: str) -> list[int]:
    if (not isinstance(value, Sequence) or isinstance(value, str) or len(value) != count
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise InvalidModelError(f"{what} must be a list of {count} integers, got {value!r}")
    return list(value)


def _block(index: int, entry: Any, in_channels: int, name: str) -> BlockConfig:
    """One `[in_ch, out_ch, kernel, stride, expand_ratio, mid_channels_or_null, residual]`."""
    what = f"{name}: block {index}"
    if not isinstance(entry, Sequence) or len(entry) != 7:
        raise InvalidModelError(f"{what} must be [in_ch, out_ch, kernel, stride, expand_ratio, "
                                f"mid_channels_or_null, residual], got {entry!r}")
    cin, cout, kernel, stride, expand = _ints(entry[:5], 5, what)
    mid, residual = entry[5], entry[6]
    if cin != in_channels:
        raise InvalidModelError(f"{what} reads {cin} channels, the layer before writes "
                                f"{in_channels}")
    if min(cout, kernel, stride, expand) < 1 or kernel % 2 == 0:
        raise InvalidModelError(f"{what}: channels, stride and expand ratio must be >= 1 and "
                                f"the kernel odd, got {entry!r}")
    # BlockConfig derives the hidden width as in_ch * expand_ratio; a list whose mid channels
    # say otherwise describes a net this config cannot build: refuse rather than change it.
    hidden = cin * expand
    if mid is not None and mid != hidden:
        raise InvalidModelError(f"{what}: mid channels {mid} != in_ch {cin} x expand ratio "
                                f"{expand} = {hidden} (not representable)")
    if residual not in (0, 1, True, False):
        raise InvalidModelError(f"{what}: residual must be 0 or 1, got {residual!r}")
    if residual and (stride != 1 or cin != cout):
        raise InvalidModelError(f"{what}: residual needs stride 1 and in_ch == out_ch, got "
                                f"stride {stride}, {cin}->{cout}")
    return BlockConfig(kernel=kernel, expand_ratio=expand, stride=stride, out_channels=cout,
                       residual=bool(residual))


def config_from_block_list(doc: Mapping[str, Any],
                           resolution: int | tuple[int, int] | None = None,
                           num_classes: int | None = None) -> NetConfig:
    """The NetConfig of a published block list (`../shared/models/*.json`'s format).

    Keys: `name`; `resolution` (int or [h, w], the default input size); `first_conv` =
    [in_ch, out_ch, kernel, stride]; `blocks` = [[in_ch, out_ch, kernel, stride,
    expand_ratio, mid_channels_or_null, residual(0/1)], ...] (inverted residuals: 1x1 expand
    unless expand_ratio is 1, kxk depthwise, 1x1 linear project; ReLU6); `feature_mix` = null,
    out_ch or [in_ch, out_ch] (the 1x1 head conv); `classes`. Channel counts are checked from
    block to block; anything the config cannot represent raises InvalidModelError.
    """
    name = doc.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidModelError("block list: 'name' must be a non-empty string")
    for key in ("first_conv", "blocks", "classes"):
        if key not in doc:
            raise InvalidModelError(f"{name}: block list has no {key!r}")
    stem_in, stem_out, stem_kernel, stem_stride = _ints(doc["first_conv"], 4,
                                                        f"{name}: first_conv")
    blocks_doc = doc["blocks"]
    if not isinstance(blocks_doc, Sequence) or not blocks_doc:
        raise InvalidModelError(f"{name}: 'blocks' must be a non-empty list")
    channels = stem_out
    blocks = []
    for i, entry in enumerate(blocks_doc):
        block = _block(i, entry, channels, name)
        blocks.append(block)
        channels = block.out_channels
    mix = doc.get("feature_mix")
    head: int | None = None
    if mix is not None:
        if isinstance(mix, int) and not isinstance(mix, bool):
            head = mix
        else:
            mix_in, head = _ints(mix, 2, f"{name}: feature_mix")
            if mix_in != channels:
                raise InvalidModelError(f"{name}: feature_mix reads {mix_in} channels, the "
                                        f"last block writes {channels}")
    size = resolution if resolution is not None else doc.get("resolution")
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if size is None:
        raise InvalidModelError(f"{name}: no resolution in the block list; pass one")
    h, w = _ints(size, 2, f"{name}: resolution")
    classes = num_classes if num_classes is not None else doc["classes"]
    if not isinstance(classes, int) or classes < 1:
        raise InvalidModelError(f"{name}: classes must be a positive integer, got {classes!r}")
    suffix = "" if resolution is None else f"-r{h}" + (f"x{w}" if w != h else "")
    return NetConfig(name=f"{name}{suffix}", input_size=(h, w), stem_channels=stem_out,
                     blocks=tuple(blocks), head_channels=head, num_classes=classes,
                     in_channels=stem_in, stem_kernel=stem_kernel, stem_stride=stem_stride)


def load_block_list(path: str | Path) -> dict[str, Any]:
    """A block-list JSON file as a dict (InvalidModelError naming the file if unreadable)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidModelError(f"block list {path}: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidModelError(f"block list {path}: not a JSON object")
    return doc


def block_list_networks() -> dict[str, Path]:
    """Built-in block-list networks: name -> JSON file under NETWORKS_DIR."""
    found: dict[str, Path] = {}
    for path in sorted(NETWORKS_DIR.glob("*.json")):
        found[str(load_block_list(path).get("name", path.stem))] = path
    return found


# ProxylessNAS-Mobile (Cai et al., ICLR 2019, Fig. 4 / the released proxyless_mobile config):
# (kernel, expand ratio, stride, channels) per block after the fixed MB1 3x3 first block; the
# searched-away ("zero") blocks are left out. Stem 32, head (feature mix) 1280 at width <= 1.
PROXYLESS_MOBILE_BLOCKS: tuple[tuple[int, int, int, int], ...] = (
    (5, 3, 2, 32), (3, 3, 1, 32),
    (7, 3, 2, 40), (3, 3, 1, 40), (5, 3, 1, 40), (5, 3, 1, 40),
    (7, 6, 2, 80), (5, 3, 1, 80), (5, 3, 1, 80), (5, 3, 1, 80),
    (5, 6, 1, 96), (5, 3, 1, 96), (5, 3, 1, 96), (5, 3, 1, 96),
    (7, 6, 2, 192), (7, 6, 1, 192), (7, 3, 1, 192), (7, 3, 1, 192),
    (7, 6, 1, 320),
)


def proxyless_mobile(width: float = 1.0, resolution: int | tuple[int, int] = 224,
                     num_classes: int = 1000) -> NetConfig:
    """ProxylessNAS-Mobile at a width multiplier (the training paper's ProxylessNAS-w0.3)."""
    size = (resolution, resolution) if isinstance(resolution, int) else resolution
    blocks = [BlockConfig(kernel=3, expand_ratio=1, stride=1,
                          out_channels=make_divisible(16 * width))]
    blocks += [BlockConfig(kernel=k, expand_ratio=t, stride=s,
                           out_channels=make_divisible(c * width))
               for k, t, s, c in PROXYLESS_MOBILE_BLOCKS]
    return NetConfig(
        name=f"proxylessnas-w{width:g}-r{size[0]}" + (f"x{size[1]}" if size[1] != size[0]
                                                      else ""),
        input_size=size, stem_channels=make_divisible(32 * width), blocks=tuple(blocks),
        head_channels=make_divisible(1280 * width) if width > 1.0 else 1280,
        num_classes=num_classes)


# Built-in network names accepted by `tinyfleet plan --builtin`: MobileNetV2, its RD variant,
# ProxylessNAS-Mobile, and every block list in networks/.
BUILTIN_NETWORKS = ("mobilenetv2", "mobilenetv2-rd", "proxylessnas", *block_list_networks())


def builtin_config(name: str, width: float = 1.0,
                   resolution: int | tuple[int, int] | None = None,
                   num_classes: int | None = None) -> NetConfig:
    """The config of the built-in network `name` (one of BUILTIN_NETWORKS).

    `resolution` None is the network's own default (224 for MobileNetV2, the block list's
    for the others); `num_classes` None is 1000 or the block list's. A published block list
    has fixed channel counts: any width but 1.0 is refused.
    """
    if name in ("mobilenetv2", "mobilenetv2-rd", "proxylessnas"):
        size = 224 if resolution is None else resolution
        classes = 1000 if num_classes is None else num_classes
        build = {"mobilenetv2": mobilenet_v2, "mobilenetv2-rd": mobilenet_v2_rd,
                 "proxylessnas": proxyless_mobile}[name]
        return build(width, size, classes)
    networks = block_list_networks()
    if name in networks:
        if width != 1.0:
            raise InvalidModelError(f"{name} is a published architecture with fixed channel "
                                    f"counts: width {width:g} is not available (use 1.0)")
        return config_from_block_list(load_block_list(networks[name]), resolution, num_classes)
    raise InvalidModelError(f"unknown built-in network {name!r}; known: "
                            f"{', '.join(BUILTIN_NETWORKS)}")
