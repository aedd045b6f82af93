"""Fine-tune an int8 graph on local samples with a sparse-update scheme: the device's loop.

Epochs over the training samples in a seeded order, batch 1 (the scheme may accumulate
gradients over several samples), top-1 accuracy on held-out samples before and after, a loss
curve of at most 50 points. The frozen layers before the training region run once per sample
(their outputs cannot change): a host shortcut that leaves the trained weights unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from firmware.int8.quantize import QuantizedGraph
from firmware.plan.memory import MemoryModel
from firmware.training.engine.blas import one_blas_thread
from firmware.training.engine.trainer import Trainer
from firmware.training.errors import TrainingError
from firmware.training.memory import TrainingMemoryReport
from firmware.training.samples import Samples
from firmware.training.scheme import SparseUpdateScheme

CURVE_POINTS = 50

Progress = Callable[[int, int, float], None]  # (step, steps, running loss)


@dataclass(frozen=True)
class FinetuneResult:
    """The trained graph and what training did."""

    trained: QuantizedGraph
    scheme: SparseUpdateScheme
    memory: TrainingMemoryReport
    accuracy_before: float
    accuracy_after: float
    loss_curve: tuple[float, ...]
    steps: int
    train_samples: int
    test_samples: int
    step_ms: float  # mean wall time of one training step here (frozen prefix cached)
    elapsed_s: float

    def metrics(self) -> dict[str, object]:
        """JSON-ready metrics (what a device reports: numbers only)."""
        return {
            "accuracy_before": self.accuracy_before, "accuracy_after": self.accuracy_after,
            "loss_curve": list(self.loss_curve), "steps": self.steps,
            "train_samples": self.train_samples, "test_samples": self.test_samples,
            "training_bytes": self.memory.training_bytes,
            "step_peak_bytes": self.memory.step_peak_bytes, "step_ms": self.step_ms,
            "elapsed_s": self.elapsed_s,
        }


def finetune(qgraph: QuantizedGraph, scheme: SparseUpdateScheme, train: Samples,
             test: Samples, epochs: float = 1.0, seed: int = 0,
             memory_model: MemoryModel = MemoryModel.INPLACE, reorder: bool = True,
             progress: Progress | None = None) -> FinetuneResult:
    """Train `epochs` passes (fractions allowed) over `train`; measure on `test`."""
    with one_blas_thread():
        return _finetune(qgraph, scheme, train, test, epochs, seed, memory_model, reorder,
                         progress)


def _finetune(qgraph: QuantizedGraph, scheme: SparseUpdateScheme, train: Samples,
              test: Samples, epochs: float, seed: int, memory_model: MemoryModel,
              reorder: bool, progress: Progress | None) -> FinetuneResult:
    if epochs <= 0:
        raise TrainingError(f"epochs {epochs} must be > 0")
    started = time.monotonic()
    trainer = Trainer(qgraph, scheme, memory_model=memory_model, reorder=reorder)
    train_cache = trainer.prefixes(train.images)
    test_cache = trainer.prefixes(test.images)
    labels = [int(y) for y in test.labels]
    before = trainer.accuracy(test_cache, labels)
    steps = max(1, round(epochs * len(train.labels)))
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(train.labels))
                            for _ in range(-(-steps // len(train.labels)))])[:steps]
    losses = np.empty(steps)
    clock = time.monotonic()
    for n, i in enumerate(order):
        losses[n] = trainer.step(None, int(train.labels[i]), train_cache[i]).loss
        if progress is not None:
            progress(n + 1, steps, float(losses[max(0, n - 49):n + 1].mean()))
    step_ms = 1000 * (time.monotonic() - clock) / steps
    after = trainer.accuracy(test_cache, labels)
    chunks = np.array_split(losses, min(CURVE_POINTS, steps))
    return FinetuneResult(
        trained=trainer.export(), scheme=scheme, memory=trainer.memory,
        accuracy_before=before, accuracy_after=after,
        loss_curve=tuple(float(c.mean()) for c in chunks), steps=steps,
        train_samples=len(train.labels), test_samples=len(labels), step_ms=step_ms,
        elapsed_s=time.monotonic() - started)
