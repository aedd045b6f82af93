"""Options, loaders and formatting shared by the commands (plan, compile, search)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from firmware.errors import FirmwareError
from firmware.ir import Graph
from firmware.targets import KIB, Cpu, TargetSpec, custom_target, get_target, parse_size

F = TypeVar("F", bound=Callable[..., Any])


class SizeType(click.ParamType[int, Any]):
    """A byte size: 262144, 256KiB, 256kB, 1MiB (k and M are 1024-based)."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeType()


def target_options(func: F) -> F:
    """Add --mcu, --sram, --flash and --cpu; resolve them with `resolve_target`."""
    decorators = [
        click.option("--mcu", help="an MCU of the catalog (see `tinyfleet mcus`)"),
        click.option("--sram", type=SIZE, help="SRAM size, e.g. 256KiB (overrides --mcu's)"),
        click.option("--flash", type=SIZE, help="Flash size, e.g. 1MiB (overrides --mcu's)"),
        click.option("--cpu", type=click.Choice([c.value for c in Cpu]),
                     help="core (overrides --mcu's)"),
    ]
    for decorate in reversed(decorators):
        func = decorate(func)
    return func


def resolve_target(mcu: str | None, sram: int | None, flash: int | None,
                   cpu: str | None) -> TargetSpec:
    """A catalog MCU (sizes/core optionally overridden) or a custom one from all three."""
    if mcu is not None:
        try:
            spec = get_target(mcu)
        except FirmwareError as exc:
            raise click.BadParameter(str(exc), param_hint="--mcu") from None
        changes: dict[str, Any] = {}
        if sram is not None:
            changes["sram_bytes"] = sram
        if flash is not None:
            changes["flash_bytes"] = flash
        if cpu is not None:
            changes["cpu"] = Cpu(cpu)
        return dataclasses.replace(spec, **changes) if changes else spec
    if sram is None or flash is None or cpu is None:
        raise click.UsageError("give --mcu NAME, or all of --sram, --flash and --cpu")
    try:
        return custom_target(sram, flash, cpu)
    except FirmwareError as exc:
        raise click.UsageError(str(exc)) from None


def kb(n: int | float) -> str:
    """Bytes as kB (1024 bytes, as in the MCUNet papers) with one decimal."""
    return f"{n / KIB:,.1f} kB"


def parse_patches(ctx: click.Context, param: click.Parameter, value: str) -> int | None:
    """--patches: None for auto, else a patch count 1..64."""
    if value == "auto":
        return None
    if not value.isdigit() or not 1 <= int(value) <= 64:
        raise click.BadParameter(f"{value!r}: use auto or a patch count 1..64")
    return int(value)


def load_graph(model: str | None, builtin: str | None, width: float,
               resolution: tuple[int, int] | None, with_weights: bool = True,
               num_classes: int | None = None) -> Graph:
    """MODEL.onnx's graph, or a built-in network (random He weights, or shapes only).

    `resolution` and `num_classes` None are the built-in network's own.
    """
    if (model is None) == (builtin is None):
        raise click.UsageError("give either MODEL.onnx or --builtin NAME")
    if builtin is not None:
        from firmware.frontend.builtin import build_graph, builtin_config

        return build_graph(builtin_config(builtin, width, resolution, num_classes),
                           with_weights=with_weights)
    from firmware.frontend.onnx_import import import_onnx  # onnx is only needed for files

    return import_onnx(Path(str(model)))
