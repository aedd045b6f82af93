"""Built-in networks: layer names, shapes and parameters from an architecture config."""

from __future__ import annotations

import numpy as np
import pytest

from firmware.arch import BlockConfig, NetConfig, mobilenet_v2
from firmware.errors import InvalidModelError
from firmware.frontend.builtin import build_graph, builtin_config, mobilenet_v2_rd
from firmware.ir import Activation, OpKind

pytestmark = pytest.mark.unit


def _tiny(residual: bool | None = None) -> NetConfig:
    return NetConfig(
        name="tiny", input_size=(17, 13), stem_channels=8,
        blocks=(BlockConfig(3, 1, 1, 8), BlockConfig(5, 4, 2, 12),
                BlockConfig(7, 3, 1, 12, residual=residual)),
        head_channels=32, num_classes=5)


def test_mobilenetv2_layer_names_and_shapes() -> None:
    g = build_graph(mobilenet_v2(), with_weights=False)
    names = [layer.name for layer in g.layers]
    assert names[:5] == ["stem", "b0.dw", "b0.project", "b1.expand", "b1.dw"]
    assert names[-4:] == ["head", "pool", "flatten", "classifier"]
    assert sum(1 for n in names if n.endswith(".add")) == 10  # MobileNetV2 has 10 residuals
    assert g.tensor("b1.expand").shape == (96, 112, 112)
    assert g.tensor("b3.project").shape == (32, 28, 28)
    assert g.tensor("classifier").shape == (1000, 1, 1)
    dw = g.layer("b1.dw")
    assert (dw.groups, dw.stride, dw.padding) == (96, (2, 2), (1, 1, 1, 1))
    assert g.layer("b1.project").activation is Activation.NONE
    assert g.layer("b2.add").inputs == ("b1.project", "b2.project")


def test_weights_are_deterministic_and_shaped() -> None:
    cfg = _tiny()
    a, b = build_graph(cfg, seed=3), build_graph(cfg, seed=3)
    assert set(a.params) == {f"{layer.name}.{p}" for layer in a.layers
                             if layer.op in (OpKind.CONV, OpKind.FULLY_CONNECTED)
                             for p in ("weight", "bias")}
    for key, value in a.params.items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, b.params[key])
    assert a.params["b1.dw.weight"].shape == (32, 1, 5, 5)
    assert a.params["classifier.weight"].shape == (5, 32)
    other = build_graph(cfg, seed=4)
    assert not np.array_equal(a.params["stem.weight"], other.params["stem.weight"])


def test_non_square_shapes_and_residual() -> None:
    g = build_graph(_tiny(), with_weights=False)
    assert g.tensor("stem").shape == (8, 9, 7)
    assert g.tensor("b1.dw").shape == (32, 5, 4)
    assert g.layer("b2.add").op is OpKind.ADD
    assert "b0.add" in [layer.name for layer in g.layers]  # stride 1, 8 -> 8: residual


def test_explicit_params_are_checked() -> None:
    cfg = _tiny()
    params = dict(build_graph(cfg).params)
    g = build_graph(cfg, params=params)
    assert g.params["stem.weight"] is not None
    params["stem.weight"] = np.zeros((8, 3, 1, 1), np.float32)
    with pytest.raises(InvalidModelError, match=r"stem\.weight.*\(8, 3, 3, 3\)"):
        build_graph(cfg, params=params)


def test_forced_residual_with_wrong_shapes_is_rejected() -> None:
    cfg = NetConfig("bad", (16, 16), 8, (BlockConfig(3, 2, 2, 8, residual=True),), None, 2)
    with pytest.raises(InvalidModelError, match="b0: residual needs stride 1"):
        build_graph(cfg, with_weights=False)


def test_builtin_configs() -> None:
    assert builtin_config("mobilenetv2", 0.35, 96).input_size == (96, 96)
    rd = build_graph(mobilenet_v2_rd(), with_weights=False)
    assert rd.tensor("b1.project").shape == (24, 28, 28)
    with pytest.raises(InvalidModelError, match="unknown built-in network 'resnet'"):
        builtin_config("resnet")
