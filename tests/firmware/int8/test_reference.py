"""The numpy int8 reference kernels against float math (within 1 LSB) and TFLite's rounding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.int8 import reference as ref

pytestmark = pytest.mark.unit


@given(st.floats(min_value=2.0**-30, max_value=2.0**20, allow_nan=False))
def test_quantize_multiplier_reconstructs_the_scale(real: float) -> None:
    m, s = ref.quantize_multiplier(real)
    assert 2**30 <= m < 2**31 and -31 <= s <= 30
    assert abs(m * 2.0 ** (s - 31) - real) <= real * 2.0**-30


@given(st.integers(-(2**24), 2**24), st.floats(min_value=2.0**-20, max_value=0.99))
def test_requantize_rounds_to_nearest(acc: int, real: float) -> None:
    m, s = ref.quantize_multiplier(real)
    got = int(ref.requantize(np.array([acc]), np.array([m]), np.array([s]))[0])
    # Two roundings (high-mul, then the shift) compose: within 1, not 0.5.
    assert abs(got - acc * real) <= 1 + 1e-6 * abs(acc)


def test_requantize_matches_tflite_rounding_on_ties() -> None:
    # 0.5 exactly: multiplier 2**30, shift 0; gemmlowp's high-mul rounds ties up.
    acc = np.array([1, -1, 3, -3, 5, -5])
    got = ref.requantize(acc, np.full(6, 2**30), np.zeros(6, dtype=np.int64))
    assert got.tolist() == [1, 0, 2, -1, 3, -2]
    # A right shift of 2 with multiplier 0.5: 10 * 0.125 = 1.25 -> 1, 12 * 0.125 = 1.5 -> 2.
    got = ref.requantize(np.array([10, 12, -12]), np.full(3, 2**30), np.full(3, -2))
    assert got.tolist() == [1, 2, -2]


def test_srdhm_saturates_only_at_int32_min_squared() -> None:
    lo = np.array([ref.INT32_MIN])
    assert ref.saturating_rounding_doubling_high_mul(lo, lo)[0] == ref.INT32_MAX


def _qparams(rng: np.random.Generator, cout: int) -> tuple[float, int, np.ndarray, float, int]:
    s_in = float(rng.uniform(0.01, 0.1))
    zp_in = int(rng.integers(-20, 20))
    s_w = rng.uniform(0.002, 0.02, size=cout)
    s_out = float(rng.uniform(0.05, 0.4))
    zp_out = int(rng.integers(-20, 20))
    return s_in, zp_in, s_w, s_out, zp_out


def _conv_quant(s_in: float, zp_in: int, s_w: np.ndarray, s_out: float,
                zp_out: int) -> ref.ConvQuant:
    pairs = [ref.quantize_multiplier(s_in * float(sw) / s_out) for sw in s_w]
    return ref.ConvQuant(input_offset=-zp_in, output_offset=zp_out,
                         multiplier=np.array([p[0] for p in pairs], dtype=np.int32),
                         shift=np.array([p[1] for p in pairs], dtype=np.int32))


def _float_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int,
                pad: tuple[int, int, int, int], groups: int) -> np.ndarray:
    torch = pytest.importorskip("torch")
    xt = torch.from_numpy(x.transpose(2, 0, 1)[None].astype(np.float64))
    xt = torch.nn.functional.pad(xt, (pad[1], pad[3], pad[0], pad[2]))
    wt = torch.from_numpy(w.astype(np.float64))
    y = torch.nn.functional.conv2d(xt, wt, torch.from_numpy(b), stride=stride, groups=groups)
    return np.asarray(y[0].numpy().transpose(1, 2, 0))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 9), st.integers(3, 9), st.sampled_from([1, 3, 5]),
       st.integers(1, 2), st.booleans(), st.integers(0, 2**31 - 1))
def test_conv2d_within_one_lsb_of_float(cin: int, cout: int, size: int, k: int, stride: int,
                                        depthwise: bool, seed: int) -> None:
    rng = np.random.default_rng(seed)
    if depthwise:
        cout = cin
    s_in, zp_in, s_w, s_out, zp_out = _qparams(rng, cout)
    x = rng.integers(-128, 128, size=(size, size, cin)).astype(np.int8)
    ci = 1 if depthwise else cin
    w = rng.integers(-127, 128, size=(cout, k, k, ci)).astype(np.int8)
    b = rng.integers(-3000, 3000, size=cout).astype(np.int32)
    pad = (k // 2, k // 2, k // 2, k // 2)
    q = _conv_quant(s_in, zp_in, s_w, s_out, zp_out)
    if depthwise:
        got = ref.depthwise_conv2d_s8(x, w[:, :, :, 0].transpose(1, 2, 0), b, q, (stride,) * 2,
                                      pad)
    else:
        got = ref.conv2d_s8(x, w, b, q, (stride, stride), pad)
    xf = s_in * (x.astype(np.float64) - zp_in)
    wf = w.transpose(0, 3, 1, 2).astype(np.float64) * s_w[:, None, None, None]
    yf = _float_conv(xf, wf, b * s_in * s_w, stride, pad, cin if depthwise else 1)
    want = np.clip(np.round(yf / s_out) + zp_out, -128, 127)
    assert got.shape == want.shape
    assert np.max(np.abs(got.astype(np.int64) - want)) <= 1


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_add_within_one_lsb_of_float(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    s1, s2, so = (float(v) for v in rng.uniform(0.01, 0.2, size=3))
    z1, z2, zo = (int(v) for v in rng.integers(-30, 30, size=3))
    a = rng.integers(-128, 128, size=n).astype(np.int8)
    b = rng.integers(-128, 128, size=n).astype(np.int8)
    twice = 2 * max(s1, s2)
    m1, sh1 = ref.quantize_multiplier(s1 / twice)
    m2, sh2 = ref.quantize_multiplier(s2 / twice)
    mo, sho = ref.quantize_multiplier(twice / ((1 << ref.ADD_LEFT_SHIFT) * so))
    q = ref.AddParams(ref.ADD_LEFT_SHIFT, -z1, m1, sh1, -z2, m2, sh2, zo, mo, sho)
    got = ref.add_s8(a, b, q)
    want = np.clip(np.round((s1 * (a - float(z1)) + s2 * (b - float(z2))) / so) + zo,
                   -128, 127)
    assert np.max(np.abs(got.astype(np.int64) - want)) <= 1


def test_fused_projection_add_equals_conv_then_add() -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(-128, 128, size=(4, 5, 8)).astype(np.int8)
    res = rng.integers(-128, 128, size=(4, 5, 6)).astype(np.int8)
    w = rng.integers(-127, 128, size=(6, 1, 1, 8)).astype(np.int8)
    b = rng.integers(-500, 500, size=6).astype(np.int32)
    q = _conv_quant(0.05, 3, rng.uniform(0.005, 0.01, 6), 0.2, -4)
    add = ref.AddParams(20, 4, 2**30, 0, -2, 2**30 + 12345, -1, 1, 2**30, -19)
    fused = ref.conv2d_1x1_add_s8(x, w, b, q, res, add)
    assert np.array_equal(fused, ref.add_s8(ref.conv2d_s8(x, w, b, q), res, add))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(1, 4), st.integers(1, 3),
       st.integers(1, 3), st.integers(0, 1), st.integers(-128, 127), st.integers(0, 2**31 - 1))
def test_pools_match_torch_within_rounding(h: int, w: int, c: int, k: int, stride: int,
                                           pad: int, zp: int, seed: int) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, size=(h + k, w + k, c)).astype(np.int8)
    pad = min(pad, k // 2)  # torch: padding at most half the kernel
    real = torch.from_numpy((x.astype(np.float64) - zp).transpose(2, 0, 1)[None])
    avg = torch.nn.functional.avg_pool2d(real, k, stride, pad)[0].numpy().transpose(1, 2, 0)
    got = ref.avg_pool_s8(x, (k, k), (stride, stride), (pad,) * 4, -zp, zp)
    want = np.clip(avg + zp, -128, 127)
    assert np.all(np.abs(got - want) <= 0.5 + 1e-9)
    mx = torch.nn.functional.max_pool2d(real, k, stride, pad)[0].numpy().transpose(1, 2, 0)
    got_max = ref.max_pool_s8(x, (k, k), (stride, stride), (pad,) * 4)
    assert np.array_equal(got_max, mx + zp)


def test_global_avg_pool_rounds_half_away_from_zero() -> None:
    x = np.array([[[1, -1]], [[2, -2]]], dtype=np.int8)  # mean 1.5 and -1.5
    assert ref.global_avg_pool_s8(x).reshape(-1).tolist() == [2, -2]
    # Around a zero point of 3: mean(q - 3) = -1.5 -> -2, so 1; and -4.5 -> -5, so -2.
    assert ref.global_avg_pool_s8(x, -3, 3).reshape(-1).tolist() == [1, -2]


def test_fully_connected_equals_pointwise_conv_on_one_pixel() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, size=(1, 1, 12)).astype(np.int8)
    w = rng.integers(-127, 128, size=(5, 12)).astype(np.int8)
    b = rng.integers(-500, 500, size=5).astype(np.int32)
    q = _conv_quant(0.05, 3, rng.uniform(0.005, 0.01, 5), 0.2, -4)
    fc = ref.fully_connected_s8(x, w, b, q)
    conv = ref.conv2d_s8(x, w.reshape(5, 1, 1, 12), b, q)
    assert np.array_equal(fc, conv.reshape(-1))


def test_quantized_graph_tracks_the_float_graph() -> None:
    from firmware.float_exec import run_graph
    from tests.firmware.small_models import tiny_inputs, tiny_quantized

    qgraph = tiny_quantized()
    x_q = tiny_inputs(qgraph, 16)
    got = ref.run_quantized(qgraph, x_q)
    assert got.shape == (16, 10, 1, 1) and got.dtype == np.int8
    x = qgraph.input.dequantize(x_q)
    want = run_graph(qgraph.graph, x)
    real = qgraph.output.dequantize(got)
    # Quantization error grows through the layers; a few output steps is expected.
    assert np.mean(np.abs(real - want)) < 4 * qgraph.output.scale
    assert np.mean(real.reshape(16, -1).argmax(1) == want.reshape(16, -1).argmax(1)) >= 0.75


def test_reference_executor_is_integer_only_and_deterministic() -> None:
    from tests.firmware.small_models import tiny_inputs, tiny_quantized

    qgraph = tiny_quantized()
    x_q = tiny_inputs(qgraph, 2)
    env = ref.run_image(qgraph, np.ascontiguousarray(x_q[0].transpose(1, 2, 0)))
    assert all(v.dtype == np.int8 for v in env.values())
    assert np.array_equal(ref.run_quantized(qgraph, x_q), ref.run_quantized(qgraph, x_q))
    with pytest.raises(ref.InvalidModelError, match="int8"):
        ref.run_quantized(qgraph, x_q.astype(np.float32))
