"""A tiny trained CNN for tests: sklearn's 8x8 digits upsampled to 16x16, with fixed weights.

The network is MobileNetV2-shaped in miniature (stem conv, one inverted-residual block with
a residual add, a strided block, a 1x1 head, global pooling, classifier) so that every int8 op
the compiler supports is exercised. `digits()` is cached per process.

The weights are checked in (`WEIGHTS`, the torch state dict, 17 kB), not trained at test time:
torch picks AVX-512, AVX2 or plain kernels per CPU, so a model trained in the test would differ
from machine to machine, and so would every threshold measured on it. `train()` made them
(seeded Adam, ~3 s); `python -m tests.firmware.digits_model --write` makes them again.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import numpy.typing as npt
import torch
from sklearn.datasets import load_digits
from torch import nn

from firmware.ir import Activation, Graph, Layer, OpKind, Tensor

SIZE = 16
WEIGHTS = Path(__file__).resolve().parent / "models" / "tinynet-digits.npz"


def conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Conv (no bias) + BatchNorm, as real MobileNets are trained."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout))


class TinyNet(nn.Module):
    """stem 3x3 -> [1x1 expand, dw 3x3, 1x1 project, +] -> [dw 3x3/2, 1x1] -> head -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(1, 8, 3)
        self.expand = conv_bn(8, 16)
        self.dw = conv_bn(16, 16, 3, groups=16)
        self.project = conv_bn(16, 8)
        self.dw2 = conv_bn(8, 8, 3, stride=2, groups=8)
        self.pw2 = conv_bn(8, 16)
        self.head = conv_bn(16, 32)
        self.classifier = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = torch.clamp(self.expand(x), 0, 6)
        y = torch.clamp(self.dw(y), 0, 6)
        x = x + self.project(y)
        x = torch.clamp(self.dw2(x), 0, 6)
        x = self.pw2(x)
        x = torch.relu(self.head(x))
        x = x.mean(dim=(2, 3))
        logits: torch.Tensor = self.classifier(x)
        return logits


def fold(block: nn.Sequential) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Conv weight and bias with the eval-mode BatchNorm folded in (float64, rounded once)."""
    conv, bn = block[0], block[1]
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
    assert bn.running_var is not None and bn.running_mean is not None

    def f64(t: torch.Tensor) -> npt.NDArray[np.float64]:
        return np.asarray(t.detach().numpy(), dtype=np.float64)

    gain = f64(bn.weight) / np.sqrt(f64(bn.running_var) + bn.eps)
    weight = f64(conv.weight) * gain.reshape(-1, 1, 1, 1)
    bias = f64(bn.bias) - f64(bn.running_mean) * gain
    return weight.astype(np.float32), bias.astype(np.float32)


@dataclass(frozen=True)
class Digits:
    """The trained net, its IR graph and held-out data (float NCHW images, labels)."""

    model: TinyNet
    graph: Graph
    calib: npt.NDArray[np.float32]
    x_test: npt.NDArray[np.float32]
    y_test: npt.NDArray[np.int64]


def load_images() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Digits as (N, 1, 16, 16) in about [-1, 1] (nearest-neighbour 2x upsampling)."""
    data = load_digits()
    images = data.images.astype(np.float32) / 8.0 - 1.0
    images = images.repeat(SIZE // 8, axis=1).repeat(SIZE // 8, axis=2)
    return images[:, None], data.target.astype(np.int64)


def to_graph(model: TinyNet) -> Graph:
    """The IR graph of a TinyNet (what the ONNX importer produces for it)."""
    p: dict[str, npt.NDArray[np.float32]] = {}
    for name in ("stem", "expand", "dw", "project", "dw2", "pw2", "head"):
        p[f"{name}.weight"], p[f"{name}.bias"] = fold(getattr(model, name))
    p["classifier.weight"] = model.classifier.weight.detach().numpy().astype(np.float32)
    p["classifier.bias"] = model.classifier.bias.detach().numpy().astype(np.float32)
    s = SIZE
    tensors = [Tensor("input", 1, s, s), Tensor("stem", 8, s, s), Tensor("expand", 16, s, s),
               Tensor("dw", 16, s, s), Tensor("project", 8, s, s), Tensor("add", 8, s, s),
               Tensor("dw2", 8, s // 2, s // 2), Tensor("pw2", 16, s // 2, s // 2),
               Tensor("head", 32, s // 2, s // 2), Tensor("pool", 32, 1, 1),
               Tensor("flatten", 32, 1, 1), Tensor("classifier", 10, 1, 1)]

    def conv(name: str, src: str, k: int = 1, stride: int = 1, groups: int = 1,
             act: Activation = Activation.NONE) -> Layer:
        pad = k // 2
        return Layer(name, OpKind.CONV, (src,), name, kernel=(k, k), stride=(stride, stride),
                     padding=(pad, pad, pad, pad), groups=groups, activation=act,
                     weight=f"{name}.weight", bias=f"{name}.bias")

    layers = (
        conv("stem", "input", 3, act=Activation.RELU),
        conv("expand", "stem", act=Activation.RELU6),
        conv("dw", "expand", 3, groups=16, act=Activation.RELU6),
        conv("project", "dw"),
        Layer("add", OpKind.ADD, ("stem", "project"), "add"),
        conv("dw2", "add", 3, stride=2, groups=8, act=Activation.RELU6),
        conv("pw2", "dw2"),
        conv("head", "pw2", act=Activation.RELU),
        Layer("pool", OpKind.GLOBAL_AVG_POOL, ("head",), "pool"),
        Layer("flatten", OpKind.RESHAPE, ("pool",), "flatten"),
        Layer("classifier", OpKind.FULLY_CONNECTED, ("flatten",), "classifier",
              weight="classifier.weight", bias="classifier.bias"),
    )
    return Graph("tinynet-digits", "input", "classifier", MappingProxyType(
        {t.name: t for t in tensors}), layers, MappingProxyType(p))


def train(x: npt.NDArray[np.float32], y: npt.NDArray[np.int64], epochs: int = 10) -> TinyNet:
    """Adam, batch 32, one torch thread (the test machine has 2 shared cores); BN re-estimated."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(0)
    try:
        with torch.set_grad_enabled(True):
            for _ in range(epochs):
                perm = torch.randperm(len(xt), generator=gen)
                for i in range(0, len(xt), 32):
                    idx = perm[i:i + 32]
                    opt.zero_grad()
                    loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
                    loss.backward()  # type: ignore[no-untyped-call]
                    opt.step()
        # Running statistics from the whole training set, not the last batches' average.
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.reset_running_stats()
                    module.momentum = None
            model(xt)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def split() -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64],
                    npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """1,297 training and 500 held-out digits (a seeded permutation: numpy's, host-independent)."""
    x, y = load_images()
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:-500], y[:-500], x[-500:], y[-500:]


def load_model(path: Path = WEIGHTS) -> TinyNet:
    """TinyNet with the checked-in weights, in eval mode."""
    model = TinyNet()
    with np.load(path) as saved:
        state = {name: torch.from_numpy(saved[name].copy()) for name in saved.files}
    model.load_state_dict(state)
    return model.eval()


def save_model(model: TinyNet, path: Path = WEIGHTS) -> None:
    """Write the state dict as an .npz (the format `load_model` reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **{k: v.detach().numpy() for k, v in model.state_dict().items()})


@functools.lru_cache(maxsize=1)
def digits() -> Digits:
    """TinyNet with its checked-in weights (trained on 1,297 digits); 500 held out for testing."""
    x_train, _, x_test, y_test = split()
    model = load_model()
    return Digits(model, to_graph(model), x_train[:200], x_test, y_test)


def main() -> None:
    """Retrain TinyNet (seeded) and write its weights to WEIGHTS (--write), or just report."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--write", action="store_true", help=f"overwrite {WEIGHTS.name}")
    args = parser.parse_args()
    x_train, y_train, x_test, y_test = split()
    model = train(x_train, y_train)
    with torch.no_grad():
        accuracy = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    print(f"held-out top-1 {accuracy:.1%}")
    if args.write:
        save_model(model)
        print(f"wrote {WEIGHTS}")


if __name__ == "__main__":
    main()
