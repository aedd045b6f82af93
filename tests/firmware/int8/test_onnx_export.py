"""The QDQ ONNX export against onnxruntime: every layer within 1 LSB; whole networks beside it."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import numpy as np
import onnx
import pytest

from firmware.frontend.builtin import build_graph, builtin_config
from firmware.int8.onnx_export import (
    INPUT_NAME,
    OUTPUT_NAME,
    compare_outputs,
    cross_check,
    export_onnx,
    run_onnxruntime,
    tie_aware_agreement,
)
from firmware.int8.quantize import QuantizedGraph, generated_calibration, quantize_graph
from firmware.int8.reference import run_quantized
from firmware.ir import Activation, Graph, Layer, OpKind, Tensor
from tests.firmware.digits_model import digits

pytestmark = pytest.mark.unit


def int8_reference(qgraph: QuantizedGraph, x_q: np.ndarray) -> np.ndarray:
    """The integer reference's outputs (N, -1): the golden spec of the C kernels."""
    return run_quantized(qgraph, x_q).reshape(len(x_q), -1)


@pytest.mark.parametrize("optimize", [True, False], ids=["ort-fused", "ort-plain"])
def test_digits_agree_with_onnxruntime(optimize: bool) -> None:
    d = digits()
    qg = quantize_graph(d.graph, d.calib)
    x_q = qg.input.quantize(d.x_test)
    model = export_onnx(qg)
    ours = int8_reference(qg, x_q)
    theirs = run_onnxruntime(model, x_q, optimize=optimize)
    agreement = compare_outputs(theirs, ours)
    assert agreement.samples == 500
    assert agreement.passes(min_agreement=0.99, max_mean_lsb=1.0), agreement
    assert agreement.mean_abs_lsb < 0.5 and agreement.max_abs_lsb <= 4


def _pool_graph() -> Graph:
    """conv -> maxpool -> conv -> add(ReLU) -> avgpool (padded) -> gap -> flatten -> fc."""
    rng = np.random.default_rng(5)
    t = {n: Tensor(n, c, h, h) for n, c, h in [("x", 3, 12), ("c1", 8, 12), ("mp", 8, 6),
                                                 ("c2", 8, 6), ("sum", 8, 6), ("ap", 8, 3),
                                                 ("gap", 8, 1), ("flat", 8, 1), ("fc", 5, 1)]}
    params = {"c1.w": rng.normal(0, 0.4, (8, 3, 3, 3)), "c1.b": rng.normal(0, 0.1, 8),
              "c2.w": rng.normal(0, 0.4, (8, 8, 1, 1)), "c2.b": rng.normal(0, 0.1, 8),
              "fc.w": rng.normal(0, 0.4, (5, 8)), "fc.b": rng.normal(0, 0.1, 5)}
    layers = (
        Layer("c1", OpKind.CONV, ("x",), "c1", kernel=(3, 3), padding=(1, 1, 1, 1),
              activation=Activation.RELU6, weight="c1.w", bias="c1.b"),
        Layer("mp", OpKind.MAX_POOL, ("c1",), "mp", kernel=(2, 2), stride=(2, 2)),
        Layer("c2", OpKind.CONV, ("mp",), "c2", weight="c2.w", bias="c2.b"),
        Layer("sum", OpKind.ADD, ("mp", "c2"), "sum", activation=Activation.RELU),
        Layer("ap", OpKind.AVG_POOL, ("sum",), "ap", kernel=(3, 3), stride=(2, 2),
              padding=(1, 1, 0, 0)),
        Layer("gap", OpKind.GLOBAL_AVG_POOL, ("ap",), "gap"),
        Layer("flat", OpKind.RESHAPE, ("gap",), "flat"),
        Layer("fc", OpKind.FULLY_CONNECTED, ("flat",), "fc", weight="fc.w", bias="fc.b"),
    )
    return Graph("pools", "x", "fc", MappingProxyType(t), layers, MappingProxyType(
        {k: v.astype(np.float32) for k, v in params.items()}))


def test_every_exported_op_agrees_with_onnxruntime() -> None:
    graph = _pool_graph()
    rng = np.random.default_rng(6)
    qg = quantize_graph(graph, rng.normal(size=(64, 3, 12, 12)).astype(np.float32))
    x_q = qg.input.quantize(rng.normal(size=(200, 3, 12, 12)))
    agreement = compare_outputs(run_onnxruntime(export_onnx(qg), x_q), int8_reference(qg, x_q))
    assert agreement.passes(), agreement


def test_exported_model_is_int8_in_and_out() -> None:
    model = export_onnx(quantize_graph(digits().graph, digits().calib))
    onnx.checker.check_model(model, full_check=True)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == (INPUT_NAME, OUTPUT_NAME)
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.INT8
    weights = {i.name: i for i in model.graph.initializer}
    assert weights["stem.weight_q"].data_type == onnx.TensorProto.INT8
    assert weights["stem.bias_q"].data_type == onnx.TensorProto.INT32


def test_compare_outputs_counts_differences() -> None:
    a = np.array([[0, 5, 1], [3, 0, 0]], np.int8)
    b = np.array([[0, 4, 1], [0, 3, 0]], np.int8)
    agreement = compare_outputs(a, b)
    assert agreement.argmax_agreement == 0.5
    assert agreement.max_abs_lsb == 3 and agreement.mean_abs_lsb == pytest.approx(7 / 6)
    assert not agreement.passes()


def test_tie_aware_agreement_forgives_ties_only() -> None:
    ours = np.array([[5, 5, 0], [3, 1, 0], [4, 5, 0]], np.int8)
    theirs = np.array([[5, 6, 0], [1, 3, 0], [5, 4, 0]], np.int8)
    # 0: an exact tie on our side, theirs picks one of the tied classes; 1: a real
    # disagreement; 2: opposite 1-LSB leads, a tie only with a 1-LSB tolerance.
    assert compare_outputs(ours, theirs).argmax_agreement == 0.0
    assert tie_aware_agreement(ours, theirs) == pytest.approx(1 / 3)
    assert tie_aware_agreement(ours, theirs, tie_lsb=1) == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def mcunet() -> tuple[QuantizedGraph, np.ndarray]:
    """MCUNet-10FPS (the zoo's block list, 56 layers), random weights, generated calibration."""
    graph = build_graph(builtin_config("mcunet-10fps"))
    qg = quantize_graph(graph)
    return qg, qg.input.quantize(generated_calibration(graph, 16, seed=5))


def test_mcunet_agrees_with_onnxruntime_layer_by_layer(
        mcunet: tuple[QuantizedGraph, np.ndarray]) -> None:
    qg, x_q = mcunet
    check = cross_check(qg, x_q)
    report = check.report()
    assert check.passes and report["passes"] and not report["per_layer"]["failing"]
    assert len(check.layers) == len(qg.graph.layers) == 56
    # Double rounding (reference) vs exact rounding (onnxruntime): 1 LSB, on few elements.
    assert report["per_layer"]["max_abs_lsb"] == 1
    assert all(la.differing_fraction < 0.02 for la in check.layers if la.op != "gap")
    adds = [la for la in check.layers if la.op == "add"]
    assert len(adds) == 8 and all(la.max_abs_lsb == 0 for la in adds)
    # Global average pooling differs at exact ties only, and the report names why.
    (pool,) = [la for la in check.layers if la.op == "gap"]
    assert pool.max_abs_lsb == 1 and pool.known_difference is not None
    assert report["known_differences"] == [pool.known_difference]
    # The whole network is reported beside the criterion, not as it.
    network = report["network"]
    assert set(network) == {"argmax_agreement", "tie_aware_agreement", "mean_abs_lsb",
                            "max_abs_lsb", "exact_fraction"}
    assert 0.0 <= network["argmax_agreement"] <= network["tie_aware_agreement"] <= 1.0
    assert report["samples"] == 16


def _break(qg: QuantizedGraph, name: str, **changes: object) -> QuantizedGraph:
    layers = dict(qg.layers)
    layers[name] = dataclasses.replace(layers[name], **changes)  # type: ignore[arg-type]
    return dataclasses.replace(qg, layers=MappingProxyType(layers))


@pytest.mark.parametrize("what", ["shift", "output_offset"])
def test_a_broken_layer_fails_the_check_and_is_named(
        mcunet: tuple[QuantizedGraph, np.ndarray], what: str) -> None:
    """Integer parameters that disagree with the layer's scales: the check must say so."""
    qg, x_q = mcunet
    ql = qg.layer("b7.project")
    assert ql.shift is not None
    if what == "shift":  # an off-by-one shift: the layer's output doubles
        broken = _break(qg, "b7.project", shift=ql.shift + 1)
    else:  # the output zero point applied off by 3 steps
        broken = _break(qg, "b7.project", output_offset=ql.output_offset + 3)
    report = cross_check(broken, x_q).report()
    assert report["passes"] is False
    failing = report["per_layer"]["failing"]
    assert [f["layer"] for f in failing] == ["b7.project"]
    assert failing[0]["max_abs_lsb"] > 1
    assert report["per_layer"]["worst_layer"] == "b7.project"
