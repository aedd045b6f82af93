"""The model-family format: a directory with a JSON manifest and the supernet's weights.

    FAMILY_DIR/family.json    format, name, version, space, data set, classes, input
                              normalization, training settings, metrics, accuracy predictor
    FAMILY_DIR/supernet.pt    torch state_dict of the Supernet (weights_only loadable)
    FAMILY_DIR/checkpoint.pt  training state for `--resume` (optional)

`version` is the first 16 hex digits of the sha256 of supernet.pt: a family's searches are
cached under (version, hardware class), and a retrained family gets a new version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from firmware.data import INPUT_MEAN, INPUT_STD, Dataset
from firmware.errors import FirmwareError
from firmware.nas.accuracy import AccuracyPredictor
from firmware.nas.space import SearchSpace
from firmware.nas.supernet import Supernet

FAMILY_FORMAT = 1
MANIFEST_NAME = "family.json"
WEIGHTS_NAME = "supernet.pt"
CHECKPOINT_NAME = "checkpoint.pt"


class FamilyError(FirmwareError):
    """A model-family directory is missing, incomplete, of another format, or tampered with."""


@dataclass(frozen=True)
class ModelFamily:
    """What a family's manifest records."""

    name: str
    version: str
    space: SearchSpace
    data_source: dict[str, Any]
    classes: tuple[str, ...]
    input_mean: float = INPUT_MEAN
    input_std: float = INPUT_STD
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    predictor: AccuracyPredictor | None = None

    def to_dict(self) -> dict[str, Any]:
        """The manifest as a JSON-ready dict."""
        return {
            "format": FAMILY_FORMAT, "name": self.name, "version": self.version,
            "space": self.space.to_dict(), "data": self.data_source,
            "classes": list(self.classes),
            "input": {"layout": "NCHW", "scale": "x / 255", "mean": self.input_mean,
                      "std": self.input_std},
            "training": self.training, "metrics": self.metrics,
            "predictor": self.predictor.to_dict() if self.predictor else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelFamily:
        """The family a manifest dict describes."""
        if data.get("format") != FAMILY_FORMAT:
            raise FamilyError(f"family format {data.get('format')!r} is not {FAMILY_FORMAT}")
        try:
            predictor = data.get("predictor")
            return cls(
                name=str(data["name"]), version=str(data["version"]),
                space=SearchSpace.from_dict(data["space"]), data_source=dict(data["data"]),
                classes=tuple(data["classes"]), input_mean=float(data["input"]["mean"]),
                input_std=float(data["input"]["std"]), training=dict(data["training"]),
                metrics=dict(data["metrics"]),
                predictor=AccuracyPredictor.from_dict(predictor) if predictor else None)
        except (KeyError, TypeError) as exc:
            raise FamilyError(f"family manifest lacks or mangles field {exc}") from None


def weights_version(path: Path) -> str:
    """The version string of a weights file: 16 hex digits of its sha256."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def save_family(directory: Path, supernet: Supernet, name: str, dataset: Dataset,
                training: dict[str, Any], metrics: dict[str, Any],
                predictor: AccuracyPredictor | None) -> ModelFamily:
    """Write weights then manifest (each atomically); the manifest names the new version."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_NAME
    tmp = weights.with_name(weights.name + ".tmp")
    torch.save(supernet.state_dict(), tmp)
    tmp.replace(weights)
    family = ModelFamily(name=name, version=weights_version(weights), space=supernet.space,
                         data_source=dataset.source, classes=dataset.classes,
                         training=training, metrics=metrics, predictor=predictor)
    write_manifest(directory, family)
    return family


def write_manifest(directory: Path, family: ModelFamily) -> None:
    """Write family.json atomically."""
    manifest = directory / MANIFEST_NAME
    tmp = manifest.with_name(manifest.name + ".tmp")
    tmp.write_text(json.dumps(family.to_dict(), indent=2, sort_keys=True) + "\n")
    tmp.replace(manifest)


def read_manifest(directory: Path) -> ModelFamily:
    """The manifest of a family directory (weights not loaded)."""
    manifest = directory / MANIFEST_NAME
    if not manifest.is_file():
        raise FamilyError(f"{directory}: no {MANIFEST_NAME}; not a model family "
                          "(train one with `tinyfleet train-supernet --out DIR`)")
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        raise FamilyError(f"{manifest}: not JSON: {exc}") from None
    return ModelFamily.from_dict(data)


def load_family(directory: Path) -> tuple[ModelFamily, Supernet]:
    """The manifest and the supernet of a family; FamilyError if the weights changed."""
    family = read_manifest(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FamilyError(f"{directory}: {WEIGHTS_NAME} missing")
    actual = weights_version(weights)
    if actual != family.version:
        raise FamilyError(f"{weights}: version {actual} does not match the manifest's "
                          f"{family.version}")
    supernet = Supernet(family.space)
    supernet.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    supernet.eval()
    return family, supernet
