"""The QDQ ONNX export against onnxruntime: >= 99 % argmax agreement, <= 1 LSB mean difference."""

from __future__ import annotations

from types import MappingProxyType

import numpy as np
import onnx
import pytest

from firmware.int8.onnx_export import (
    INPUT_NAME,
    OUTPUT_NAME,
    compare_outputs,
    export_onnx,
    run_onnxruntime,
)
from firmware.int8.quantize import QuantizedGraph, quantize_graph
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
