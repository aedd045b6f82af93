"""Supernet training with the sandwich rule (BigNAS / OFA), checkpointing and resume.

Each step trains, on one batch, the largest subnet (on the true labels), the smallest and
`random_subnets` random subnets (on the largest's soft outputs when `distill`, else on the
labels), accumulating their gradients into one update. Every epoch reseeds its samplers from
(seed, epoch), so training 2 epochs equals training 1, checkpointing, and resuming for 1.
The checkpoint is a torch file written atomically after every epoch.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from firmware.data import Dataset, batches
from firmware.errors import FirmwareError
from firmware.nas.accuracy import torch_threads
from firmware.nas.space import Arch
from firmware.nas.supernet import Supernet


class TrainError(FirmwareError):
    """Training cannot start or resume (bad settings, a checkpoint of another run)."""


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters. `lr` is SGD's peak rate (Nesterov momentum 0.9, cosine decay)."""

    epochs: int = 8
    batch_size: int = 64
    lr: float = 0.1
    weight_decay: float = 3e-5
    random_subnets: int = 2
    distill: bool = True
    label_smoothing: float = 0.1
    seed: int = 0
    # torch's intra-op threads. On a shared 2-core machine 2 threads that spin-wait for each
    # other run small nets up to 9x slower than 1 (measured with the test space).
    threads: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.random_subnets < 0 or self.lr <= 0:
            raise TrainError(f"bad training settings {self}: epochs and batch_size must be >= 1, "
                             "random_subnets >= 0, lr > 0")


@dataclass(frozen=True)
class TrainProgress:
    """Reported after every step: where training is and how it goes."""

    epoch: int
    epochs: int
    step: int
    steps_per_epoch: int
    loss: float
    elapsed_s: float


@dataclass(frozen=True)
class TrainSummary:
    """What a `train_supernet` call did."""

    epochs_done: int
    resumed_from_epoch: int
    elapsed_s: float
    last_epoch_loss: float


ProgressFn = Callable[[TrainProgress], None]


def steps_per_epoch(dataset: Dataset, config: TrainConfig) -> int:
    """Optimizer steps in one pass over the training split."""
    return -(-len(dataset.train) // config.batch_size)


def train_supernet(supernet: Supernet, dataset: Dataset, config: TrainConfig,
                   checkpoint: Path | None = None, resume: bool = False,
                   progress: ProgressFn | None = None,
                   stop_after_epochs: int | None = None) -> TrainSummary:
    """Train `supernet` in place on `dataset` up to `config.epochs` epochs (in total).

    `stop_after_epochs` ends this call early (a time-sliced job, or an interruption in a
    test); a later call with `resume` continues exactly where it stopped.
    """
    with torch_threads(config.threads):
        return _train(supernet, dataset, config, checkpoint, resume, progress, stop_after_epochs)


def _train(supernet: Supernet, dataset: Dataset, config: TrainConfig, checkpoint: Path | None,
           resume: bool, progress: ProgressFn | None,
           stop_after_epochs: int | None) -> TrainSummary:
    optimizer = torch.optim.SGD(supernet.parameters(), lr=config.lr, momentum=0.9,
                                nesterov=True, weight_decay=config.weight_decay)
    total_steps = config.epochs * steps_per_epoch(dataset, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(total_steps))
    start_epoch = 0
    if resume and checkpoint is not None and checkpoint.exists():
        start_epoch = _load_checkpoint(checkpoint, supernet, optimizer, scheduler, config)
    started = time.monotonic()
    loss = float("nan")
    end = config.epochs if stop_after_epochs is None else min(config.epochs, stop_after_epochs)
    for epoch in range(start_epoch, end):
        loss = _train_epoch(supernet, dataset, config, optimizer, scheduler, epoch, started,
                            progress)
        if checkpoint is not None:
            save_checkpoint(checkpoint, supernet, optimizer, scheduler, config, epoch + 1)
    supernet.eval()
    return TrainSummary(max(end, start_epoch), start_epoch, time.monotonic() - started, loss)


def _cosine(total_steps: int) -> Callable[[int], float]:
    warmup = max(1, total_steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + float(torch.cos(torch.tensor(torch.pi * progress))))

    return factor


def _train_epoch(supernet: Supernet, dataset: Dataset, config: TrainConfig,
                 optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int, started: float,
                 progress: ProgressFn | None) -> float:
    space = supernet.space
    rng = random.Random(config.seed * 100_003 + epoch)
    torch.manual_seed(config.seed * 100_003 + epoch)
    supernet.train()
    n_steps = steps_per_epoch(dataset, config)
    total = 0.0
    largest = space.largest()
    for step, (images, labels) in enumerate(
            batches(dataset.train, dataset.native_size[0], config.batch_size,
                    shuffle_seed=rng.randrange(2**31))):
        optimizer.zero_grad(set_to_none=True)
        teacher_logits, step_loss = _sandwich_member(supernet, largest, images, labels, None,
                                                     config)
        subnets = [space.smallest()] + [space.sample(rng) for _ in range(config.random_subnets)]
        soft = teacher_logits.detach().softmax(dim=1) if config.distill else None
        for arch in subnets:
            step_loss += _sandwich_member(supernet, arch, images, labels, soft, config)[1]
        optimizer.step()
        scheduler.step()
        step_loss /= 1 + len(subnets)
        total += step_loss
        if progress is not None:
            progress(TrainProgress(epoch + 1, config.epochs, step + 1, n_steps, step_loss,
                                   time.monotonic() - started))
    return total / n_steps


def _sandwich_member(supernet: Supernet, arch: Arch, images: torch.Tensor,
                     labels: torch.Tensor, soft_targets: torch.Tensor | None,
                     config: TrainConfig) -> tuple[torch.Tensor, float]:
    x = _resize(images, arch.resolution)
    logits = supernet(x, arch)
    if soft_targets is None:
        loss = F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
    else:
        loss = F.cross_entropy(logits, soft_targets)
    loss.backward()  # type: ignore[no-untyped-call]
    return logits, float(loss.detach())


def _resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    if images.shape[-1] == resolution:
        return images
    shrink = images.shape[-1] > resolution
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear",
                         align_corners=False, antialias=shrink)


def save_checkpoint(path: Path, supernet: Supernet, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, config: TrainConfig,
                    epoch: int) -> None:
    """Write the training state after `epoch` epochs atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"epoch": epoch, "config": asdict(config), "space": supernet.space.to_dict(),
                "model": supernet.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, tmp)
    tmp.replace(path)


def _load_checkpoint(path: Path, supernet: Supernet, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler,
                     config: TrainConfig) -> int:
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if state["space"] != supernet.space.to_dict():
        raise TrainError(f"checkpoint {path} is of space {state['space'].get('name')!r}, "
                         f"not of {supernet.space.name!r}")
    saved = dict(state["config"])
    mine = asdict(config)
    # Only the epoch count may grow on resume; anything else changes the run.
    diffs = {k: (saved[k], mine[k]) for k in mine if k != "epochs" and saved.get(k) != mine[k]}
    if diffs:
        raise TrainError(f"checkpoint {path} was trained with other settings: "
                         + ", ".join(f"{k} {a!r} != {b!r}" for k, (a, b) in diffs.items()))
    epoch = int(state["epoch"])
    if epoch > config.epochs:
        raise TrainError(f"checkpoint {path} is at epoch {epoch}, past epochs={config.epochs}")
    supernet.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return epoch
