"""The sparse-update scheme format, positions from the end, and templates across subnets."""

from __future__ import annotations

import json

import pytest

from firmware.frontend.builtin import build_graph, builtin_config
from firmware.nas.space import SearchSpace
from firmware.training.errors import SchemeError
from firmware.training.positions import Position, Role, positions
from firmware.training.scheme import (
    SCHEME_FORMAT,
    ClassifierMode,
    SchemeTemplate,
    SparseUpdateScheme,
    WeightUpdate,
    resolve,
)
from tests.firmware.small_models import tiny_graph

pytestmark = pytest.mark.unit

SCHEME = SparseUpdateScheme(bias_layers=6, weights=(WeightUpdate("b3.project", 0.5),
                                                    WeightUpdate("b3.dw", 0.125)),
                            classifier=ClassifierMode.INT8, lr=0.01, momentum=0.9,
                            accumulate_steps=4, qas=False)


def test_json_round_trip_and_frozen_field_names() -> None:
    doc = json.loads(SCHEME.to_json())
    assert doc == {
        "format": SCHEME_FORMAT, "version": 1, "classifier": "int8", "bias_layers": 6,
        "weights": [{"layer": "b3.project", "ratio": 0.5}, {"layer": "b3.dw", "ratio": 0.125}],
        "optimizer": {"kind": "sgd", "lr": 0.01, "momentum": 0.9}, "accumulate_steps": 4,
        "qas": False}
    assert SparseUpdateScheme.from_json(SCHEME.to_json()) == SCHEME
    minimal = SparseUpdateScheme.from_dict({"format": SCHEME_FORMAT, "version": 1})
    assert minimal == SparseUpdateScheme()


@pytest.mark.parametrize(("change", "message"), [
    ({"format": "other"}, "format 'other'"),
    ({"version": 2}, "scheme version 2"),
    ({"bias_layers": -1}, "bias_layers -1"),
    ({"bias_layers": "3"}, "field 'bias_layers' must be int"),
    ({"weights": [{"layer": "b3.dw", "ratio": 0.3}]}, "ratio 0.3"),
    ({"weights": [{"layer": "b3.dw"}]}, r"weights\[0\] must be"),
    ({"weights": [{"layer": "x", "ratio": 1}, {"layer": "x", "ratio": 0.5}]}, "twice"),
    ({"classifier": "fp16"}, "classifier 'fp16'"),
    ({"optimizer": {"kind": "adam", "lr": 0.1}}, "only"),
    ({"optimizer": {"kind": "sgd", "lr": -1}}, "optimizer.lr"),
    ({"optimizer": {"kind": "sgd", "lr": 0.1, "momentum": 1.0}}, "momentum"),
    ({"accumulate_steps": 0}, "accumulate_steps 0"),
    ({"surprise": 1}, "unknown field"),
])
def test_bad_schemes_name_the_field(change: dict[str, object], message: str) -> None:
    doc = {**SCHEME.to_dict(), **change}
    with pytest.raises(SchemeError, match=message):
        SparseUpdateScheme.from_dict(doc)


def test_not_json_is_refused() -> None:
    with pytest.raises(SchemeError, match="not a JSON scheme"):
        SparseUpdateScheme.from_json("{nope")


def test_resolve_checks_the_graph() -> None:
    graph = tiny_graph()
    resolved = resolve(SCHEME, graph)
    assert resolved.trainable["b3.project"].weight_channels == 12  # 24 in, ratio 1/2
    assert resolved.trainable["b3.dw"].weight_channels == 3  # 24 channels, ratio 1/8
    assert resolved.weight_shape("b3.dw") == (3, 1, 5, 5)
    assert resolved.weight_shape("b3.project") == (12, 12, 1, 1)
    assert resolved.region_start == graph.index("b2.dw")  # the 6th conv from the end
    with pytest.raises(SchemeError, match=r"no layer 'b9\.dw'"):
        resolve(SparseUpdateScheme(weights=(WeightUpdate("b9.dw", 1.0),)), graph)
    with pytest.raises(SchemeError, match="not a conv"):
        resolve(SparseUpdateScheme(weights=(WeightUpdate("classifier", 1.0),)), graph)
    with pytest.raises(SchemeError, match="bias_layers 99"):
        resolve(SparseUpdateScheme(bias_layers=99), graph)


def test_positions_from_the_end_of_mobilenetv2() -> None:
    graph = build_graph(builtin_config("mobilenetv2", 0.35, 96, 10), with_weights=False)
    pos = positions(graph)
    assert pos["classifier"] == Position(0, Role.CLASSIFIER)
    assert pos["head"] == Position(0, Role.HEAD)
    assert pos["b16.project"] == Position(1, Role.PROJECT)
    assert pos["b16.dw"] == Position(1, Role.DEPTHWISE)
    assert pos["b16.expand"] == Position(1, Role.EXPAND)
    assert pos["b15.expand"] == Position(2, Role.EXPAND)
    assert pos["b0.dw"] == Position(17, Role.DEPTHWISE)  # the first block has no expand
    assert pos["b0.project"] == Position(17, Role.PROJECT)
    assert pos["stem"] == Position(18, Role.STEM)
    assert Position.parse("1.project") == Position(1, Role.PROJECT)
    with pytest.raises(Exception, match=r"BLOCK\.ROLE"):
        Position.parse("x.project")


def test_template_applies_to_every_subnet_of_a_space() -> None:
    space = SearchSpace(name="t", resolutions=(32,), num_classes=10, in_channels=1,
                        stem_channels=8, first_block_channels=8, stage_channels=(16, 24),
                        stage_strides=(2, 2), last_block_channels=None, head_channels=32,
                        depths=(1, 2, 3))
    template = SchemeTemplate(4, ((Position(1, Role.PROJECT), 0.5),
                                  (Position(2, Role.EXPAND), 0.25)))
    for arch in (space.smallest(), space.largest()):
        graph = build_graph(space.to_config(arch), with_weights=False)
        scheme = template.instantiate(graph)
        names = {w.layer: w.ratio for w in scheme.weights}
        last = len(space.to_config(arch).blocks) - 1
        assert names == {f"b{last}.project": 0.5, f"b{last - 1}.expand": 0.25}
        assert SchemeTemplate.of(scheme, graph) == template
    assert SchemeTemplate.from_dict(template.to_dict()) == template
