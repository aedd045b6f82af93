"""How a model fits a device: the one SRAM account and the Flash slot, as the device page
draws them.

The report has the keys of a search pick's memory report (`Candidate.memory_report`, which
campaigns store per hardware class): `sram` (the account by part: arena, scratch, static,
stack, training), `sram_bytes` (the device's), `weights_bytes`, `code_bytes`, `slot_bytes`,
the schedule; plus `fits` and `why_not`. The page's chart reads only those keys, so a stored
report (a campaign's fit check, a compile report's predicted part) draws the same way.

Here the model is a built-in network the viewer picks, planned for the device's SRAM and core
by `firmware.plan.account.fit_schedule` (the schedule with the fewest MACs whose account
fits, else the smallest account and why it does not fit). Code size is the search's estimate
until a build measures it (`code_estimated`). Reports are cached per (model, device class):
a plan takes 10-300 ms and a fleet has few classes.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from firmware.errors import FirmwareError
from firmware.frontend.builtin import BUILTIN_NETWORKS, build_graph, builtin_config
from firmware.nas.search import code_bytes_estimate
from firmware.plan.account import SramDoesNotFitError, fit_schedule
from firmware.plan.memory import analyze
from firmware.targets import KIB, Cpu
from service.problems import ApiError, FieldError

DEFAULT_MODEL = "mcunet-5fps"
WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.4)
MIN_RESOLUTION, MAX_RESOLUTION = 32, 320
MAX_CLASSES = 1000


@dataclass(frozen=True)
class ModelChoice:
    """A built-in network at a width, resolution and class count (None: its own)."""

    name: str = DEFAULT_MODEL
    width: float = 1.0
    resolution: int | None = None
    classes: int | None = None

    def args(self) -> dict[str, str]:
        """The query string that selects this model."""
        out = {"model": self.name, "width": f"{self.width:g}"}
        if self.resolution is not None:
            out["resolution"] = str(self.resolution)
        if self.classes is not None:
            out["classes"] = str(self.classes)
        return out


def _int_arg(args: Mapping[str, str], name: str, low: int, high: int,
             errors: list[FieldError]) -> int | None:
    raw = (args.get(name) or "").strip()
    if not raw:
        return None
    if not raw.isdigit() or not low <= int(raw) <= high:
        errors.append(FieldError(name, f"a whole number from {low} to {high}, got {raw[:20]!r}"))
        return None
    return int(raw)


def parse_model_choice(args: Mapping[str, str]) -> ModelChoice:
    """The model named by the page's query string; ApiError 422 naming each bad field."""
    errors: list[FieldError] = []
    name = (args.get("model") or DEFAULT_MODEL).strip()
    if name not in BUILTIN_NETWORKS:
        errors.append(FieldError("model", f"unknown built-in network {name[:40]!r}; known: "
                                          f"{', '.join(BUILTIN_NETWORKS)}"))
    width = 1.0
    raw_width = (args.get("width") or "").strip()
    if raw_width:
        try:
            width = float(raw_width)
        except ValueError:
            width = -1.0
        if width not in WIDTHS:
            errors.append(FieldError("width", f"one of {', '.join(map(str, WIDTHS))}"))
    resolution = _int_arg(args, "resolution", MIN_RESOLUTION, MAX_RESOLUTION, errors)
    classes = _int_arg(args, "classes", 2, MAX_CLASSES, errors)
    if errors:
        raise ApiError(422, "; ".join(f"{e.field}: {e.message}" for e in errors), errors)
    return ModelChoice(name, width, resolution, classes)


def fit_report(choice: ModelChoice, sram_bytes: int, slot_bytes: int, cpu: Cpu
               ) -> dict[str, Any]:
    """The memory report of `choice` planned for a device; ApiError 422 for a model that
    cannot be built (a published block list at another width)."""
    try:
        return dict(_fit_report(choice, sram_bytes, slot_bytes, cpu))
    except FirmwareError as err:
        raise ApiError(422, f"model: {err}", [FieldError("model", str(err))]) from None


@functools.lru_cache(maxsize=256)
def _fit_report(choice: ModelChoice, sram_bytes: int, slot_bytes: int, cpu: Cpu
                ) -> Mapping[str, Any]:
    config = builtin_config(choice.name, choice.width, choice.resolution, choice.classes)
    graph = build_graph(config, with_weights=False)
    report = analyze(graph)
    why_not: list[str] = []
    try:
        fit = fit_schedule(graph, sram_bytes, cpu)
        plan, account = fit.plan, fit.account
    except SramDoesNotFitError as err:
        plan, account = err.plan, err.needed
        why_not.append(str(err))
    code = code_bytes_estimate(graph)
    flash = report.weights_bytes + code
    if flash > slot_bytes:
        why_not.append(f"needs {flash / KIB:,.1f} kB of Flash (weights "
                       f"{report.weights_bytes / KIB:,.1f} kB + code {code / KIB:,.1f} kB), "
                       f"the firmware slot has {slot_bytes / KIB:,.1f} kB")
    schedule = plan.schedule
    return {
        "model": {"name": choice.name, "width": choice.width, "resolution": list(config.input_size),
                  "classes": config.num_classes, "network": graph.name},
        "cpu": cpu.value, "sram_bytes": sram_bytes, "sram_needed_bytes": account.total_bytes,
        "sram": account.to_dict(), "slot_bytes": slot_bytes, "flash_bytes": flash,
        "weights_bytes": report.weights_bytes, "code_bytes": code, "code_estimated": True,
        "peak_bytes": plan.peak_bytes, "peak_layer": plan.peak_layer,
        "layer_peak_bytes": report.peak_bytes, "macs": plan.macs, "layer_macs": report.macs,
        "mac_overhead": plan.mac_overhead, "patches": schedule.patches,
        "split_after": schedule.split_after, "input_patch": list(schedule.input_patch),
        "fits": {"sram": account.total_bytes <= sram_bytes, "flash": flash <= slot_bytes},
        "why_not": why_not,
    }
