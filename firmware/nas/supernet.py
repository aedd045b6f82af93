"""A weight-sharing elastic supernet over a `SearchSpace`, and extraction of its subnets.

Weight sharing as in Once-for-All (Cai et al., ICLR 2020): a subnet uses the first channels
of every layer (channel slicing), the first `depth` blocks of every stage, and for a kernel
smaller than 7 the centre of the 7x7 depthwise kernel passed through a learned per-layer
transform matrix (7 -> 5 -> 3, identity at start). Batch norm keeps max-width statistics and
is sliced too; an extracted subnet re-estimates its own statistics (`recalibrate_bn`), because
shared statistics mix every subnet that ran through the layer.

`extract(supernet, config)` gives a standalone `SubnetModule` whose layers are exactly those of
`firmware.frontend.builtin.build_graph(config)`: stem, per block [expand] -> dw -> project [-> add],
[head], global pool, flatten, classifier.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from firmware.arch import BlockConfig, NetConfig
from firmware.nas.space import Arch, SearchSpace

BN_EPS = 1e-5


class DynamicBatchNorm(nn.BatchNorm2d):
    """Batch norm over the first `c` channels of a max-width layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        assert self.running_mean is not None and self.running_var is not None
        return F.batch_norm(x, self.running_mean[:c], self.running_var[:c], self.weight[:c],
                            self.bias[:c], self.training, self.momentum or 0.1, self.eps)


class DynamicPointwise(nn.Module):
    """A 1x1 conv (or the stem's kxk conv) sliced to the active in/out channels."""

    def __init__(self, in_max: int, out_max: int, kernel: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_max, in_max, kernel, kernel))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")
        self.stride = stride
        self.kernel = kernel

    def sliced(self, in_c: int, out_c: int) -> torch.Tensor:
        """Weight of the active slice, OIHW."""
        return self.weight[:out_c, :in_c]

    def forward(self, x: torch.Tensor, out_c: int) -> torch.Tensor:
        return F.conv2d(x, self.sliced(x.shape[1], out_c), None, self.stride, self.kernel // 2)


class DynamicDepthwise(nn.Module):
    """A depthwise conv whose kernel shrinks from the max by centre crop + learned transform."""

    def __init__(self, channels_max: int, kernels: tuple[int, ...], stride: int) -> None:
        super().__init__()
        self.kernels = kernels
        self.stride = stride
        k_max = kernels[-1]
        self.weight = nn.Parameter(torch.empty(channels_max, 1, k_max, k_max))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")
        # One matrix per step down (OFA "kernel transformation"), shared by all channels.
        self.transforms = nn.ParameterList(
            [nn.Parameter(torch.eye(k * k)) for k in kernels[:-1]]
        )

    def sliced(self, channels: int, kernel: int) -> torch.Tensor:
        """Weight (channels, 1, kernel, kernel) of the active subnet."""
        weight = self.weight[:channels]
        size = self.kernels[-1]
        for index in range(len(self.kernels) - 2, -1, -1):
            if size == kernel:
                break
            target = self.kernels[index]
            start = (size - target) // 2
            centre = weight[:, :, start:start + target, start:start + target]
            flat = centre.reshape(channels, target * target) @ self.transforms[index]
            weight = flat.reshape(channels, 1, target, target)
            size = target
        return weight

    def forward(self, x: torch.Tensor, kernel: int) -> torch.Tensor:
        c = x.shape[1]
        return F.conv2d(x, self.sliced(c, kernel), None, self.stride, kernel // 2, 1, c)


class DynamicBlock(nn.Module):
    """An elastic inverted-residual block: [1x1 expand] -> kxk depthwise -> 1x1 project."""

    def __init__(self, in_max: int, out_max: int, expand_max: int, kernels: tuple[int, ...],
                 stride: int, has_expand: bool = True) -> None:
        super().__init__()
        hidden_max = in_max * expand_max
        self.has_expand = has_expand
        if has_expand:
            self.expand = DynamicPointwise(in_max, hidden_max)
            self.expand_bn = DynamicBatchNorm(hidden_max, eps=BN_EPS)
        self.dw = DynamicDepthwise(hidden_max, kernels, stride)
        self.dw_bn = DynamicBatchNorm(hidden_max, eps=BN_EPS)
        self.project = DynamicPointwise(hidden_max, out_max)
        self.project_bn = DynamicBatchNorm(out_max, eps=BN_EPS)
        self.stride = stride
        if stride == 1 and in_max == out_max:
            # BigNAS: a residual block starts as the identity, so that a shallower subnet
            # (which skips it) computes what the deeper one does at first.
            nn.init.zeros_(self.project_bn.weight)

    def forward(self, x: torch.Tensor, block: BlockConfig) -> torch.Tensor:
        in_c = x.shape[1]
        y = x
        if block.expand_ratio > 1:
            y = F.relu6(self.expand_bn(self.expand(y, in_c * block.expand_ratio)))
        y = F.relu6(self.dw_bn(self.dw(y, block.kernel)))
        y = self.project_bn(self.project(y, block.out_channels))
        out: torch.Tensor = y + x if _residual(block, in_c) else y
        return out


def _residual(block: BlockConfig, in_channels: int) -> bool:
    if block.residual is not None:
        return block.residual
    return block.stride == 1 and in_channels == block.out_channels


class Supernet(nn.Module):
    """Every subnet of a SearchSpace in one module; `forward(x, arch)` runs one of them."""

    def __init__(self, space: SearchSpace) -> None:
        super().__init__()
        self.space = space
        widest = space.widths[-1]
        chans = space.block_channels(widest)
        stem_max = space.channels(space.stem_channels, widest)
        self.stem = DynamicPointwise(space.in_channels, stem_max, kernel=3, stride=2)
        self.stem_bn = DynamicBatchNorm(stem_max, eps=BN_EPS)
        self.first = DynamicBlock(stem_max, chans[0], 1, (3,), 1, has_expand=False)
        slots: list[DynamicBlock] = []
        in_max = chans[0]
        for s in range(space.num_stages):
            for j in range(space.max_depth):
                stride = space.stage_strides[s] if j == 0 else 1
                slots.append(DynamicBlock(in_max, chans[1 + s], space.expand_ratios[-1],
                                          space.kernels, stride))
                in_max = chans[1 + s]
        if space.last_block_channels:
            slots.append(DynamicBlock(in_max, chans[-1], space.expand_ratios[-1],
                                      space.kernels, 1))
            in_max = chans[-1]
        self.slots = nn.ModuleList(slots)
        if space.head_channels:
            self.head = DynamicPointwise(in_max, space.head_channels)
            self.head_bn = DynamicBatchNorm(space.head_channels, eps=BN_EPS)
            in_max = space.head_channels
        self.classifier = nn.Linear(in_max, space.num_classes)

    def forward(self, x: torch.Tensor, arch: Arch) -> torch.Tensor:
        config = self.space.to_config(arch)
        y = F.relu6(self.stem_bn(self.stem(x, config.stem_channels)))
        y = self.first(y, config.blocks[0])
        for slot, block in zip(self.space.active_slots(arch), config.blocks[1:], strict=True):
            y = self.slots[slot](y, block)
        if self.space.head_channels:
            y = F.relu6(self.head_bn(self.head(y, self.space.head_channels)))
        y = y.mean(dim=(2, 3))
        out: torch.Tensor = F.linear(y, self.classifier.weight[:, :y.shape[1]],
                                     self.classifier.bias)
        return out


class ConvBN(nn.Module):
    """conv -> batch norm -> optional ReLU6: one IR conv layer once BN is folded."""

    def __init__(self, conv: nn.Conv2d, relu6: bool) -> None:
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(conv.out_channels, eps=BN_EPS)
        self.relu6 = relu6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return F.relu6(y) if self.relu6 else y

    def folded(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """(weight OIHW, bias) with batch norm folded in, as float32 arrays."""
        assert self.bn.running_var is not None and self.bn.running_mean is not None
        scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        weight = self.conv.weight * scale[:, None, None, None]
        bias = self.bn.bias - self.bn.running_mean * scale
        return (weight.detach().numpy().astype(np.float32),
                bias.detach().numpy().astype(np.float32))


class SubnetBlock(nn.Module):
    """A static inverted-residual block of an extracted subnet."""

    def __init__(self, in_c: int, block: BlockConfig) -> None:
        super().__init__()
        hidden = in_c * block.expand_ratio
        self.expand = (ConvBN(nn.Conv2d(in_c, hidden, 1, bias=False), True)
                       if block.expand_ratio > 1 else None)
        self.dw = ConvBN(nn.Conv2d(hidden, hidden, block.kernel, block.stride,
                                   block.kernel // 2, groups=hidden, bias=False), True)
        self.project = ConvBN(nn.Conv2d(hidden, block.out_channels, 1, bias=False), False)
        self.residual = _residual(block, in_c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.dw(y))
        out: torch.Tensor = y + x if self.residual else y
        return out


class SubnetModule(nn.Module):
    """A standalone network of one NetConfig, layer for layer as `build_graph(config)`."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        self.config = config
        k = config.stem_kernel
        self.stem = ConvBN(nn.Conv2d(config.in_channels, config.stem_channels, k,
                                     config.stem_stride, k // 2, bias=False), True)
        blocks = []
        in_c = config.stem_channels
        for block in config.blocks:
            blocks.append(SubnetBlock(in_c, block))
            in_c = block.out_channels
        self.blocks = nn.ModuleList(blocks)
        self.head = (ConvBN(nn.Conv2d(in_c, config.head_channels, 1, bias=False), True)
                     if config.head_channels else None)
        self.classifier = nn.Linear(config.head_channels or in_c, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        for block in self.blocks:
            y = block(y)
        if self.head is not None:
            y = self.head(y)
        y = torch.flatten(F.adaptive_avg_pool2d(y, 1), 1)
        out: torch.Tensor = self.classifier(y)
        return out

    def conv_layers(self) -> Iterator[tuple[str, ConvBN]]:
        """(IR layer name, conv unit) in execution order, named as build_graph names them."""
        yield "stem", self.stem
        for i, block in enumerate(self.blocks):
            assert isinstance(block, SubnetBlock)
            if block.expand is not None:
                yield f"b{i}.expand", block.expand
            yield f"b{i}.dw", block.dw
            yield f"b{i}.project", block.project
        if self.head is not None:
            yield "head", self.head

    def folded_params(self) -> dict[str, npt.NDArray[np.float32]]:
        """Float32 params with BN folded, keyed "{layer}.weight"/"{layer}.bias" as the IR."""
        params: dict[str, npt.NDArray[np.float32]] = {}
        for name, unit in self.conv_layers():
            params[f"{name}.weight"], params[f"{name}.bias"] = unit.folded()
        params["classifier.weight"] = self.classifier.weight.detach().numpy().astype(np.float32)
        params["classifier.bias"] = self.classifier.bias.detach().numpy().astype(np.float32)
        return params


def _copy_bn(dst: nn.BatchNorm2d, src: DynamicBatchNorm) -> None:
    c = dst.num_features
    assert src.running_mean is not None and src.running_var is not None
    assert dst.running_mean is not None and dst.running_var is not None
    dst.weight.copy_(src.weight[:c])
    dst.bias.copy_(src.bias[:c])
    dst.running_mean.copy_(src.running_mean[:c])
    dst.running_var.copy_(src.running_var[:c])


def _copy_block(dst: SubnetBlock, src: DynamicBlock, in_c: int, block: BlockConfig) -> None:
    hidden = in_c * block.expand_ratio
    if dst.expand is not None:
        dst.expand.conv.weight.copy_(src.expand.sliced(in_c, hidden))
        _copy_bn(dst.expand.bn, src.expand_bn)
    dst.dw.conv.weight.copy_(src.dw.sliced(hidden, block.kernel))
    _copy_bn(dst.dw.bn, src.dw_bn)
    dst.project.conv.weight.copy_(src.project.sliced(hidden, block.out_channels))
    _copy_bn(dst.project.bn, src.project_bn)


@torch.no_grad()
def extract(supernet: Supernet, config: NetConfig | Arch) -> SubnetModule:
    """The subnet `config` as a standalone module holding copies of the shared weights."""
    space = supernet.space
    arch = config if isinstance(config, Arch) else space.arch_of(config)
    net_config = space.to_config(arch)
    module = SubnetModule(net_config)
    module.stem.conv.weight.copy_(supernet.stem.sliced(space.in_channels,
                                                        net_config.stem_channels))
    _copy_bn(module.stem.bn, supernet.stem_bn)
    sources = [supernet.first, *(supernet.slots[s] for s in space.active_slots(arch))]
    in_c = net_config.stem_channels
    for dst, src, block in zip(module.blocks, sources, net_config.blocks, strict=True):
        assert isinstance(dst, SubnetBlock) and isinstance(src, DynamicBlock)
        _copy_block(dst, src, in_c, block)
        in_c = block.out_channels
    if module.head is not None:
        module.head.conv.weight.copy_(supernet.head.sliced(in_c, module.head.conv.out_channels))
        _copy_bn(module.head.bn, supernet.head_bn)
        in_c = module.head.conv.out_channels
    module.classifier.weight.copy_(supernet.classifier.weight[:, :in_c])
    module.classifier.bias.copy_(supernet.classifier.bias)
    module.eval()
    return module


@torch.no_grad()
def recalibrate_bn(module: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate every batch norm's statistics from `batches` (exact average); images seen."""
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # None: cumulative average over all batches, not an EMA
    module.train()
    seen = 0
    for x in batches:
        module(x)
        seen += int(x.shape[0])
    for m, momentum in zip(norms, saved, strict=True):
        m.momentum = momentum
    module.eval()
    if seen == 0:
        raise ValueError("recalibrate_bn needs at least one batch")
    return seen


def export_onnx(module: SubnetModule, path: str | Path, batch_size: int = 1) -> Path:
    """Write `module` as ONNX (opset 17, TorchScript exporter) for input N x C x H x W."""
    config = module.config
    dummy = torch.zeros(batch_size, config.in_channels, *config.input_size)
    target = Path(path)
    module.eval()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, which needs onnxscript.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, (dummy,), str(target), input_names=["input"],
                          output_names=["logits"], opset_version=17, dynamo=False)
    return target
