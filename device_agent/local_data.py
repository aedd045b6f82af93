"""A device's local data: a directory holding an .npz or an image folder, never sent anywhere.

    DATA/local.npz           x (N,H,W | N,H,W,C | N,C,H,W; uint8 or float in [0, 1]) and y
    DATA/<class>/<image>     or an image folder (firmware.data.load_image_folder)

Splits are firmware.data's stratified 60/20/20: personalization trains on `train` and
measures on the held-out `test`. `write_device_data` fills a directory with simulated device
`index`'s shifted slice of the digits (firmware.data.device_slice) for tests and the demo.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from device_agent.errors import AgentError
from firmware.data import DataError, Dataset, device_slice, digits, load_image_folder, load_npz

LOCAL_NPZ = "local.npz"


def load_local(data_dir: Path, seed: int = 0) -> Dataset:
    """The device's data set; AgentError names what is missing or malformed."""
    if not data_dir.is_dir():
        raise AgentError(f"data directory {data_dir} does not exist")
    npz = sorted(data_dir.glob("*.npz"))
    try:
        if len(npz) == 1:
            return load_npz(npz[0], seed)
        if len(npz) > 1:
            raise AgentError(f"data directory {data_dir} holds {len(npz)} .npz files; keep one")
        return load_image_folder(data_dir, seed=seed)
    except DataError as exc:
        raise AgentError(f"local data: {exc}") from None


def write_device_data(data_dir: Path, index: int, seed: int = 0) -> Path:
    """Write simulated device `index`'s shifted digits slice as DATA/local.npz."""
    data = device_slice(digits(seed), index, seed)
    images = np.concatenate([data.train.images, data.val.images, data.test.images])[:, 0]
    labels = np.concatenate([data.train.labels, data.val.labels, data.test.labels])
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCAL_NPZ
    tmp = data_dir / (LOCAL_NPZ + ".tmp.npz")
    np.savez(tmp, x=images, y=labels)
    tmp.replace(path)
    return path
