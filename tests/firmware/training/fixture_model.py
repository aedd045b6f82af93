"""A small digits classifier with fixed (checked-in) weights, for the fine-tuning tests.

The TinyNet of tests/firmware/digits_model.py (every int8 op: stem, expand, depthwise,
project with residual add, strided depthwise, head, pooling, classifier) trained once on the
plain digits at 16x16, normalized as the model families are ((x/255 - 0.5)/0.5), BN folded.
Tests load the weights, so nothing depends on the host's torch kernels.
Regenerate with `.venv/bin/python -m tests.firmware.training.fixture_model` (then commit).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import numpy.typing as npt

from firmware.data import Dataset, digits, to_tensor
from firmware.int8.quantize import QuantizedGraph, quantize_graph
from firmware.ir import Graph

SIZE = 16
WEIGHTS = Path(__file__).with_name("fixtures") / "tinynet_digits16.npz"


def graph() -> Graph:
    """The IR graph of the checked-in TinyNet."""
    import dataclasses
    from types import MappingProxyType

    from tests.firmware.digits_model import TinyNet, to_graph

    skeleton = to_graph(TinyNet())
    with np.load(WEIGHTS) as data:
        params = {name: np.asarray(data[name], dtype=np.float32) for name in data.files}
    return dataclasses.replace(skeleton, name="tinynet-digits16",
                               params=MappingProxyType(params))


@functools.lru_cache(maxsize=1)
def plain_digits() -> Dataset:
    """scikit-learn's digits (cached per process)."""
    return digits()


def inputs(images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """uint8 N x 1 x H x W -> float N x 1 x 16 x 16, normalized as the families."""
    out: npt.NDArray[np.float32] = to_tensor(images, SIZE).numpy()
    return out


@functools.lru_cache(maxsize=1)
def quantized() -> QuantizedGraph:
    """The TinyNet quantized on the first 64 plain training digits."""
    return quantize_graph(graph(), inputs(plain_digits().train.images[:64]))


def export_onnx(path: Path) -> Path:
    """The checked-in TinyNet as ONNX (conv + identity BN per layer, as an exporter writes)."""
    import io

    import torch

    from tests.firmware.digits_model import TinyNet

    params = dict(graph().params)
    model = TinyNet().eval()
    with torch.no_grad():
        for name in ("stem", "expand", "dw", "project", "dw2", "pw2", "head"):
            conv, bn = getattr(model, name)
            conv.weight.copy_(torch.from_numpy(params[f"{name}.weight"]))
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(params[f"{name}.bias"]))
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
        model.classifier.weight.copy_(torch.from_numpy(params["classifier.weight"]))
        model.classifier.bias.copy_(torch.from_numpy(params["classifier.bias"]))
    buffer = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(1, 1, SIZE, SIZE),), buffer, dynamo=False)
    path.write_bytes(buffer.getvalue())
    return path


def _train_and_save() -> None:  # pragma: no cover - run by hand to regenerate the fixture
    import torch

    from tests.firmware.digits_model import train

    data = plain_digits()
    model = train(inputs(data.train.images), data.train.labels, epochs=30)
    from tests.firmware.digits_model import to_graph

    params = dict(to_graph(model).params)
    WEIGHTS.parent.mkdir(exist_ok=True)
    np.savez_compressed(WEIGHTS, **params)
    x = torch.from_numpy(inputs(data.test.images))
    with torch.no_grad():
        acc = float((model(x).argmax(1).numpy() == data.test.labels).mean())
    print(f"wrote {WEIGHTS} ({WEIGHTS.stat().st_size} bytes); float test accuracy {acc:.3f}")


if __name__ == "__main__":  # pragma: no cover
    _train_and_save()
