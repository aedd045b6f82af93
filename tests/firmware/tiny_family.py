"""A tiny search space, data set and trained supernet shared by the supernet/search tests.

Cached per process (lru_cache), so that every test module reuses one training run of a few
seconds instead of each training its own.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from firmware.data import Dataset, digits, from_arrays
from firmware.nas.accuracy import AccuracyPredictor, EvalSettings, sample_and_fit
from firmware.nas.space import SearchSpace
from firmware.nas.supernet import Supernet
from firmware.nas.train import TrainConfig, train_supernet

EVAL = EvalSettings(recal_images=64, batch_size=64)


def tiny_space(num_classes: int = 10, in_channels: int = 1) -> SearchSpace:
    """Two elastic stages of 1-2 blocks, widths 8/16, at 12 or 16 px."""
    return SearchSpace(name="tiny", resolutions=(12, 16), num_classes=num_classes,
                       in_channels=in_channels, widths=(0.5, 1.0), depths=(1, 2),
                       stem_channels=8, first_block_channels=8, stage_channels=(16, 24),
                       stage_strides=(2, 2), last_block_channels=None, head_channels=None)


@functools.lru_cache(maxsize=1)
def small_digits() -> Dataset:
    """400 of the digits (40 per class), split 60/20/20."""
    full = digits()
    images = np.concatenate([full.train.images, full.val.images, full.test.images])
    labels = np.concatenate([full.train.labels, full.val.labels, full.test.labels])
    keep = np.concatenate([np.flatnonzero(labels == c)[:40] for c in range(10)])
    return from_arrays("digits-small", images[keep], labels[keep], full.classes,
                       {"kind": "digits-small"}, seed=0)


TRAIN = TrainConfig(epochs=3, batch_size=32, lr=0.05, random_subnets=1, seed=0)


@functools.lru_cache(maxsize=1)
def trained_tiny() -> tuple[Supernet, Dataset]:
    """A tiny supernet trained 3 epochs on `small_digits` (a few seconds)."""
    torch.manual_seed(0)
    supernet = Supernet(tiny_space())
    train_supernet(supernet, small_digits(), TRAIN)
    return supernet, small_digits()


@functools.lru_cache(maxsize=1)
def tiny_predictor() -> AccuracyPredictor:
    """The accuracy predictor of `trained_tiny`, fitted on 12 + 2 measured subnets."""
    supernet, dataset = trained_tiny()
    predictor, _ = sample_and_fit(supernet, dataset, 12, seed=0, settings=EVAL)
    return predictor
