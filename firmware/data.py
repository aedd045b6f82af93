"""Data sets for supernet training and search: built-in (digits, shapes) and user data.

Images are stored once, at their native size, as uint8 N x C x H x W; `batches` resizes them
to the resolution a subnet runs at (bilinear, antialiased when shrinking) and normalizes to
[-1, 1] ((x / 255 - 0.5) / 0.5, recorded in the model family so the device does the same).
Splits are fixed: a stratified 60/20/20 train/val/test split from a seed.
Nothing is downloaded: digits ship inside scikit-learn, shapes are generated.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from firmware.errors import FirmwareError

if TYPE_CHECKING:  # torch is imported where tensors are made: loading data does not need it
    import torch

INPUT_MEAN = 0.5
INPUT_STD = 0.5
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff")
SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "ring")

U8Array = npt.NDArray[np.uint8]
I64Array = npt.NDArray[np.int64]


class DataError(FirmwareError):
    """A data set cannot be loaded: missing files, bad layout, too few samples per class."""


@dataclass(frozen=True)
class Split:
    """Images (uint8 N x C x H x W) and integer labels of one split."""

    images: U8Array
    labels: I64Array

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Dataset:
    """A classification data set with fixed train/val/test splits.

    `source` is a JSON-ready description from which `load_dataset` rebuilds the same data.
    """

    name: str
    classes: tuple[str, ...]
    train: Split
    val: Split
    test: Split
    source: dict[str, Any]

    @property
    def channels(self) -> int:
        """Image channels (1 grayscale, 3 RGB)."""
        return int(self.train.images.shape[1])

    @property
    def native_size(self) -> tuple[int, int]:
        """(height, width) the images are stored at."""
        return (int(self.train.images.shape[2]), int(self.train.images.shape[3]))


def split_indices(labels: I64Array, seed: int,
                  fractions: tuple[float, float] = (0.6, 0.2)) -> tuple[I64Array, ...]:
    """Stratified (train, val, test) indices: each class split by `fractions`, rest test."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_train = round(len(idx) * fractions[0])
        n_val = round(len(idx) * fractions[1])
        if n_train < 1 or n_val < 1 or len(idx) - n_train - n_val < 1:
            raise DataError(f"class {int(cls)} has {len(idx)} samples; need at least 3 "
                            "(one each for train, val and test)")
        parts[0] += idx[:n_train].tolist()
        parts[1] += idx[n_train:n_train + n_val].tolist()
        parts[2] += idx[n_train + n_val:].tolist()
    return tuple(np.sort(np.asarray(p, dtype=np.int64)) for p in parts)


def from_arrays(name: str, images: U8Array, labels: I64Array, classes: tuple[str, ...],
                source: dict[str, Any], seed: int = 0) -> Dataset:
    """A Dataset from all images and labels, split by `split_indices(labels, seed)`."""
    train, val, test = split_indices(labels, seed)
    return Dataset(name, classes, Split(images[train], labels[train]),
                   Split(images[val], labels[val]), Split(images[test], labels[test]), source)


def digits(seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 handwritten digits, 8x8 grayscale, 10 classes."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are 0..16: scale to 0..255 so every data set shares one uint8 range.
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    return from_arrays("digits", images, labels, tuple(str(i) for i in range(10)),
                       {"kind": "digits", "seed": seed}, seed)


def shapes(samples_per_class: int = 200, size: int = 128, seed: int = 0) -> Dataset:
    """Synthetic RGB shapes (circle, square, triangle, cross, ring) on textured backgrounds."""
    if not 32 <= size <= 512:
        raise DataError(f"shapes size {size} outside [32, 512]")
    rng = np.random.default_rng(seed)
    n = samples_per_class * len(SHAPE_CLASSES)
    labels = np.repeat(np.arange(len(SHAPE_CLASSES), dtype=np.int64), samples_per_class)
    images = np.empty((n, 3, size, size), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(n):
        images[i] = _shape_image(int(labels[i]), yy, xx, rng)
    return from_arrays("shapes", images, labels, SHAPE_CLASSES,
                       {"kind": "shapes", "samples_per_class": samples_per_class,
                        "size": size, "seed": seed}, seed)


def _shape_image(label: int, yy: npt.NDArray[np.float32], xx: npt.NDArray[np.float32],
                 rng: np.random.Generator) -> U8Array:
    # Background: two random sinusoidal gratings plus noise, so that texture is not a cue.
    background = np.zeros((3, *yy.shape), dtype=np.float32)
    for _ in range(2):
        freq, angle, phase = rng.uniform(3, 12), rng.uniform(0, np.pi), rng.uniform(0, 6.3)
        wave = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
        background += rng.uniform(0.1, 0.3, size=(3, 1, 1)) * wave
    noise = np.asarray(rng.normal(0, 0.05, size=background.shape), dtype=np.float32)
    background += 0.45 + noise
    cy, cx = rng.uniform(0.3, 0.7, size=2)
    radius = rng.uniform(0.12, 0.25)
    dy, dx = yy - cy, xx - cx
    if label == 0:
        mask = dy**2 + dx**2 <= radius**2
    elif label == 1:
        mask = (np.abs(dy) <= radius * 0.85) & (np.abs(dx) <= radius * 0.85)
    elif label == 2:
        mask = (dy <= radius * 0.7) & (dy >= -radius + 1.7 * np.abs(dx))
    elif label == 3:
        arm = radius * 0.3
        mask = (((np.abs(dy) <= arm) & (np.abs(dx) <= radius))
                | ((np.abs(dx) <= arm) & (np.abs(dy) <= radius)))
    else:
        dist = dy**2 + dx**2
        mask = (dist <= radius**2) & (dist >= (radius * 0.6) ** 2)
    color = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
    image = np.where(mask[None], color[:, None, None], background)
    return np.clip(image * 255.0, 0, 255).astype(np.uint8)


# Domain shift of the personalization experiments (the device's data differs from the
# family's): each image is rotated 15-30 degrees clockwise, its strokes thickened by a 3x3
# grey dilation, and its contrast compressed to [0, 170] of 255.
SHIFT_ROTATION_DEG = (15.0, 30.0)
SHIFT_CONTRAST = (0, 170)
SHIFT_PARTS = ("analysis", "device")


def shift_images(images: U8Array, seed: int, size: int | None = None,
                 rotation_deg: tuple[float, float] = SHIFT_ROTATION_DEG, stroke: int = 3,
                 contrast: tuple[int, int] = SHIFT_CONTRAST) -> U8Array:
    """Rotated, thicker-stroked, lower-contrast copies of uint8 N x C x H x W images.

    Images are first upsampled (bilinear) to `size` when they are smaller, so that an 8x8
    digit can rotate and thicken; the result is N x C x size x size. Angles are whole degrees
    drawn from `seed` in `rotation_deg` (images sharing an angle are rotated together);
    strokes grow by a `stroke` x `stroke` grey dilation (1: unchanged); intensities are
    stretched to `contrast` (low, high) of 255.
    """
    from scipy import ndimage

    n, c, h, w = images.shape
    target = max(h, size or h)
    stack = images.reshape(n * c, h, w).astype(np.float64)
    if target != h or target != w:
        stack = ndimage.zoom(stack, (1, target / h, target / w), order=1)
    angles = np.round(np.random.default_rng(seed).uniform(*rotation_deg, size=n))
    per_plane = np.repeat(angles, c)
    for angle in np.unique(per_plane):
        sel = per_plane == angle
        stack[sel] = ndimage.rotate(stack[sel], -angle, axes=(1, 2), reshape=False, order=1,
                                    mode="constant", cval=0.0)
    if stroke > 1:
        stack = ndimage.grey_dilation(stack, size=(1, stroke, stroke))
    low, high = contrast
    lo = stack.min(axis=(1, 2), keepdims=True)
    span = np.maximum(stack.max(axis=(1, 2), keepdims=True) - lo, 1e-9)
    out = low + (stack - lo) * ((high - low) / span)
    moved: U8Array = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return moved.reshape(n, c, target, target)


def shifted(dataset: Dataset, part: str = "device", seed: int = 0,
            size: int | None = 32) -> Dataset:
    """A domain-shifted version of `dataset` (all its images), one of two disjoint halves.

    "analysis" is held out for a family's contribution analysis and no device uses it;
    "device" is what simulated devices, tests and benchmarks fine-tune and evaluate on. Each
    half is split 60/20/20 like every data set here.
    """
    images, labels, keep = _shift_half(dataset, part, seed)
    moved = shift_images(images[keep], seed, size)
    return from_arrays(f"{dataset.name}-shifted-{part}", moved, labels[keep], dataset.classes,
                       {"kind": "shifted", "of": dataset.source, "part": part, "seed": seed,
                        "size": size}, seed)


def _shift_half(dataset: Dataset, part: str, seed: int) -> tuple[U8Array, I64Array, I64Array]:
    """All images and labels of `dataset` and the indices of one stratified half."""
    if part not in SHIFT_PARTS:
        raise DataError(f"shifted part {part!r} is not one of {', '.join(SHIFT_PARTS)}")
    images = np.concatenate([dataset.train.images, dataset.val.images, dataset.test.images])
    labels = np.concatenate([dataset.train.labels, dataset.val.labels, dataset.test.labels])
    rng = np.random.default_rng(seed + 7)
    chosen = []
    for cls in np.unique(labels):  # stratified halves
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        half = len(idx) // 2
        chosen.append(idx[:half] if part == "analysis" else idx[half:])
    return images, labels, np.sort(np.concatenate(chosen))


@dataclass(frozen=True)
class DeviceShift:
    """How one simulated device's data differs from the family's (and from other devices)."""

    rotation_deg: tuple[float, float]
    stroke: int  # grey dilation size (1: strokes unchanged)
    contrast: tuple[int, int]
    rare_classes: tuple[int, ...]  # classes this device sees little of
    rare_fraction: float  # the share of their samples it keeps


def device_shift(index: int) -> DeviceShift:
    """The shift of simulated device `index`: rotation, stroke width, contrast, imbalance.

    Every device is rotated clockwise (10-35 degrees, a band per device), thickened (3x3 or
    4x4) and dimmed (its own contrast), and sees two classes at a quarter of their share.
    """
    start = 10.0 + 5.0 * (index % 4)
    return DeviceShift(rotation_deg=(start, start + 12.0), stroke=3 + (index % 2),
                       contrast=(0, (150, 170, 190)[index % 3]),
                       rare_classes=((index * 3) % 10, (index * 3 + 5) % 10),
                       rare_fraction=0.25)


def device_slice(dataset: Dataset, index: int, seed: int = 0, size: int | None = 32,
                 fraction: float = 0.7) -> Dataset:
    """The local data of simulated device `index`: a seeded `fraction` of the "device" half
    of `dataset` (never the "analysis" half), shifted by `device_shift(index)`."""
    images, labels, half = _shift_half(dataset, "device", seed)
    shift = device_shift(index)
    rng = np.random.default_rng([seed, index, 11])
    keep = []
    for cls in np.unique(labels[half]):
        idx = half[labels[half] == cls]
        share = fraction * (shift.rare_fraction if int(cls) in shift.rare_classes else 1.0)
        keep.append(rng.choice(idx, size=max(3, round(share * len(idx))), replace=False))
    chosen = np.sort(np.concatenate(keep))
    moved = shift_images(images[chosen], seed + 1000 * (index + 1), size, shift.rotation_deg,
                         shift.stroke, shift.contrast)
    return from_arrays(f"{dataset.name}-device-{index}", moved, labels[chosen],
                       dataset.classes, {"kind": "device", "of": dataset.source,
                                         "index": index, "seed": seed, "size": size,
                                         "fraction": fraction}, seed)


def load_npz(path: str | Path, seed: int = 0) -> Dataset:
    """A data set from an .npz with `x` (N,H,W | N,H,W,C | N,C,H,W; uint8 or [0,1] float),
    `y` (N integer labels) and optionally `classes` (names)."""
    target = Path(path)
    try:
        with np.load(target, allow_pickle=False) as data:
            if "x" not in data or "y" not in data:
                raise DataError(f"{target}: needs arrays 'x' and 'y', has {sorted(data.files)}")
            x, y = data["x"], data["y"]
            names = tuple(str(c) for c in data["classes"]) if "classes" in data else None
    except (OSError, ValueError) as exc:
        raise DataError(f"{target}: not a readable .npz: {exc}") from None
    images = _to_nchw_u8(x, target)
    if y.ndim != 1 or y.shape[0] != images.shape[0] or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{target}: y must be {images.shape[0]} integer labels, "
                        f"got {y.dtype} {y.shape}")
    labels = y.astype(np.int64)
    n_classes = int(labels.max()) + 1
    if labels.min() < 0:
        raise DataError(f"{target}: labels must be >= 0, got {int(labels.min())}")
    classes = names if names is not None else tuple(str(i) for i in range(n_classes))
    if len(classes) < n_classes:
        raise DataError(f"{target}: {len(classes)} class names for labels up to {n_classes - 1}")
    return from_arrays(target.stem, images, labels, classes,
                       {"kind": "npz", "path": str(target.resolve()), "seed": seed}, seed)


def _to_nchw_u8(x: npt.NDArray[Any], origin: Path) -> U8Array:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = np.transpose(x, (0, 3, 1, 2))
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DataError(f"{origin}: x must be N,H,W or N,H,W,C or N,C,H,W with C 1 or 3, "
                        f"got shape {x.shape}")
    if np.issubdtype(x.dtype, np.floating):
        if x.min() < 0 or x.max() > 1:
            raise DataError(f"{origin}: float images must lie in [0, 1], got "
                            f"[{float(x.min()):g}, {float(x.max()):g}]")
        return np.round(x * 255).astype(np.uint8)
    if x.dtype != np.uint8:
        raise DataError(f"{origin}: x must be uint8 or float in [0, 1], got {x.dtype}")
    return np.ascontiguousarray(x)


def load_image_folder(path: str | Path, size: int = 64, seed: int = 0) -> Dataset:
    """A data set from ROOT/<class>/<image>, resized to size x size; RGB unless all gray."""
    from PIL import Image

    root = Path(path)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if len(class_dirs) < 2:
        raise DataError(f"{root}: need a folder with at least 2 class subfolders, "
                        f"found {len(class_dirs)}")
    pictures: list[Any] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(f for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        for file in files:
            with Image.open(file) as img:
                pictures.append(img.copy())
            labels.append(label)
    gray = all(p.mode in ("L", "1", "I", "I;16") for p in pictures)
    mode = "L" if gray else "RGB"
    arrays = [np.asarray(p.convert(mode).resize((size, size), Image.Resampling.BILINEAR))
              for p in pictures]
    images = np.stack(arrays).astype(np.uint8)
    images = images[:, None] if gray else np.transpose(images, (0, 3, 1, 2))
    return from_arrays(root.name, np.ascontiguousarray(images), np.asarray(labels, np.int64),
                       tuple(d.name for d in class_dirs),
                       {"kind": "folder", "path": str(root.resolve()), "size": size,
                        "seed": seed}, seed)


def load_dataset(source: str | dict[str, Any]) -> Dataset:
    """A data set by name ("digits", "shapes"), by path (.npz or folder), or by `source`."""
    if isinstance(source, dict):
        kind = source.get("kind")
        seed = int(source.get("seed", 0))
        if kind == "digits":
            return digits(seed)
        if kind == "shapes":
            return shapes(int(source["samples_per_class"]), int(source["size"]), seed)
        if kind == "npz":
            return load_npz(source["path"], seed)
        if kind == "folder":
            return load_image_folder(source["path"], int(source["size"]), seed)
        if kind == "shifted":
            size = source.get("size")
            return shifted(load_dataset(source["of"]), str(source["part"]), seed,
                           None if size is None else int(size))
        if kind == "device":
            size = source.get("size")
            return device_slice(load_dataset(source["of"]), int(source["index"]), seed,
                                None if size is None else int(size),
                                float(source.get("fraction", 0.7)))
        raise DataError(f"unknown data source kind {kind!r}")
    if source == "digits":
        return digits()
    if source == "shapes":
        return shapes()
    target = Path(source)
    if target.suffix == ".npz" and target.is_file():
        return load_npz(target)
    if target.is_dir():
        return load_image_folder(target)
    raise DataError(f"data {source!r}: not 'digits', 'shapes', an .npz file or a folder")


def to_tensor(images: U8Array, resolution: int) -> torch.Tensor:
    """uint8 N x C x H x W -> float N x C x r x r, normalized as INPUT_MEAN / INPUT_STD."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images).float().div_(255.0).sub_(INPUT_MEAN).div_(INPUT_STD)
    if x.shape[-2:] != (resolution, resolution):
        shrink = x.shape[-1] > resolution
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear",
                          align_corners=False, antialias=shrink)
    return x


def batches(split: Split, resolution: int, batch_size: int, shuffle_seed: int | None = None,
            limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of `split` at `resolution`; shuffled when a seed is given."""
    import torch

    order = list(range(len(split)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    if limit is not None:
        order = order[:limit]
    for start in range(0, len(order), batch_size):
        idx = np.asarray(order[start:start + batch_size], dtype=np.int64)
        yield to_tensor(split.images[idx], resolution), torch.from_numpy(split.labels[idx])
