"""Subnet accuracy: measured (extract, recalibrate BN, evaluate) or predicted (ridge regression).

The predictor follows OFA/MCUNet's accuracy predictor in spirit, kept linear so that it fits
in milliseconds with numpy: features are one-hot genes of the active blocks (inactive slots
all-zero), one-hot resolution, width and depths; ridge regression on measured subnets.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from firmware.data import Dataset, Split, batches
from firmware.nas.space import Arch, SearchSpace
from firmware.nas.supernet import Supernet, extract, recalibrate_bn

F64Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class EvalSettings:
    """How a subnet is measured: BN statistics from `recal_images` training images."""

    recal_images: int = 256
    batch_size: int = 128
    threads: int = 1  # torch intra-op threads; see TrainConfig.threads


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run a block with `count` torch intra-op threads, restoring the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def measure(supernet: Supernet, dataset: Dataset, arch: Arch, split: str = "val",
            settings: EvalSettings = EvalSettings()) -> float:
    """Top-1 accuracy in [0, 1] of subnet `arch` on a split, after BN re-calibration."""
    with torch_threads(settings.threads):
        return _measure(supernet, dataset, arch, split, settings)


def _measure(supernet: Supernet, dataset: Dataset, arch: Arch, split: str,
             settings: EvalSettings) -> float:
    module = extract(supernet, arch)
    recalibrate_bn(module, (x for x, _ in batches(dataset.train, arch.resolution,
                                                  settings.batch_size, shuffle_seed=0,
                                                  limit=settings.recal_images)))
    data: Split = getattr(dataset, split)
    correct = 0
    for x, y in batches(data, arch.resolution, settings.batch_size):
        correct += int((module(x).argmax(dim=1) == y).sum())
    return correct / len(data)


def encode(space: SearchSpace, arch: Arch) -> F64Array:
    """Feature vector of `arch`: size, width, and per stage depth, mean kernel, mean expand.

    Few summary features rank subnets better than one-hot genes from the ~50 measured
    subnets a family affords (5-fold Spearman 0.66 vs 0.48 on the digits family).
    """
    res = arch.resolution / space.resolutions[-1]
    width = arch.width / space.widths[-1]
    k_max, e_max = space.kernels[-1], space.expand_ratios[-1]
    feats = [res, width, res * width, res * res, width * width,
             sum(arch.depths) / (space.max_depth * space.num_stages)]
    for s, depth in enumerate(arch.depths):
        slots = [s * space.max_depth + j for j in range(depth)]
        feats += [depth / space.max_depth,
                  sum(arch.kernels[i] for i in slots) / (depth * k_max),
                  sum(arch.expands[i] for i in slots) / (depth * e_max)]
    if space.last_block_channels:
        feats += [arch.kernels[-1] / k_max, arch.expands[-1] / e_max]
    return np.asarray(feats, dtype=np.float64)


@dataclass(frozen=True)
class AccuracyPredictor:
    """Ridge regression from `encode(space, arch)` to accuracy in [0, 1]."""

    coefficients: tuple[float, ...]
    intercept: float
    alpha: float
    samples: int
    holdout_rank_corr: float  # Spearman of 5-fold cross-validated predictions

    def predict(self, space: SearchSpace, arch: Arch) -> float:
        """Predicted accuracy of `arch`. Not clipped to [0, 1]: clipping would tie every
        subnet the regression extrapolates past 1 and hand the choice to the MAC tie-break."""
        return float(encode(space, arch) @ np.asarray(self.coefficients)) + self.intercept

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"coefficients": list(self.coefficients), "intercept": self.intercept,
                "alpha": self.alpha, "samples": self.samples,
                "holdout_rank_corr": self.holdout_rank_corr}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AccuracyPredictor:
        """The predictor a `to_dict` produced."""
        return cls(tuple(float(c) for c in data["coefficients"]), float(data["intercept"]),
                   float(data["alpha"]), int(data["samples"]), float(data["holdout_rank_corr"]))


def _ridge(x: F64Array, y: F64Array, alpha: float) -> tuple[F64Array, float]:
    x_mean, y_mean = x.mean(axis=0), float(y.mean())
    xc = x - x_mean
    gram = xc.T @ xc + alpha * np.eye(x.shape[1])
    coef = np.linalg.solve(gram, xc.T @ (y - y_mean))
    return coef, y_mean - float(x_mean @ coef)


def _spearman(a: F64Array, b: F64Array) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def fit_predictor(space: SearchSpace, archs: list[Arch], accuracies: list[float],
                  alpha: float = 0.1, folds: int = 5) -> AccuracyPredictor:
    """Fit ridge regression on measured subnets; rank correlation by k-fold cross-validation."""
    if len(archs) != len(accuracies) or len(archs) < 2 * folds:
        raise ValueError(f"need at least {2 * folds} (arch, accuracy) pairs, got {len(archs)}")
    x = np.stack([encode(space, a) for a in archs])
    y = np.asarray(accuracies, dtype=np.float64)
    fold_of = np.arange(len(y)) % folds
    predicted = np.zeros_like(y)
    for k in range(folds):
        held = fold_of == k
        coef, icpt = _ridge(x[~held], y[~held], alpha)
        predicted[held] = x[held] @ coef + icpt
    coef, icpt = _ridge(x, y, alpha)  # the shipped predictor uses every sample
    return AccuracyPredictor(tuple(float(c) for c in coef), icpt, alpha, len(archs),
                             _spearman(predicted, y))


def sample_and_fit(supernet: Supernet, dataset: Dataset, samples: int, seed: int = 0,
                   settings: EvalSettings = EvalSettings()
                   ) -> tuple[AccuracyPredictor, list[tuple[Arch, float]]]:
    """Measure `samples` random subnets (plus the largest and smallest) and fit a predictor."""
    rng = random.Random(seed)
    space = supernet.space
    archs = [space.sample(rng) for _ in range(samples)] + [space.largest(), space.smallest()]
    measured = [(a, measure(supernet, dataset, a, "val", settings)) for a in archs]
    predictor = fit_predictor(space, [a for a, _ in measured], [acc for _, acc in measured])
    return predictor, measured
