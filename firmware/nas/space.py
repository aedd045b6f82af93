"""The MCUNetV2 search space: elastic kernel, expand ratio, depth, width and resolution.

An `Arch` is one point of a `SearchSpace` (the genes the evolutionary search mutates); the
space turns it into a `firmware.arch.NetConfig`, the config type the planner and the compiler
read, and parses a NetConfig back. The layout follows MCUNet's OFA space ("mcunet384"): stem
conv 3x3 s2, a fixed first block (t=1, k=3), five stages of 2-4 elastic blocks, one elastic
last block, a 1x1 head conv whose width does not scale, global pooling and a classifier.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from dataclasses import asdict, dataclass
from typing import Any

from firmware.arch import BlockConfig, NetConfig, make_divisible
from firmware.errors import FirmwareError


class SpaceError(FirmwareError):
    """A search space is malformed, or a config is not a member of it."""


@dataclass(frozen=True)
class SearchSpace:
    """Choices per block (kernel, expand ratio), per stage (depth) and per net (width, size)."""

    name: str
    resolutions: tuple[int, ...]
    num_classes: int
    in_channels: int = 3
    widths: tuple[float, ...] = (0.5, 0.75, 1.0)
    kernels: tuple[int, ...] = (3, 5, 7)
    expand_ratios: tuple[int, ...] = (3, 4, 6)
    depths: tuple[int, ...] = (2, 3, 4)
    stem_channels: int = 32
    first_block_channels: int = 16
    stage_channels: tuple[int, ...] = (24, 40, 80, 96, 192)
    stage_strides: tuple[int, ...] = (2, 2, 2, 1, 2)
    last_block_channels: int | None = 320
    head_channels: int | None = 384

    def __post_init__(self) -> None:
        for field_name in ("resolutions", "widths", "kernels", "expand_ratios", "depths"):
            values = getattr(self, field_name)
            if not values or tuple(sorted(set(values))) != tuple(values):
                raise SpaceError(f"space {self.name}: {field_name} {values} must be non-empty, "
                                 "sorted and without repeats")
        if len(self.stage_channels) != len(self.stage_strides):
            raise SpaceError(f"space {self.name}: {len(self.stage_channels)} stage widths but "
                             f"{len(self.stage_strides)} stage strides")
        if any(k % 2 == 0 for k in self.kernels):
            raise SpaceError(f"space {self.name}: kernels {self.kernels} must be odd")

    # -- shape of the space ------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        """Number of depth-elastic stages."""
        return len(self.stage_channels)

    @property
    def max_depth(self) -> int:
        """Most blocks a stage can have."""
        return self.depths[-1]

    @property
    def num_slots(self) -> int:
        """Elastic block slots: every stage's maximum depth, plus the last block."""
        return self.num_stages * self.max_depth + (1 if self.last_block_channels else 0)

    def channels(self, base: int, width: float) -> int:
        """Channels of a layer whose width-1.0 count is `base`."""
        return make_divisible(base * width)

    def block_channels(self, width: float) -> tuple[int, ...]:
        """Output channels of: the first block, each stage, the last block (if any)."""
        chans = [self.channels(self.first_block_channels, width)]
        chans += [self.channels(c, width) for c in self.stage_channels]
        if self.last_block_channels:
            chans.append(self.channels(self.last_block_channels, width))
        return tuple(chans)

    # -- points of the space ------------------------------------------------------------------
    def largest(self) -> Arch:
        """The subnet with every choice at its maximum."""
        return Arch(self.resolutions[-1], self.widths[-1], (self.depths[-1],) * self.num_stages,
                    (self.kernels[-1],) * self.num_slots,
                    (self.expand_ratios[-1],) * self.num_slots)

    def smallest(self) -> Arch:
        """The subnet with every choice at its minimum."""
        return Arch(self.resolutions[0], self.widths[0], (self.depths[0],) * self.num_stages,
                    (self.kernels[0],) * self.num_slots, (self.expand_ratios[0],) * self.num_slots)

    def sample(self, rng: random.Random) -> Arch:
        """A uniformly random subnet (every gene drawn independently)."""
        return Arch(
            resolution=rng.choice(self.resolutions),
            width=rng.choice(self.widths),
            depths=tuple(rng.choice(self.depths) for _ in range(self.num_stages)),
            kernels=tuple(rng.choice(self.kernels) for _ in range(self.num_slots)),
            expands=tuple(rng.choice(self.expand_ratios) for _ in range(self.num_slots)),
        )

    def sample_config(self, rng: random.Random) -> NetConfig:
        """A uniformly random subnet as a NetConfig."""
        return self.to_config(self.sample(rng))

    def active_slots(self, arch: Arch) -> tuple[int, ...]:
        """The slots of `arch` that hold a block, in execution order."""
        slots = [s * self.max_depth + j for s, d in enumerate(arch.depths) for j in range(d)]
        if self.last_block_channels:
            slots.append(self.num_stages * self.max_depth)
        return tuple(slots)

    def check(self, arch: Arch) -> None:
        """Raise SpaceError unless every gene of `arch` is a choice of this space."""
        problems = []
        if arch.resolution not in self.resolutions:
            problems.append(f"resolution {arch.resolution} not in {self.resolutions}")
        if arch.width not in self.widths:
            problems.append(f"width {arch.width} not in {self.widths}")
        if len(arch.depths) != self.num_stages or any(d not in self.depths for d in arch.depths):
            problems.append(f"depths {arch.depths} not {self.num_stages} of {self.depths}")
        if len(arch.kernels) != self.num_slots or any(k not in self.kernels for k in arch.kernels):
            problems.append(f"kernels {arch.kernels} not {self.num_slots} of {self.kernels}")
        if (len(arch.expands) != self.num_slots
                or any(e not in self.expand_ratios for e in arch.expands)):
            problems.append(f"expands {arch.expands} not {self.num_slots} of "
                            f"{self.expand_ratios}")
        if problems:
            raise SpaceError(f"space {self.name}: " + "; ".join(problems))

    def canonical(self, arch: Arch) -> Arch:
        """`arch` with the genes of inactive slots reset, so equal networks compare equal."""
        active = set(self.active_slots(arch))
        kernels = tuple(k if i in active else self.kernels[0] for i, k in enumerate(arch.kernels))
        expands = tuple(e if i in active else self.expand_ratios[0]
                        for i, e in enumerate(arch.expands))
        return Arch(arch.resolution, arch.width, arch.depths, kernels, expands)

    # -- conversion to and from NetConfig ------------------------------------------------------
    def to_config(self, arch: Arch) -> NetConfig:
        """The NetConfig of subnet `arch` (what `firmware.frontend.builtin.build_graph` reads)."""
        self.check(arch)
        chans = self.block_channels(arch.width)
        blocks = [BlockConfig(kernel=3, expand_ratio=1, stride=1, out_channels=chans[0])]
        for s, depth in enumerate(arch.depths):
            for j in range(depth):
                slot = s * self.max_depth + j
                blocks.append(BlockConfig(
                    kernel=arch.kernels[slot], expand_ratio=arch.expands[slot],
                    stride=self.stage_strides[s] if j == 0 else 1, out_channels=chans[1 + s]))
        if self.last_block_channels:
            slot = self.num_stages * self.max_depth
            blocks.append(BlockConfig(kernel=arch.kernels[slot], expand_ratio=arch.expands[slot],
                                      stride=1, out_channels=chans[-1]))
        return NetConfig(
            name=f"{self.name}-{arch.tag()}",
            input_size=(arch.resolution, arch.resolution),
            stem_channels=self.channels(self.stem_channels, arch.width),
            blocks=tuple(blocks),
            head_channels=self.head_channels,
            num_classes=self.num_classes,
            in_channels=self.in_channels,
        )

    def arch_of(self, config: NetConfig) -> Arch:
        """The Arch whose NetConfig is `config`; SpaceError when it is not in this space."""
        height, width_px = config.input_size
        for width in self.widths:
            if self.channels(self.stem_channels, width) != config.stem_channels:
                continue
            arch = self._parse_blocks(config, width, height)
            if arch is not None and self.to_config(arch).blocks == config.blocks:
                if height != width_px:
                    break
                return arch
        raise SpaceError(f"config {config.name} is not a subnet of space {self.name} "
                         f"(input {config.input_size}, stem {config.stem_channels}, "
                         f"{len(config.blocks)} blocks)")

    def _parse_blocks(self, config: NetConfig, width: float, resolution: int) -> Arch | None:
        # Stages may share a width (a stride-1 stage, or rounding at width 0.5), so try every
        # depth tuple and keep the first whose (stride, channels) sequence matches.
        chans = self.block_channels(width)
        structure = [(b.stride, b.out_channels) for b in config.blocks[1:]]
        n_last = 1 if self.last_block_channels else 0
        for depths in itertools.product(self.depths, repeat=self.num_stages):
            if sum(depths) + n_last != len(structure):
                continue
            expected = [(self.stage_strides[s] if j == 0 else 1, chans[1 + s])
                        for s, d in enumerate(depths) for j in range(d)]
            if n_last:
                expected.append((1, chans[-1]))
            if expected != structure:
                continue
            kernels = [self.kernels[0]] * self.num_slots
            expands = [self.expand_ratios[0]] * self.num_slots
            slots = self.active_slots(Arch(resolution, width, depths, (), ()))
            for slot, block in zip(slots, config.blocks[1:], strict=True):
                kernels[slot], expands[slot] = block.kernel, block.expand_ratio
            arch = Arch(resolution, width, depths, tuple(kernels), tuple(expands))
            try:
                self.check(arch)
            except SpaceError:
                return None
            return arch
        return None

    # -- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchSpace:
        """The space a `to_dict` produced (lists become tuples)."""
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                  for k, v in data.items()}
        try:
            return cls(**fields)
        except TypeError as exc:
            raise SpaceError(f"malformed search space {data!r}: {exc}") from None


@dataclass(frozen=True)
class Arch:
    """One subnet's genes. `kernels`/`expands` hold one entry per slot (stage s, block j at
    s * max_depth + j; the last block last); slots beyond a stage's depth are inactive."""

    resolution: int
    width: float
    depths: tuple[int, ...]
    kernels: tuple[int, ...]
    expands: tuple[int, ...]

    def tag(self) -> str:
        """A short stable name: resolution, width and a digest of the block genes."""
        genes = f"{self.depths}{self.kernels}{self.expands}".encode()
        return f"r{self.resolution}-w{self.width:g}-{hashlib.sha256(genes).hexdigest()[:8]}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Arch:
        """The Arch a `to_dict` produced."""
        return cls(int(data["resolution"]), float(data["width"]), tuple(data["depths"]),
                   tuple(data["kernels"]), tuple(data["expands"]))


def mcunet_space(num_classes: int = 1000, in_channels: int = 3,
                 resolutions: tuple[int, ...] = tuple(range(96, 257, 16)),
                 name: str = "mcunetv2") -> SearchSpace:
    """The MCUNetV2 ImageNet space (OFA's "mcunet384" widths), at a set of resolutions."""
    return SearchSpace(name=name, resolutions=resolutions, num_classes=num_classes,
                       in_channels=in_channels)


def compact_space(num_classes: int, in_channels: int, resolutions: tuple[int, ...],
                  name: str = "mcunetv2-compact") -> SearchSpace:
    """The MCUNetV2 space at half the base widths: same choices, trainable on 2 CPU cores."""
    return SearchSpace(name=name, resolutions=resolutions, num_classes=num_classes,
                       in_channels=in_channels, stem_channels=16, first_block_channels=8,
                       stage_channels=(16, 24, 40, 56, 96), last_block_channels=160,
                       head_channels=192)
