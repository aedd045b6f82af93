"""Architecture search benchmarks: supernet training time, accuracy vs SRAM budget on digits
(layer-based vs joint patch search), MACs found in the MCUNetV2 ImageNet space beside the
paper's models, search time per hardware class, and compiling searched subnets.

    .venv/bin/python -m bench.search train      # train the digits family (var/bench/digits)
    .venv/bin/python -m bench.search budgets    # accuracy vs SRAM budget on that family
    .venv/bin/python -m bench.search train --data shapes --epochs 12   # var/bench/shapes
    .venv/bin/python -m bench.search budgets --family var/bench/shapes --budgets 12,16,...
    .venv/bin/python -m bench.search resolutions --family F   # largest subnet per input
    .venv/bin/python -m bench.search imagenet   # MACs under 256 kB/1 MB and 512 kB/2 MB
    .venv/bin/python -m bench.search mcus       # search time per catalog MCU
    .venv/bin/python -m bench.search compile [--budgets 24,28,32,64]   # compile every pick
        at its budget (Cortex-M4 with exactly that SRAM), QEMU-checked

Every search charges the SRAM account (`firmware.plan.account`: arena + kernel scratch +
static data + stack bound), the figure the compiler links against.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from firmware.data import Dataset, digits, load_dataset, shapes
from firmware.errors import DoesNotFitError
from firmware.nas.accuracy import sample_and_fit
from firmware.nas.family import ModelFamily, load_family, save_family
from firmware.nas.search import Constraints, EvolutionSettings, evolve, macs_objective
from firmware.nas.space import compact_space, mcunet_space
from firmware.nas.specialize import ObjectiveKind, export_subnet, specialize
from firmware.nas.supernet import Supernet
from firmware.nas.train import TrainConfig, train_supernet
from firmware.targets import CATALOG, KIB, MIB, Cpu, custom_target

FAMILY_DIR = Path("var/bench/digits12")
RESOLUTIONS = (24, 32, 40, 48)
BUDGETS_KIB = (16, 24, 32, 48, 64, 96, 128, 256, 512)
# Shapes: generated at the largest input (no resize cost) with inputs where detail matters;
# 240 per class (720 train, 240 val, 240 test) trains 12 epochs in ~6 min on the 2-core VM.
SHAPES_RESOLUTIONS = (32, 48, 64, 80, 96)
SHAPES_PER_CLASS = 240


def _bench_data(kind: str) -> tuple[Dataset, tuple[int, ...]]:
    if kind == "shapes":
        return shapes(SHAPES_PER_CLASS, SHAPES_RESOLUTIONS[-1]), SHAPES_RESOLUTIONS
    return digits(), RESOLUTIONS


def train(epochs: int, out: Path, seed: int = 0, kind: str = "digits",
          predictor_samples: int = 60) -> dict[str, Any]:
    """Train the digits or shapes family as `tinyfleet train-supernet` does; time each phase."""
    data, resolutions = _bench_data(kind)
    space = compact_space(len(data.classes), data.channels, resolutions,
                          name=f"{kind}-compact")
    torch.manual_seed(seed)
    supernet = Supernet(space)
    config = TrainConfig(epochs=epochs, batch_size=32, lr=0.05, seed=seed)
    started = time.monotonic()
    summary = train_supernet(supernet, data, config)
    train_s = time.monotonic() - started
    started = time.monotonic()
    predictor, measured = sample_and_fit(supernet, data, predictor_samples, seed)
    fit_s = time.monotonic() - started
    accs = [a for _, a in measured]
    rng = random.Random(seed + 1)
    metrics = {"largest_val_accuracy": accs[-2], "smallest_val_accuracy": accs[-1],
               "sampled_val_accuracy_mean": sum(accs[:-2]) / (len(accs) - 2),
               "sampled_val_accuracy_min": min(accs[:-2]),
               "predictor_holdout_rank_corr": predictor.holdout_rank_corr}
    del rng
    save_family(out, supernet, kind, data, {"epochs": epochs, "elapsed_s": train_s},
                metrics, predictor)
    return {"epochs": epochs, "train_s": train_s, "predictor_s": fit_s,
            "last_epoch_loss": summary.last_epoch_loss, **metrics}


def _budget_row(family: ModelFamily, supernet: Supernet, data: Dataset, budget: int,
                patches: bool, settings: EvolutionSettings) -> dict[str, Any]:
    constraints = Constraints(sram_bytes=budget, slot_bytes=1 * MIB, cpu=Cpu.CORTEX_M7,
                              patches=patches)
    try:
        found = specialize(family, supernet, data, constraints, settings,
                           ObjectiveKind.PREDICTED)
    except DoesNotFitError as exc:  # a budget nothing fits is a row, not a crash
        return {"budget_kib": budget // KIB, "patches": patches, "error": str(exc)[:80]}
    mem = found.memory
    return {"budget_kib": budget // KIB, "patches": patches,
            "resolution": found.arch.resolution, "width": found.arch.width,
            "schedule": (f"{mem['patches']}x{mem['patches']}@{mem['split_after']}"
                         if mem["patches"] > 1 else "layer"),
            "peak_kib": mem["peak_bytes"] / KIB, "layer_peak_kib": mem["layer_peak_bytes"] / KIB,
            "sram_needed_kib": mem["sram_needed_bytes"] / KIB,
            "macs_m": mem["macs"] / 1e6, "val_acc": found.val_accuracy,
            "test_acc": found.test_accuracy, "predicted": found.score,
            "search_s": found.search_s}


def budgets(family_dir: Path, budgets_kib: tuple[int, ...] = BUDGETS_KIB
            ) -> list[dict[str, Any]]:
    """Accuracy vs SRAM budget (the whole account, Cortex-M7) for both search modes."""
    family, supernet = load_family(family_dir)
    data = load_dataset(family.data_source)
    settings = EvolutionSettings(population=32, generations=10, parents=8, seed=0)
    rows = []
    for kib in budgets_kib:
        for patches in (False, True):
            rows.append(_budget_row(family, supernet, data, kib * KIB, patches, settings))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def resolutions(family_dir: Path) -> list[dict[str, Any]]:
    """Does the input size matter? The largest subnet's val / test accuracy at each input."""
    from dataclasses import replace

    from firmware.nas.accuracy import measure

    family, supernet = load_family(family_dir)
    data = load_dataset(family.data_source)
    rows = []
    for res in family.space.resolutions:
        arch = replace(family.space.largest(), resolution=res)
        rows.append({"resolution": res, "val_acc": measure(supernet, data, arch, "val"),
                     "test_acc": measure(supernet, data, arch, "test")})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# The paper's anchors: (name, MACs, peak SRAM kB, Flash kB), MCUNetV2 Table 3 / MCUNet.
ANCHORS = (("MCUNet (STM32F746)", 68e6, 238, None), ("MCUNetV2-M4", 119e6, 196, 1010),
           ("MCUNetV2-H7", 256e6, 465, 2032))


def imagenet(overhead_caps: tuple[float | None, ...] = (0.1, None)) -> list[dict[str, Any]]:
    """The most (layer-based) MACs that fit, architecture only, in the ImageNet space."""
    space = mcunet_space()
    settings = EvolutionSettings(population=48, generations=15, parents=12, seed=0)
    rows = []
    for sram, flash in ((256 * KIB, 1 * MIB), (512 * KIB, 2 * MIB)):
        for patches, cap in [(False, None)] + [(True, c) for c in overhead_caps]:
            constraints = Constraints(sram_bytes=sram, slot_bytes=flash, cpu=Cpu.CORTEX_M7,
                                      patches=patches, max_mac_overhead=cap)
            result = evolve(space, constraints, macs_objective, settings)
            best = result.best
            assert best.plan is not None
            rows.append({
                "sram_kib": sram // KIB, "flash_kib": flash // KIB, "patches": patches,
                "overhead_cap": cap, "resolution": best.arch.resolution,
                "width": best.arch.width, "macs_m": best.layer_macs / 1e6,
                "macs_with_recompute_m": best.macs / 1e6, "peak_kib": best.peak_bytes / KIB,
                "sram_needed_kib": best.sram_needed_bytes / KIB,
                "flash_kib_used": best.flash_bytes / KIB,
                "schedule": (f"{best.plan.schedule.patches}x{best.plan.schedule.patches}"
                             f"@{best.plan.schedule.split_after}"
                             if best.plan.schedule.patches > 1 else "layer"),
                "evaluated": result.evaluated, "search_s": result.elapsed_s})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def mcus(family_dir: Path) -> list[dict[str, Any]]:
    """Search time (predictor objective, default settings) per catalog MCU."""
    family, supernet = load_family(family_dir)
    data = load_dataset(family.data_source)
    rows = []
    for name, target in sorted(CATALOG.items()):
        constraints = Constraints.for_target(target)
        try:
            found = specialize(family, supernet, data, constraints)
        except DoesNotFitError as exc:  # report it, go on with the next MCU
            rows.append({"mcu": name, "error": str(exc)})
            print(json.dumps(rows[-1]), flush=True)
            continue
        rows.append({"mcu": name, "sram_kib": target.sram_bytes // KIB,
                     "slot_kib": constraints.slot_bytes // KIB,
                     "resolution": found.arch.resolution, "width": found.arch.width,
                     "patches": found.memory["patches"], "val_acc": found.val_accuracy,
                     "search_s": found.search_s, "total_s": found.total_s,
                     "evaluated": found.evaluated})
        print(json.dumps(rows[-1]), flush=True)
    return rows


COMPILE_BUDGETS_KIB = (24, 28, 32, 64)


def compile_searched(family_dir: Path, budgets_kib: tuple[int, ...] = COMPILE_BUDGETS_KIB,
                     cpu: Cpu = Cpu.CORTEX_M4) -> list[dict[str, Any]]:
    """Search at each budget (joint and layer-based) and compile every pick for a device with
    exactly that SRAM: it must link, and measured SRAM is set beside the search's account."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from firmware.data import to_tensor
    from firmware.frontend.builtin import build_graph
    from firmware.pipeline import CompileOptions, compile_model
    from firmware.pipeline import Dataset as CalibSet
    from firmware.toolchain.build import LinkOverflowError

    family, supernet = load_family(family_dir)
    data = load_dataset(family.data_source)
    rows = []
    for kib in budgets_kib:
        target = custom_target(kib * KIB, 1 * MIB, cpu, name=f"{cpu.value}-{kib}k")
        for patches in (True, False):
            constraints = Constraints.for_target(target, patches=patches)
            found = specialize(family, supernet, data, constraints)
            module = export_subnet(supernet, data, found.arch)
            graph = build_graph(found.config, params=module.folded_params())
            res = found.arch.resolution
            calib = CalibSet(to_tensor(data.train.images[:64], res).numpy())
            test = CalibSet(to_tensor(data.test.images, res).numpy(), data.test.labels)
            mem = found.memory
            options = CompileOptions(patches=mem["patches"], split_after=mem["split_after"],
                                     onnx_check=False)
            row: dict[str, Any] = {
                "budget_kib": kib, "cpu": cpu.value, "joint": patches,
                "resolution": found.arch.resolution, "width": found.arch.width,
                "schedule": (f"{mem['patches']}x{mem['patches']}@{mem['split_after']}"
                             if mem["patches"] > 1 else "layer"),
                "search_sram": mem["sram"], "val_acc": found.val_accuracy}
            with tempfile.TemporaryDirectory() as work:
                try:
                    result = compile_model(graph, target, Ed25519PrivateKey.generate(),
                                           Path(work), calib, test, options)
                except LinkOverflowError as exc:
                    row.update(links=False, error=str(exc))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
            report = result.report
            row.update(links=True, bit_exact=report["bit_exact"],
                       compile_sram=report["predicted"]["sram"],
                       sram_check={k: v for k, v in report["sram_check"].items()},
                       flash_predicted_kib=report["predicted"]["flash_bytes"] / KIB,
                       flash_measured_kib=report["measured"]["flash_bytes"] / KIB,
                       accuracy=report["accuracy"])
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
    return rows


def main() -> None:
    """Run one part of the benchmark and print its rows as JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["train", "budgets", "resolutions", "imagenet", "mcus",
                                           "compile"])
    parser.add_argument("--family", type=Path, default=FAMILY_DIR)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--data", choices=["digits", "shapes"], default="digits",
                        help="train: the data set (shapes: default family var/bench/shapes)")
    parser.add_argument("--predictor-samples", type=int, default=60)
    parser.add_argument("--budgets", default=None,
                        help="budgets / compile: comma-separated kB (default 16,24,...,512 / "
                             "24,28,32,64)")
    args = parser.parse_args()
    if args.data == "shapes" and args.family == FAMILY_DIR:
        args.family = Path("var/bench/shapes")
    if args.part == "train":
        print(json.dumps(train(args.epochs, args.family, kind=args.data,
                               predictor_samples=args.predictor_samples)))
    elif args.part == "budgets":
        kib = (tuple(int(v) for v in args.budgets.split(",")) if args.budgets
               else BUDGETS_KIB)
        budgets(args.family, kib)
    elif args.part == "resolutions":
        resolutions(args.family)
    elif args.part == "imagenet":
        imagenet()
    elif args.part == "mcus":
        mcus(args.family)
    else:
        kib = (tuple(int(v) for v in args.budgets.split(",")) if args.budgets
               else COMPILE_BUDGETS_KIB)
        compile_searched(args.family, kib)


if __name__ == "__main__":
    main()
