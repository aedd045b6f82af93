"""The float executor against torch on the trained digits net and on grouped/pooled layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from firmware.float_exec import avg_pool, conv2d, run_all, run_graph
from firmware.ir import Layer, OpKind
from tests.firmware.digits_model import digits

pytestmark = pytest.mark.unit


def test_digits_graph_matches_torch() -> None:
    d = digits()
    with torch.no_grad():
        want = d.model(torch.from_numpy(d.x_test[:64])).numpy()
    got = run_graph(d.graph, d.x_test[:64])[:, :, 0, 0]
    assert np.allclose(got, want, atol=1e-4)
    assert set(run_all(d.graph, d.x_test[:2])) == set(d.graph.tensors)


@pytest.mark.parametrize("groups, stride, pad", [(1, 2, (1, 0, 1, 0)), (2, 1, (0, 0, 0, 0)),
                                                 (4, 2, (1, 1, 1, 1))])
def test_conv_matches_torch(groups: int, stride: int, pad: tuple[int, int, int, int]) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 7, 6)).astype(np.float32)
    w = rng.normal(size=(8, 4 // groups, 3, 3)).astype(np.float32)
    b = rng.normal(size=8).astype(np.float32)
    layer = Layer("c", OpKind.CONV, ("x",), "y", kernel=(3, 3), stride=(stride, stride),
                  padding=pad, groups=groups)
    xt = torch.nn.functional.pad(torch.from_numpy(x), (pad[1], pad[3], pad[0], pad[2]))
    want = torch.nn.functional.conv2d(xt, torch.from_numpy(w), torch.from_numpy(b),
                                      stride=stride, groups=groups).numpy()
    assert np.allclose(conv2d(x, w, b, layer), want, atol=1e-4)


def test_avg_pool_counts_padding_like_torch() -> None:
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 5)).astype(np.float32)
    layer = Layer("p", OpKind.AVG_POOL, ("x",), "y", kernel=(3, 3), stride=(2, 2),
                  padding=(1, 1, 1, 1))
    want = torch.nn.functional.avg_pool2d(torch.from_numpy(x), 3, 2, 1).numpy()
    assert np.allclose(avg_pool(x, layer), want, atol=1e-6)
