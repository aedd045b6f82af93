"""C kernels built for the host (gcc, shared library via ctypes) against the numpy reference."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.toolchain.build import build_host_library
from tests.firmware.runtime import kernel_cases as kc

pytestmark = pytest.mark.toolchain

HERE = Path(__file__).resolve().parent
TF_OK, TF_ERR_NULL, TF_ERR_ARG, TF_ERR_SHAPE, TF_ERR_ALIAS = range(5)
OUT_CAP = 1 << 20


class Dims(ctypes.Structure):
    _fields_ = [("h", ctypes.c_int32), ("w", ctypes.c_int32), ("c", ctypes.c_int32)]


class Window(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int32) for n in ("kh", "kw", "stride_h", "stride_w", "pad_top",
                                               "pad_left", "pad_bottom", "pad_right")]


class ConvQuant(ctypes.Structure):
    _fields_ = [("input_offset", ctypes.c_int32), ("output_offset", ctypes.c_int32),
                ("act_min", ctypes.c_int32), ("act_max", ctypes.c_int32),
                ("multiplier", ctypes.POINTER(ctypes.c_int32)),
                ("shift", ctypes.POINTER(ctypes.c_int32))]


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    path = build_host_library(tmp_path_factory.mktemp("host"), name="libtf_test.so",
                              extra_sources=[HERE / "kernel_runner.c"])
    return ctypes.CDLL(str(path))


def run_cases(lib: ctypes.CDLL, cases: list[kc.Case]) -> list[tuple[int, bytes]]:
    data = kc.encode(cases)
    out = ctypes.create_string_buffer(OUT_CAP)
    s16 = (ctypes.c_int16 * 32768)()
    s8 = (ctypes.c_int8 * 65536)()
    n = lib.tf_test_run_cases(data, len(data), out, OUT_CAP, s16, s8)
    assert n >= 0, "kernel_runner rejected the batch"
    return kc.decode(out.raw[:n], len(cases))


def check(results: list[tuple[int, bytes]], cases: list[kc.Case]) -> None:
    for (status, got), case in zip(results, cases, strict=True):
        assert status == TF_OK, f"{case.name}: status {status}"
        assert got == case.expected, f"{case.name}: differs from the reference"


@settings(max_examples=25, deadline=None)
@given(st.lists(kc.any_case(), min_size=20, max_size=20))
def test_every_kernel_is_bit_exact_against_the_reference(lib: ctypes.CDLL,
                                                         cases: list[kc.Case]) -> None:
    check(run_cases(lib, cases), cases)


def test_mobilenet_like_shapes_are_bit_exact(lib: ctypes.CDLL) -> None:
    cases = [kc.conv_case(60, 17, 15, 3, 16, 3, 2, (1, 1, 1, 1), fast=True),
             kc.conv_case(61, 9, 8, 5, 7, 3, 1, (1, 0, 1, 2), fast=True),
             *kc.rgb_conv_cases(),
             kc.conv_case(1, 24, 24, 3, 16, 3, 2, (1, 1, 1, 1)),
             kc.dw_case(2, 24, 24, 32, 3, 1, True), kc.dw_case(3, 24, 24, 32, 3, 2, True),
             kc.dw_case(4, 13, 11, 40, 5, 2, True), kc.dw_case(5, 9, 9, 8, 7, 1, True),
             *[kc.dw_case(20 + k + s, 23, 21, 20, k, s, True, fast=True)
               for k in (3, 5, 7) for s in (1, 2)],
             kc.dw_case(30, 12, 13, 24, 3, 1, True, fast=True, wide_quant=True),
             kc.pointwise_case(5, 12, 12, 16, 96, False),
             kc.pointwise_case(6, 12, 12, 96, 16, True), kc.pointwise_huge_bias_case(11),
             kc.pointwise_huge_bias_case(12, fast=True),
             *[kc.pointwise_case(40 + i, 7, 5, cin, cout, False, fast=True)
               for i, (cin, cout) in enumerate([(16, 96), (32, 64), (96, 24), (19, 7)])],
             *[kc.pointwise_case(50 + i, 5, 7, cin, cout, True, fast=True)
               for i, (cin, cout) in enumerate([(96, 16), (24, 8), (13, 5)])],
             kc.fc_case(7, 320, 10),
             kc.pool_case(8, 7, 7, 320, 0, 1, 0), kc.requant_case(9, 4096)]
    check(run_cases(lib, cases), cases)


def _conv_args(lib: ctypes.CDLL) -> dict[str, object]:
    mult = (ctypes.c_int32 * 4)(*([2**30] * 4))
    shift = (ctypes.c_int32 * 4)(*([-1] * 4))
    return {"in": Dims(4, 4, 2), "win": Window(3, 3, 1, 1, 1, 1, 1, 1), "out": Dims(4, 4, 4),
            "x": (ctypes.c_int8 * 32)(), "w": (ctypes.c_int8 * 72)(),
            "b": (ctypes.c_int32 * 4)(), "q": ConvQuant(0, 0, -128, 127, mult, shift),
            "y": (ctypes.c_int8 * 64)(), "buf": (ctypes.c_int16 * 36)(), "keep": (mult, shift)}


def _conv(lib: ctypes.CDLL, a: dict[str, object]) -> int:
    return int(lib.tf_conv2d_s8(ctypes.byref(a["in"]), a["x"], ctypes.byref(a["win"]),
                                ctypes.byref(a["out"]), a["w"], a["b"], ctypes.byref(a["q"]),
                                a["y"], a["buf"]))


def test_conv_checks_its_arguments_on_entry(lib: ctypes.CDLL) -> None:
    a = _conv_args(lib)
    assert _conv(lib, a) == TF_OK
    assert lib.tf_conv2d_get_buffer_size(ctypes.byref(a["in"]), ctypes.byref(a["win"])) == 72
    a["buf"] = None
    assert _conv(lib, a) == TF_ERR_NULL
    a = _conv_args(lib)
    a["out"] = Dims(3, 4, 4)  # the window gives 4x4
    assert _conv(lib, a) == TF_ERR_SHAPE
    a = _conv_args(lib)
    a["q"].act_min, a["q"].act_max = 10, 5
    assert _conv(lib, a) == TF_ERR_ARG
    a = _conv_args(lib)
    a["win"].stride_h = 0
    assert _conv(lib, a) == TF_ERR_ARG
    a = _conv_args(lib)
    a["keep"][1][3] = 31  # a per-channel shift outside [-31, 30]
    assert _conv(lib, a) == TF_ERR_ARG
    a = _conv_args(lib)
    a["keep"][0][2] = -5  # a negative multiplier
    assert _conv(lib, a) == TF_ERR_ARG


def test_in_place_depthwise_refuses_shapes_that_would_clobber_its_input(
        lib: ctypes.CDLL) -> None:
    mult = (ctypes.c_int32 * 1)(2**30)
    shift = (ctypes.c_int32 * 1)(0)
    q = ConvQuant(0, 0, -128, 127, mult, shift)
    w = (ctypes.c_int8 * 9)()
    b = (ctypes.c_int32 * 1)()
    buf = (ctypes.c_int8 * 64)()
    # Width 1 padded to an output width of 3: output row 0 overwrites input rows 1 and 2.
    wide = Window(1, 3, 1, 1, 0, 2, 0, 2)
    x = (ctypes.c_int8 * 24)(*range(24))
    args = (ctypes.byref(Dims(8, 1, 1)), x, ctypes.byref(wide), ctypes.byref(Dims(8, 3, 1)),
            w, b, ctypes.byref(q))
    assert lib.tf_depthwise_conv2d_s8(*args, (ctypes.c_int8 * 24)(), buf) == TF_OK
    assert lib.tf_depthwise_conv2d_s8(*args, x, buf) == TF_ERR_ALIAS
    # A 3x3 'same' window in place is always possible: rows are saved before being written.
    sq = Window(3, 3, 1, 1, 1, 1, 1, 1)
    x8 = (ctypes.c_int8 * 64)()
    assert lib.tf_depthwise_conv2d_s8(ctypes.byref(Dims(8, 8, 1)), x8, ctypes.byref(sq),
                                      ctypes.byref(Dims(8, 8, 1)), w, b, ctypes.byref(q), x8,
                                      buf) == TF_OK


def test_dsp_is_off_on_the_host(lib: ctypes.CDLL) -> None:
    assert lib.tf_dsp_enabled() == 0
    assert np.int32(lib.tf_requantize(-1, 2**30, 0)) == 0  # ties go up, as in the reference
