"""Training samples as the engine takes them: int8 images in HWC and their labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from firmware.training.errors import TrainingError


@dataclass(frozen=True)
class Samples:
    """int8 images (N, H, W, C) as the graph takes them, and their labels."""

    images: npt.NDArray[np.int8]
    labels: npt.NDArray[np.int64]

    def __post_init__(self) -> None:
        if len(self.images) == 0 or len(self.images) != len(self.labels):
            raise TrainingError(f"{len(self.images)} images with {len(self.labels)} labels: "
                                "need as many labels as images, and at least one")

    def __len__(self) -> int:
        return len(self.labels)
