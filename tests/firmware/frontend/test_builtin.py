"""Built-in networks: layer names, shapes and parameters from an architecture config."""

from __future__ import annotations

import numpy as np
import pytest

from firmware.arch import BlockConfig, NetConfig, mobilenet_v2
from firmware.errors import InvalidModelError
from firmware.frontend.builtin import (
    block_list_networks,
    build_graph,
    builtin_config,
    config_from_block_list,
    load_block_list,
    mobilenet_v2_rd,
)
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


def test_mcunet_10fps_is_built_from_its_block_list() -> None:
    config = builtin_config("mcunet-10fps")
    assert (config.name, config.input_size, config.head_channels) == ("mcunet-10fps", (48, 48),
                                                                      None)
    g = build_graph(config, with_weights=False)
    doc = load_block_list(block_list_networks()["mcunet-10fps"])
    residuals = [i for i, block in enumerate(doc["blocks"]) if block[6]]
    assert [la.name for la in g.layers if la.op is OpKind.ADD] == [f"b{i}.add" for i in residuals]
    assert g.tensor("stem").shape == (24, 24, 24)
    assert "b0.expand" not in g.tensors  # expand ratio 1: depthwise straight away
    assert g.tensor("b1.expand").shape == (64, 24, 24)
    assert g.layer("b4.dw").kernel == (7, 7) and g.tensor("b4.dw").shape == (80, 6, 6)
    assert g.tensor("b14.project").shape == (192, 2, 2)
    assert g.tensor("classifier").shape == (1000, 1, 1)
    assert g.layers[-4].name == "b14.project"  # no feature-mix conv: pool straight after
    at_128 = builtin_config("mcunet-10fps", resolution=128, num_classes=10)
    assert (at_128.name, at_128.input_size, at_128.num_classes) == ("mcunet-10fps-r128",
                                                                    (128, 128), 10)
    with pytest.raises(InvalidModelError, match=r"fixed channel counts: width 0\.5"):
        builtin_config("mcunet-10fps", 0.5)


def _block_list(**changes: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "name": "net", "resolution": [32, 24], "first_conv": [1, 8, 3, 2],
        "blocks": [[8, 8, 3, 1, 1, None, 0], [8, 16, 5, 2, 3, 24, 0], [16, 16, 3, 1, 4, 64, 1]],
        "feature_mix": [16, 40], "classes": 7}
    doc.update(changes)
    return doc


def test_block_list_reader_is_generic_over_the_format() -> None:
    config = config_from_block_list(_block_list())
    assert (config.in_channels, config.stem_channels, config.stem_kernel, config.stem_stride) \
        == (1, 8, 3, 2)
    assert config.input_size == (32, 24) and config.head_channels == 40
    assert config.blocks[1] == BlockConfig(5, 3, 2, 16, residual=False)
    assert config.blocks[2].residual is True
    g = build_graph(config)
    assert g.tensor("head").shape == (40, 8, 6) and g.tensor("classifier").channels == 7
    assert config_from_block_list(_block_list(feature_mix=32)).head_channels == 32


@pytest.mark.parametrize("changes, message", [
    ({"blocks": [[8, 8, 3, 1, 1, None, 0], [9, 16, 5, 2, 3, 27, 0]]},
     "block 1 reads 9 channels, the layer before writes 8"),
    ({"blocks": [[8, 16, 3, 1, 3, 20, 0]]}, r"mid channels 20 != in_ch 8 x expand ratio 3"),
    ({"blocks": [[8, 16, 3, 1, 3, 24, 1]]}, "residual needs stride 1 and in_ch == out_ch"),
    ({"blocks": [[8, 8, 4, 1, 1, None, 0]]}, "kernel odd"),
    ({"blocks": [[8, 8, 3, 1]]}, "block 0 must be"),
    ({"feature_mix": [32, 40]}, "feature_mix reads 32 channels, the last block writes 16"),
    ({"first_conv": [1, 8, 3]}, "first_conv must be a list of 4 integers"),
    ({"classes": 0}, "classes must be a positive integer"),
    ({"resolution": None}, "no resolution"),
])
def test_block_list_errors_name_the_problem(changes: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidModelError, match=message):
        config_from_block_list(_block_list(**changes))
