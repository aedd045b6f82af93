"""Personalization meets model families: contribution analysis, the search's training term,
and the sparse-update scheme of a search's pick.

`firmware.training` knows int8 graphs, not families; `firmware.nas` knows families, not
training. This module (at the top of the pipeline, beside `pipeline.py`) joins them:

- `family_contributions` analyses one subnet of a family on the held-out half of the shifted
  data set (`firmware.data.shifted(..., "analysis")`, which no device uses) and returns gains
  indexed by position from the end, so that they apply to every subnet;
- `TrainingTerm` is `Constraints.training_memory` for `search --personalize`: the training
  memory of the family's reference scheme (the cheapest scheme worth `fraction` of the best
  predicted gain on the analysed subnet, as a position template) on each candidate subnet;
- `scheme_for` plans the scheme of the pick under the SRAM it leaves (Eq. 5).

Analyses are stored as JSON artifacts under `contributions/<family version>.json` of the
var directory: a family stays immutable, its version hash names its analysis.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from firmware.arch import NetConfig
from firmware.data import Dataset, Split, load_dataset, shifted, to_tensor
from firmware.errors import DoesNotFitError, FirmwareError
from firmware.frontend.builtin import build_graph
from firmware.int8.quantize import QuantizedGraph, quantize_graph
from firmware.ir import Graph
from firmware.nas.accuracy import torch_threads
from firmware.nas.family import ModelFamily, load_family
from firmware.nas.space import Arch, SearchSpace
from firmware.nas.specialize import export_subnet
from firmware.nas.supernet import Supernet
from firmware.plan.memory import MemoryModel
from firmware.plan.overlay import graph_overlay_layout
from firmware.training.analysis.contributions import (
    AnalysisSettings,
    Contributions,
    Progress,
    analyze,
)
from firmware.training.analysis.planner import (
    PlannedScheme,
    cheapest_scheme,
    default_base,
    plan_scheme,
)
from firmware.training.engine.blas import one_blas_thread
from firmware.training.memory import StepModel, training_memory
from firmware.training.model_version import is_version_dir, load_version
from firmware.training.samples import Samples
from firmware.training.scheme import SchemeTemplate, SparseUpdateScheme, resolve

CONTRIBUTIONS_DIR = "contributions"
CALIBRATION_IMAGES = 64


class PersonalizeError(FirmwareError):
    """A family has no analysis yet, or its analysis belongs to another version."""


def analysis_arch(space: SearchSpace) -> Arch:
    """The subnet a family's analysis trains: widest, deepest, largest kernels and expand
    ratios (the sandwich rule trains it best) at the second-smallest resolution (time)."""
    largest = space.largest()
    resolution = space.resolutions[min(1, len(space.resolutions) - 1)]
    return replace(largest, resolution=resolution)


def quantized_subnet(supernet: Supernet, dataset: Dataset, arch: Arch) -> QuantizedGraph:
    """A subnet with BN folded and re-calibrated, int8-quantized on training images."""
    with torch_threads(1):
        module = export_subnet(supernet, dataset, arch)
        graph = build_graph(module.config, module.folded_params())
        calib = to_tensor(dataset.train.images[:CALIBRATION_IMAGES], arch.resolution).numpy()
    return quantize_graph(graph, calib)


def int8_samples(qgraph: QuantizedGraph, split: Split, limit: int | None = None) -> Samples:
    """A split resized and normalized as the family's data, quantized: int8 (N, H, W, C)."""
    t = qgraph.graph.tensor(qgraph.graph.input)
    images = split.images if limit is None else split.images[:limit]
    labels = split.labels if limit is None else split.labels[:limit]
    if images.shape[1] != t.channels:
        raise PersonalizeError(f"data has {images.shape[1]} channels, {qgraph.graph.name} "
                               f"takes {t.channels}")
    with torch_threads(1):
        x = to_tensor(images, t.height).numpy()
    q = qgraph.input.quantize(x).transpose(0, 2, 3, 1)
    return Samples(np.ascontiguousarray(q), np.asarray(labels, dtype=np.int64))


DEFAULT_ANALYSIS = AnalysisSettings()
QUICK_ANALYSIS = AnalysisSettings(steps=150, blocks=2)


def family_contributions(family_dir: Path, settings: AnalysisSettings = DEFAULT_ANALYSIS,
                         progress: Progress | None = None, workers: int = 1) -> Contributions:
    """Analyse a family (module docstring): train on the analysis half's train split,
    measure on its val and test splits."""
    with one_blas_thread():
        return _family_contributions(family_dir, settings, progress, workers)


def _family_contributions(family_dir: Path, settings: AnalysisSettings,
                          progress: Progress | None, workers: int) -> Contributions:
    family, supernet = load_family(family_dir)
    dataset = load_dataset(family.data_source)
    arch = analysis_arch(family.space)
    qgraph = quantized_subnet(supernet, dataset, arch)
    held_out = shifted(dataset, "analysis")
    evaluation = Split(np.concatenate([held_out.val.images, held_out.test.images]),
                       np.concatenate([held_out.val.labels, held_out.test.labels]))
    result = analyze(qgraph, int8_samples(qgraph, held_out.train),
                     int8_samples(qgraph, evaluation), settings, progress, workers)
    return replace(result, family=family.name, family_version=family.version,
                   subnet=arch.to_dict(), data=held_out.source)


def contributions_path(var_dir: Path, family_version: str) -> Path:
    """Where the analysis of a family version is stored."""
    return var_dir / CONTRIBUTIONS_DIR / f"{family_version}.json"


def save_contributions(var_dir: Path, contributions: Contributions) -> Path:
    """Write an analysis atomically under its family version; return the path."""
    if not contributions.family_version:
        raise PersonalizeError("an analysis without a family version cannot be stored")
    path = contributions_path(var_dir, contributions.family_version)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(contributions.to_json())
    tmp.replace(path)
    return path


def load_contributions(var_dir: Path, family: ModelFamily) -> Contributions:
    """The stored analysis of `family`; PersonalizeError saying how to make it if missing."""
    path = contributions_path(var_dir, family.version)
    if not path.is_file():
        raise PersonalizeError(
            f"family {family.name} version {family.version} has no contribution analysis "
            f"({path} missing): run `tinyfleet contributions FAMILY_DIR` first")
    try:
        found = Contributions.from_json(path.read_text())
    except (OSError, json.JSONDecodeError, FirmwareError) as exc:
        raise PersonalizeError(f"{path}: {exc}") from None
    if found.family_version != family.version:
        raise PersonalizeError(f"{path} analyses version {found.family_version}, not "
                               f"{family.version}")
    return found


def analysed_graph(space: SearchSpace, contributions: Contributions) -> Graph:
    """The (shape-only) graph of the subnet an analysis trained."""
    return build_graph(space.to_config(Arch.from_dict(dict(contributions.subnet))),
                       with_weights=False)


@dataclass(frozen=True)
class TrainingTerm:
    """`Constraints.training_memory`: the reference scheme's training bytes on a subnet."""

    template: SchemeTemplate
    base: SparseUpdateScheme
    memory_model: MemoryModel = MemoryModel.INPLACE
    reorder: bool = True
    predicted_gain: float = 0.0

    def __call__(self, config: NetConfig, graph: Graph) -> int:
        """Training bytes of the template on `graph` (the config is not needed)."""
        scheme = self.template.instantiate(graph, self.base)
        return StepModel(graph, self.memory_model).peaks(scheme, self.reorder)[1]

    def overlay_bytes(self, config: NetConfig, graph: Graph) -> int:
        """`Constraints.overlay_bytes`: the Flash the template's weights overlay takes on
        `graph` (its region at the slot's end and the code that reads it)."""
        return scheme_flash_bytes(graph, self.template.instantiate(graph, self.base))


def scheme_flash_bytes(graph: Graph, scheme: SparseUpdateScheme) -> int:
    """Flash a scheme's weights overlay takes on `graph`: its region and the code reading it."""
    layout = graph_overlay_layout(graph, tuple(resolve(scheme, graph).trainable))
    return layout.region_bytes + layout.code_bytes


def training_term(space: SearchSpace, contributions: Contributions, fraction: float = 0.9,
                  base: SparseUpdateScheme | None = None,
                  memory_model: MemoryModel = MemoryModel.INPLACE,
                  reorder: bool = True) -> TrainingTerm:
    """The training term of a family: its reference scheme (module docstring)."""
    settings = base or default_base(contributions)
    reference = cheapest_scheme(analysed_graph(space, contributions), contributions, fraction,
                                settings, memory_model, reorder)
    return TrainingTerm(reference.template, settings, memory_model, reorder,
                        reference.predicted_gain)


def pick_scheme(config: NetConfig, term: TrainingTerm, contributions: Contributions,
                sram_bytes: int, inference_bytes: int, split_after: str | None = None,
                overlay_flash_bytes: int | None = None) -> PlannedScheme:
    """The scheme of a search's pick: planned (Eq. 5) for the SRAM its inference account
    leaves, with the term's optimizer settings; DoesNotFitError if the pick's patch stage
    (ending at `split_after`) reaches the first layer the scheme trains (the training step
    runs its layers one by one, the frozen patch stage must come before them).

    `overlay_flash_bytes` is the Flash the slot leaves for the weights overlay: a planned
    scheme whose overlay takes more falls back to the term's own scheme (the one the search
    charged, in SRAM and in Flash)."""
    graph = build_graph(config, with_weights=False)
    planned = scheme_for(graph, contributions, sram_bytes - inference_bytes, term.base,
                         term.memory_model, term.reorder)
    if (overlay_flash_bytes is not None
            and scheme_flash_bytes(graph, planned.scheme) > overlay_flash_bytes):
        scheme = term.template.instantiate(graph, term.base)
        report = training_memory(graph, scheme, term.memory_model, term.reorder)
        planned = PlannedScheme(scheme, term.template, term.predicted_gain,
                                report.training_bytes, report, 0)
    start = resolve(planned.scheme, graph).region_start
    if split_after is not None and graph.index(split_after) >= start:
        raise DoesNotFitError(f"{graph.name}: its patch stage (to {split_after}) reaches the "
                              f"layers the scheme trains (from {graph.layers[start].name}); "
                              "search without patches")
    return planned


def scheme_for(graph: Graph, contributions: Contributions, budget_bytes: int,
               base: SparseUpdateScheme | None = None,
               memory_model: MemoryModel = MemoryModel.INPLACE,
               reorder: bool = True) -> PlannedScheme:
    """The best scheme for a picked subnet within `budget_bytes` of training memory."""
    return plan_scheme(graph, contributions, budget_bytes, base, memory_model, reorder)


ProgressFn = Callable[[int, int, str], None]


# -- fine-tuning a model on your own data ----------------------------------------------------


def _base_loader(path: Path) -> Graph | QuantizedGraph:
    """Load a base for `load_version`: an ONNX file (float graph) or a version directory."""
    if is_version_dir(path):
        return load_version(path, _base_loader)[1]
    from firmware.frontend.onnx_import import import_onnx

    return import_onnx(path)


def load_model(path: Path, calibration: Split | None = None
               ) -> tuple[QuantizedGraph, str]:
    """An int8 graph to fine-tune and a one-line description of where it came from.

    A fine-tuned version directory loads as it is; an ONNX file is quantized on up to 128
    images of `calibration` (resized and normalized as the families' data), or on
    generated inputs when none are given.
    """
    if is_version_dir(path):
        version, qgraph = load_version(path, _base_loader)
        return qgraph, f"version {version.id} of {Path(version.base_path).name}"
    if path.suffix.lower() != ".onnx" or not path.is_file():
        raise PersonalizeError(f"{path}: give an .onnx model or a fine-tuned version directory")
    from firmware.frontend.onnx_import import import_onnx

    graph = import_onnx(path)
    if calibration is None:
        return quantize_graph(graph), f"{path.name} (calibrated on generated inputs)"
    t = graph.tensor(graph.input)
    with torch_threads(1):
        calib = to_tensor(calibration.images[:CALIBRATION_IMAGES], t.height).numpy()
    return quantize_graph(graph, calib), f"{path.name} (calibrated on {len(calib)} images)"


def quick_contributions(qgraph: QuantizedGraph, train: Samples,
                        settings: AnalysisSettings = QUICK_ANALYSIS
                        ) -> Contributions:
    """A contribution analysis on a model without a family: a third of its training samples
    held out for evaluation (used by `finetune --budget` without `--contributions`)."""
    n = len(train)
    if n < 6:
        raise PersonalizeError(f"{n} training samples are too few to analyse contributions")
    cut = n - max(2, n // 3)
    return analyze(qgraph, Samples(train.images[:cut], train.labels[:cut]),
                   Samples(train.images[cut:], train.labels[cut:]), settings)
