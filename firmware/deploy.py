"""What a campaign does per hardware class: plan (search) and build (compile + QEMU check).

A hardware class is (core, usable SRAM, one OTA slot of Flash, personalization on/off):
devices that share it share one search and one build (DESIGN "Data flow of one campaign").
The service caches both per (model version, hardware class) and signs a build once per
fleet; this module only computes:

- `plan_class(model, hw, settings)`: a family's search (the fit judged by the one SRAM
  account, + the training term and the pick's sparse-update scheme with personalization),
  or, for a fixed ONNX model, the schedule whose account fits. `DoesNotFitError` names the
  numbers when nothing fits.
- `build_class(model, hw, plan, work_dir)`: the pick as an int8 image (quantize, plan,
  codegen, arm-none-eabi-gcc, QEMU bit-exact check where QEMU has a board for the core),
  unsigned; its manifest carries the scheme and whether it was emulated. Beside it, the same
  C as a host shared library (manifest target host-<arch>, checked bit-exact on the same
  test vectors) for devices whose agent runs the `host` backend.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from firmware.errors import DoesNotFitError, FirmwareError, NoToolchainError
from firmware.pipeline import CompileOptions, Dataset, UnsignedBuild, build_unsigned
from firmware.targets import Cpu, OtaLayout, TargetSpec, custom_target, get_target


class ModelKind(enum.Enum):
    """What a registered model version is."""

    FAMILY = "family"  # a `train-supernet` directory: searched per hardware class
    ONNX = "onnx"  # one fixed network: only its schedule is planned per class


@dataclass(frozen=True)
class HardwareClass:
    """Devices that share one search and one build."""

    cpu: Cpu
    sram_bytes: int
    slot_bytes: int
    personalize: bool
    mcu: str  # a catalog name (or "custom") of one member: the linker script's sizes
    flash_bytes: int
    layout: OtaLayout

    @property
    def key(self) -> str:
        """The cache key: core, SRAM, slot, personalization (DESIGN's class)."""
        return (f"{self.cpu.value}-sram{self.sram_bytes}-slot{self.slot_bytes}"
                f"-{'pers' if self.personalize else 'infer'}")

    def target(self) -> TargetSpec:
        """The TargetSpec to build for: the catalog entry when it has these sizes."""
        if self.mcu != "custom":
            spec = get_target(self.mcu)
            if (spec.cpu, spec.sram_bytes, spec.flash_bytes) == (self.cpu, self.sram_bytes,
                                                                 self.flash_bytes):
                return spec
        return custom_target(self.sram_bytes, self.flash_bytes, self.cpu.value,
                             name=f"custom-{self.key}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"cpu": self.cpu.value, "sram_bytes": self.sram_bytes,
                "slot_bytes": self.slot_bytes, "personalize": self.personalize,
                "mcu": self.mcu, "flash_bytes": self.flash_bytes, "layout": self.layout.value}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HardwareClass:
        """The class `to_dict` wrote."""
        return cls(Cpu(data["cpu"]), int(data["sram_bytes"]), int(data["slot_bytes"]),
                   bool(data["personalize"]), str(data["mcu"]), int(data["flash_bytes"]),
                   OtaLayout(data["layout"]))


@dataclass(frozen=True)
class SearchSettings:
    """The evolutionary search's size (the service's settings choose it)."""

    population: int = 48
    generations: int = 15
    seed: int = 0
    train_gain: float = 0.9


def plan_class(kind: ModelKind, path: Path, hw: HardwareClass, var_dir: Path,
               settings: SearchSettings = SearchSettings()) -> dict[str, Any]:
    """The pick for one class as JSON-ready data; DoesNotFitError names the numbers,
    NoToolchainError a core no installed compiler builds (no search is run for it)."""
    _require_toolchain(hw)
    if kind is ModelKind.ONNX:
        return _plan_onnx(path, hw)
    from firmware.nas.accuracy import torch_threads
    from firmware.training.engine.blas import one_blas_thread

    # One thread each: workers run several of these side by side on few cores.
    with torch_threads(1), one_blas_thread():
        return _plan_family(path, hw, var_dir, settings)


def _plan_onnx(path: Path, hw: HardwareClass) -> dict[str, Any]:
    from firmware.frontend.onnx_import import import_onnx
    from firmware.pipeline import plan_schedule

    graph = import_onnx(path)
    if hw.personalize:
        raise FirmwareError("personalization needs a model family (its contribution "
                            "analysis); a fixed ONNX model has none")
    fit = plan_schedule(graph, hw.target(), CompileOptions(layout=hw.layout))
    return {"kind": "onnx", "graph": graph.name, "sram_needed_bytes": fit.account.total_bytes,
            "sram_bytes": hw.sram_bytes, "patches": fit.plan.schedule.patches,
            "split_after": fit.plan.schedule.split_after}


def _plan_family(path: Path, hw: HardwareClass, var_dir: Path,
                 settings: SearchSettings) -> dict[str, Any]:
    from firmware.data import load_dataset
    from firmware.nas.family import load_family
    from firmware.nas.search import Constraints, EvolutionSettings
    from firmware.nas.specialize import ObjectiveKind, specialize

    family, supernet = load_family(path)
    term = contributions = None
    if hw.personalize:
        from firmware.personalize import load_contributions, training_term

        contributions = load_contributions(var_dir, family)
        term = training_term(family.space, contributions, settings.train_gain)
    constraints = Constraints.for_target(
        hw.target(), hw.layout, patches=not hw.personalize, personalize=hw.personalize,
        **({} if term is None else {"training_memory": term,
                                        "overlay_bytes": term.overlay_bytes}))
    evolution = EvolutionSettings(population=settings.population,
                                  generations=settings.generations,
                                  parents=max(1, settings.population // 4), seed=settings.seed)
    dataset = load_dataset(family.data_source)
    found = specialize(family, supernet, dataset, constraints, evolution,
                       ObjectiveKind.PREDICTED)
    result: dict[str, Any] = {"kind": "family", **found.to_dict(),
                              "settings": asdict(settings)}
    if term is not None and contributions is not None:
        from firmware.nas.specialize import config_from_dict
        from firmware.personalize import pick_scheme

        mem = result["memory"]
        inference = mem["sram_needed_bytes"] - mem["training_bytes"]
        planned = pick_scheme(config_from_dict(result["config"]), term, contributions,
                              mem["sram_bytes"], inference, None,
                              mem["slot_bytes"] - mem["weights_bytes"] - mem["code_bytes"])
        result["sparse_update"] = planned.scheme.to_dict()
        result["training_bytes"] = planned.training_bytes
    return result


def _require_toolchain(hw: HardwareClass) -> None:
    from firmware.toolchain.build import missing_toolchain

    reason = missing_toolchain(hw.cpu)
    if reason is not None:
        raise NoToolchainError(reason)


def build_class(kind: ModelKind, path: Path, hw: HardwareClass, plan: dict[str, Any],
                work_dir: Path, model_id: str, model_version: str) -> UnsignedBuild:
    """The class's image, unsigned (module docstring); NoToolchainError for a core no
    installed compiler builds."""
    _require_toolchain(hw)
    options = CompileOptions(layout=hw.layout, model_id=model_id, model_version=model_version,
                             onnx_check=False, test_vectors=2)
    target = hw.target()
    if kind is ModelKind.ONNX:
        from firmware.frontend.onnx_import import import_onnx

        return build_unsigned(import_onnx(path), target, work_dir, options=options, host=True)
    from firmware.nas.accuracy import torch_threads
    from firmware.training.engine.blas import one_blas_thread

    with torch_threads(1), one_blas_thread():
        graph, calib = _family_graph(path, plan)
        return build_unsigned(graph, target, work_dir, calib=calib, options=options,
                              sparse_update=plan.get("sparse_update"), host=True)


def _family_graph(path: Path, plan: dict[str, Any]) -> tuple[Any, Dataset]:
    """The pick as a float graph with BN folded, and calibration images."""
    from firmware.data import load_dataset, to_tensor
    from firmware.frontend.builtin import build_graph
    from firmware.nas.accuracy import torch_threads
    from firmware.nas.family import load_family
    from firmware.nas.space import Arch
    from firmware.nas.specialize import export_subnet

    family, supernet = load_family(path)
    dataset = load_dataset(family.data_source)
    arch = Arch.from_dict(plan["arch"])
    with torch_threads(1):
        module = export_subnet(supernet, dataset, arch)
        graph = build_graph(module.config, module.folded_params())
        calib = to_tensor(dataset.train.images[:64], arch.resolution).numpy()
    return graph, Dataset(calib)


__all__ = ["DoesNotFitError", "HardwareClass", "ModelKind", "SearchSettings", "build_class",
           "plan_class"]
