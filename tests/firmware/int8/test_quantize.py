"""Post-training quantization: parameter arithmetic, requantization, and accuracy on digits."""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.errors import InvalidModelError, UnsupportedOpError
from firmware.float_exec import activate, conv2d, run_graph
from firmware.int8.fake_quant import dequantized_params, run_fake_quant
from firmware.int8.quantize import (
    ADD_LEFT_SHIFT,
    QuantParams,
    activation_clamp,
    add_params,
    params_for_range,
    quantize_graph,
    quantize_multiplier,
    quantize_weights,
    requantize,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)
from firmware.int8.reference import run_quantized
from firmware.ir import Activation, Graph, Layer, OpKind, Tensor
from tests.firmware.digits_model import digits

pytestmark = pytest.mark.unit

scales = st.floats(min_value=1e-4, max_value=10.0, allow_nan=False)
zero_points = st.integers(min_value=-128, max_value=127)


@given(scales, zero_points)
def test_int8_grid_round_trips(scale: float, zero_point: int) -> None:
    qp = QuantParams(scale, zero_point)
    q = np.arange(-128, 128, dtype=np.int8)
    assert np.array_equal(qp.quantize(qp.dequantize(q)), q)


@given(scales, zero_points, st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=20))
def test_quantize_error_is_half_a_step_inside_the_range(scale: float, zero_point: int,
                                                        unit: list[float]) -> None:
    qp = QuantParams(scale, zero_point)
    lo, hi = qp.real_min, qp.real_max
    real = np.array([lo + (u + 1) / 2 * (hi - lo) for u in unit])
    error = np.abs(qp.dequantize(qp.quantize(real)) - real)
    # float32 output: allow its rounding on top of half a step.
    assert error.max() <= scale / 2 + 1e-6 * max(abs(lo), abs(hi))


def test_quantize_saturates_outside_the_range() -> None:
    qp = QuantParams(0.1, 10)
    assert qp.quantize([1e6, -1e6]).tolist() == [127, -128]


@pytest.mark.parametrize("scale, zp", [(0.0, 0), (-1.0, 0), (float("nan"), 0), (1.0, 128)])
def test_bad_params_are_rejected(scale: float, zp: int) -> None:
    with pytest.raises(InvalidModelError):
        QuantParams(scale, zp)


@given(st.floats(min_value=2.0**-31, max_value=2.0**29, allow_nan=False))
def test_quantize_multiplier_is_q31_and_exact(real: float) -> None:
    m, s = quantize_multiplier(real)
    assert 2**30 <= m < 2**31 and -31 <= s <= 30
    assert abs(m * 2.0 ** (s - 31) - real) <= real * 2.0**-30


def test_quantize_multiplier_edges() -> None:
    assert quantize_multiplier(0.0) == (0, 0)
    assert quantize_multiplier(2.0**-40) == (0, 0)
    assert quantize_multiplier(1.0) == (2**30, 1)
    with pytest.raises(InvalidModelError):
        quantize_multiplier(2.0**31)


def test_rounding_helpers_round_half_away_from_zero() -> None:
    assert rounding_divide_by_pot(np.array([5, -5, 6, -6, 7, -7]), 2).tolist() == [
        1, -1, 2, -2, 2, -2]
    assert rounding_divide_by_pot(np.array([3, -3]), 0).tolist() == [3, -3]
    # SRDHM(x, 2^30) = x / 2 rounded half up.
    assert saturating_rounding_doubling_high_mul(np.array([3, -3]), 2**30).tolist() == [2, -1]
    assert saturating_rounding_doubling_high_mul(-(2**31), -(2**31)) == 2**31 - 1


@settings(max_examples=200)
@given(st.floats(min_value=1e-6, max_value=0.99, allow_nan=False),
       st.lists(st.integers(-(2**24), 2**24), min_size=1, max_size=50))
def test_requantize_is_within_one_lsb_of_float(real: float, acc: list[int]) -> None:
    m, s = quantize_multiplier(real)
    got = requantize(np.array(acc, dtype=np.int32), m, s)
    assert np.abs(got - np.array(acc, dtype=np.float64) * real).max() <= 1.0


def test_requantize_matches_float_rounding_on_average() -> None:
    rng = np.random.default_rng(1)
    acc = rng.integers(-(2**20), 2**20, 10_000).astype(np.int32)
    m, s = quantize_multiplier(0.00371)
    got = requantize(acc, m, s)
    exact = np.rint(acc * 0.00371)
    assert np.mean(got != exact) < 0.01


def test_params_for_range_keep_zero_exact() -> None:
    qp = params_for_range(-0.3, 5.1)
    assert qp.quantize(0.0) == qp.zero_point
    # Nudging the zero point onto the grid moves the ends by at most half a step.
    assert qp.real_min <= -0.3 + qp.scale / 2 and qp.real_max >= 5.1 - qp.scale / 2
    relu = params_for_range(0.0, 6.0)
    assert relu.zero_point == -128
    assert params_for_range(2.0, 3.0).real_min <= 0  # zero always included


def test_activation_clamps() -> None:
    qp = QuantParams(0.05, -100)
    assert activation_clamp(Activation.NONE, qp) == (-128, 127)
    assert activation_clamp(Activation.RELU, qp) == (-100, 127)
    assert activation_clamp(Activation.RELU6, qp) == (-100, 20)


def test_weights_are_per_channel_symmetric() -> None:
    w = np.array([[[[0.5, -1.0]]], [[[0.01, 0.002]]], [[[0.0, 0.0]]]], dtype=np.float32)
    q, scale = quantize_weights(w)
    assert q.dtype == np.int8
    assert np.abs(q[0]).max() == 127 and np.abs(q[1]).max() == 127
    assert scale[2] == 0 and not q[2].any()
    assert np.allclose(q[:2] * scale[:2, None, None, None], w[:2], atol=scale.max() / 2)


def _add_reference(a: np.ndarray, b: np.ndarray, in1: QuantParams, in2: QuantParams,
                   out: QuantParams) -> np.ndarray:
    p = add_params(in1, in2, out)
    va = requantize((a.astype(np.int64) + p.input1_offset) << p.left_shift,
                    p.input1_multiplier, p.input1_shift)
    vb = requantize((b.astype(np.int64) + p.input2_offset) << p.left_shift,
                    p.input2_multiplier, p.input2_shift)
    total = va.astype(np.int64) + vb
    res = requantize(total, p.output_multiplier, p.output_shift) + p.output_offset
    return np.clip(res, -128, 127)


@given(scales, zero_points, scales, zero_points, scales, zero_points)
def test_add_params_rescale_within_one_lsb(s1: float, z1: int, s2: float, z2: int,
                                           so: float, zo: int) -> None:
    in1, in2, out = QuantParams(s1, z1), QuantParams(s2, z2), QuantParams(so, zo)
    p = add_params(in1, in2, out)
    assert p.left_shift == ADD_LEFT_SHIFT
    a = np.arange(-128, 128, dtype=np.int8)
    b = a[::-1].copy()
    got = _add_reference(a, b, in1, in2, out)
    want = out.quantize(in1.dequantize(a).astype(np.float64) + in2.dequantize(b))
    assert np.abs(got - want.astype(np.int64)).max() <= 1


def _conv_graph(activation: Activation, rng: np.random.Generator) -> Graph:
    weight = rng.normal(0, 0.5, (6, 4, 3, 3)).astype(np.float32)
    weight[5] = 0.0  # a dead channel: its output is the bias alone
    bias = rng.normal(0, 0.3, 6).astype(np.float32)
    layer = Layer("c", OpKind.CONV, ("x",), "y", kernel=(3, 3), padding=(1, 1, 1, 1),
                  activation=activation, weight="c.w", bias="c.b")
    return Graph("one-conv", "x", "y", MappingProxyType(
        {"x": Tensor("x", 4, 5, 5), "y": Tensor("y", 6, 5, 5)}), (layer,),
        MappingProxyType({"c.w": weight, "c.b": bias}))


@pytest.mark.parametrize("activation", list(Activation))
def test_conv_requant_params_match_float_within_one_lsb(activation: Activation) -> None:
    """Integer conv (CMSIS style: input offset, int32 bias, multiplier/shift, clamp) vs float."""
    rng = np.random.default_rng(3)
    graph = _conv_graph(activation, rng)
    x = rng.normal(0, 1, (8, 4, 5, 5)).astype(np.float32)
    qg = quantize_graph(graph, x)
    ql = qg.layer("c")
    assert ql.weight_q is not None and ql.bias_q is not None
    assert ql.multiplier is not None and ql.shift is not None
    xq = qg.input.quantize(x)
    # Integer path: pad with the input zero point, then acc = sum((q + offset) * w) + bias.
    padded = np.pad(xq.astype(np.int64) + ql.input_offset, ((0, 0), (0, 0), (1, 1), (1, 1)))
    unpadded = dataclasses.replace(ql.layer, padding=(0, 0, 0, 0))
    acc = conv2d(padded.astype(np.float64), ql.weight_q.astype(np.float64), None, unpadded)
    acc_i = np.rint(acc).astype(np.int64) + ql.bias_q.reshape(1, -1, 1, 1)
    per_channel = np.moveaxis(acc_i, 1, -1)
    got = requantize(per_channel, ql.multiplier, ql.shift) + ql.output_offset
    got = np.moveaxis(np.clip(got, ql.act_min, ql.act_max), -1, 1)
    # Float path with the same (dequantized) weights and inputs.
    weight, bias = dequantized_params(qg, graph.layers[0])
    assert weight is not None
    want = conv2d(qg.input.dequantize(xq), weight, bias, ql.layer)
    want_q = qg.output.quantize(activate(want, activation))
    assert np.abs(got - want_q.astype(np.int64)).max() <= 1
    assert np.mean(got != want_q) < 0.05
    # The dead channel reproduces its bias exactly.
    assert np.array_equal(got[:, 5], want_q[:, 5])


def test_digits_int8_top1_close_to_float() -> None:
    d = digits()
    qg = quantize_graph(d.graph, d.calib)
    float_pred = run_graph(d.graph, d.x_test)[:, :, 0, 0].argmax(1)
    x_q = qg.input.quantize(d.x_test)
    int8_out = run_quantized(qg, x_q)[:, :, 0, 0]
    int8_pred = int8_out.argmax(1)
    float_acc = float(np.mean(float_pred == d.y_test))
    int8_acc = float(np.mean(int8_pred == d.y_test))
    assert float_acc > 0.85
    assert float_acc - int8_acc <= 0.02
    assert np.mean(float_pred == int8_pred) >= 0.97
    # The float simulation of the int8 model stays within a few LSB of the integer one.
    fake = run_fake_quant(qg, x_q)[:, :, 0, 0].astype(np.int64)
    assert np.abs(fake - int8_out).mean() < 0.5


def test_same_scale_ops_and_logit_params() -> None:
    qg = quantize_graph(digits().graph, digits().calib)
    assert qg.tensors["pool"] == qg.tensors["head"] == qg.tensors["flatten"]
    assert qg.output == qg.tensors["classifier"]
    assert qg.layer("add").add is not None
    assert qg.layer("stem").act_min == qg.tensors["stem"].zero_point
    assert qg.calibration == "data" and not qg.notes
    assert [ql.name for ql in qg.ordered_layers()] == [la.name for la in qg.graph.layers]


def test_generated_calibration_is_recorded() -> None:
    qg = quantize_graph(digits().graph)
    assert qg.calibration == "generated"
    assert "generated" in qg.notes[0]


def test_concat_is_unsupported_and_named() -> None:
    tensors = {"x": Tensor("x", 2, 2, 2), "y": Tensor("y", 4, 2, 2)}
    layer = Layer("cat", OpKind.CONCAT, ("x", "x"), "y")
    graph = Graph("g", "x", "y", MappingProxyType(tensors), (layer,),
                  MappingProxyType({"unused": np.zeros(1, np.float32)}))
    with pytest.raises(UnsupportedOpError, match="cat"):
        quantize_graph(graph, np.zeros((1, 2, 2, 2), np.float32))


def test_calibration_shape_is_checked() -> None:
    with pytest.raises(InvalidModelError, match="shape"):
        quantize_graph(digits().graph, np.zeros((3, 16, 16), np.float32))


def test_an_activation_the_int8_kernel_cannot_clamp_is_refused() -> None:
    tensors = {"x": Tensor("x", 2, 3, 3), "g": Tensor("g", 2, 1, 1)}
    layer = Layer("gap", OpKind.GLOBAL_AVG_POOL, ("x",), "g", activation=Activation.RELU)
    graph = Graph("g", "x", "g", MappingProxyType(tensors), (layer,),
                  MappingProxyType({"unused": np.zeros(1, np.float32)}))
    with pytest.raises(UnsupportedOpError, match="gap: relu fused into gap"):
        quantize_graph(graph, np.random.default_rng(0).normal(size=(2, 2, 3, 3)))
