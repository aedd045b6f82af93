"""Built-in and user data sets: fixed splits, determinism, layouts, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from firmware.data import (
    DataError,
    batches,
    digits,
    load_dataset,
    load_image_folder,
    load_npz,
    shapes,
    to_tensor,
)

pytestmark = pytest.mark.unit


def test_digits_split_is_fixed_stratified_and_disjoint() -> None:
    a, b = digits(), digits()
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert a.classes == tuple(str(i) for i in range(10))
    assert a.channels == 1 and a.native_size == (8, 8)
    np.testing.assert_array_equal(a.val.images, b.val.images)
    # Every class appears in every split in about the same share.
    for split in (a.train, a.val, a.test):
        counts = np.bincount(split.labels, minlength=10)
        assert counts.min() >= 0.8 * counts.mean()
    train_rows = {img.tobytes() for img in a.train.images}
    overlap = sum(img.tobytes() in train_rows for img in a.test.images)
    assert overlap < 5  # the raw data holds a few duplicate images, nothing more
    assert a.train.images.max() == 255 and a.train.images.dtype == np.uint8


def test_shapes_are_deterministic_per_seed_and_classes_differ() -> None:
    one, two, other = shapes(6, 96, seed=1), shapes(6, 96, seed=1), shapes(6, 96, seed=2)
    np.testing.assert_array_equal(one.train.images, two.train.images)
    assert not np.array_equal(one.train.images, other.train.images)
    assert one.channels == 3 and one.native_size == (96, 96)
    assert len(one.classes) == 5
    with pytest.raises(DataError, match="size 8"):
        shapes(2, 8)


def test_batches_resize_and_normalize() -> None:
    data = digits()
    x, y = next(batches(data.val, 32, 16))
    assert x.shape == (16, 1, 32, 32) and y.shape == (16,)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    native = to_tensor(data.val.images[:4], 8)
    assert torch.allclose(native, torch.from_numpy(data.val.images[:4]).float() / 127.5 - 1)
    order1 = next(batches(data.train, 8, 8, shuffle_seed=3))[1]
    order2 = next(batches(data.train, 8, 8, shuffle_seed=3))[1]
    assert torch.equal(order1, order2)
    assert sum(len(b[1]) for b in batches(data.test, 8, 50)) == len(data.test)


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw", "float"])
def test_npz_layouts_load(tmp_path: Path, layout: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(30, 12, 12, 3), dtype=np.uint8)
    y = np.arange(30) % 3
    stored: np.ndarray = {"nhw": x[..., 0], "nhwc": x, "nchw": x.transpose(0, 3, 1, 2),
                          "float": x / 255.0}[layout]
    path = tmp_path / "set.npz"
    np.savez(path, x=stored, y=y, classes=np.array(["a", "b", "c"]))
    data = load_npz(path)
    channels = 1 if layout == "nhw" else 3
    assert data.channels == channels and data.native_size == (12, 12)
    assert data.classes == ("a", "b", "c")
    assert len(data.train) + len(data.val) + len(data.test) == 30
    assert load_dataset(data.source).val.images.tobytes() == data.val.images.tobytes()


def test_npz_errors_name_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, x=np.zeros((4, 5)), y=np.zeros(4, dtype=int))
    with pytest.raises(DataError, match="shape"):
        load_npz(path)
    np.savez(path, images=np.zeros((4, 5, 5)))
    with pytest.raises(DataError, match="needs arrays 'x' and 'y'"):
        load_npz(path)
    np.savez(path, x=np.zeros((6, 5, 5), dtype=np.uint8), y=np.array([0, 0, 0, 1, 1, 1]))
    with pytest.raises(DataError, match="at least 3"):
        load_npz(path)


def test_image_folder_loads_classes_per_subfolder(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(5):
            pixels = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    data = load_image_folder(tmp_path, size=16)
    assert data.classes == ("cat", "dog")
    assert data.channels == 3 and data.native_size == (16, 16)
    assert len(data.train) + len(data.val) + len(data.test) == 10
    assert load_dataset(str(tmp_path)).classes == ("cat", "dog")
    with pytest.raises(DataError, match="at least 2 class subfolders"):
        load_image_folder(tmp_path / "cat")
    with pytest.raises(DataError, match="not 'digits'"):
        load_dataset(str(tmp_path / "missing"))
