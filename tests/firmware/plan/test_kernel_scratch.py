"""firmware.plan.kernels mirrors every C kernel's get_buffer_size (host library via ctypes)."""

from __future__ import annotations

import ctypes

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.plan.kernels import (
    conv_scratch_bytes,
    depthwise_scratch_bytes,
    fast_depthwise,
    fast_depthwise_scratch_bytes,
    fully_connected_scratch_bytes,
    rgb_conv,
    rgb_conv_scratch_bytes,
)
from firmware.toolchain.build import build_host_library

pytestmark = pytest.mark.toolchain


class Dims(ctypes.Structure):
    _fields_ = [("h", ctypes.c_int32), ("w", ctypes.c_int32), ("c", ctypes.c_int32)]


class Window(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int32) for n in ("kh", "kw", "stride_h", "stride_w", "pad_top",
                                               "pad_left", "pad_bottom", "pad_right")]


@pytest.fixture(scope="module")
def lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    library = ctypes.CDLL(str(build_host_library(tmp_path_factory.mktemp("host"),
                                                 name="libtf_scratch.so")))
    for name in ("tf_conv2d_get_buffer_size", "tf_conv2d_1x1_get_buffer_size",
                 "tf_depthwise_conv2d_get_buffer_size", "tf_fully_connected_get_buffer_size",
                 "tf_depthwise_conv2d_fast_get_buffer_size", "tf_conv2d_rgb_get_buffer_size"):
        getattr(library, name).restype = ctypes.c_size_t
    return library


def _out(size: int, k: int, stride: int, before: int, after: int) -> int:
    return (size + before + after - k) // stride + 1


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), c=st.integers(1, 200),
       k=st.sampled_from([1, 3, 5, 7]), stride=st.integers(1, 2),
       pads=st.tuples(*[st.integers(0, 3)] * 4))
def test_conv_and_depthwise_scratch_equal_the_kernels(lib: ctypes.CDLL, h: int, w: int, c: int,
                                                      k: int, stride: int,
                                                      pads: tuple[int, int, int, int]) -> None:
    top, left, bottom, right = pads
    if h + top + bottom < k or w + left + right < k:
        return
    dims, win = Dims(h, w, c), Window(k, k, stride, stride, top, left, bottom, right)
    pixels = _out(h, k, stride, top, bottom) * _out(w, k, stride, left, right)
    assert lib.tf_conv2d_get_buffer_size(ctypes.byref(dims), ctypes.byref(win)) == \
        conv_scratch_bytes(c, (k, k), pixels)
    assert lib.tf_depthwise_conv2d_get_buffer_size(ctypes.byref(dims), ctypes.byref(win)) == \
        depthwise_scratch_bytes(h, w, c, k, pads)
    assert lib.tf_depthwise_conv2d_fast_get_buffer_size(ctypes.byref(dims),
                                                        ctypes.byref(win)) == \
        fast_depthwise_scratch_bytes(h, w, pads)
    assert lib.tf_depthwise_conv2d_fast_supported(ctypes.byref(win)) == \
        fast_depthwise((k, k), (stride, stride))
    # tf_conv2d_rgb_s8 runs tf_conv2d_s8 on other shapes than a 3x3 window over 3 channels
    assert lib.tf_conv2d_rgb_get_buffer_size(ctypes.byref(dims), ctypes.byref(win), c) == \
        (rgb_conv_scratch_bytes(pixels, c) if rgb_conv(c, (k, k))
         else conv_scratch_bytes(c, (k, k), pixels))
    assert lib.tf_conv2d_1x1_get_buffer_size(ctypes.byref(dims)) == \
        conv_scratch_bytes(c, (1, 1), h * w)
    assert lib.tf_fully_connected_get_buffer_size(h * w * c) == \
        fully_connected_scratch_bytes(h * w * c)


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 40), w=st.integers(1, 40), out_c=st.integers(1, 64),
       stride=st.integers(1, 3), pads=st.tuples(*[st.integers(0, 2)] * 4))
def test_rgb_conv_scratch_equals_the_kernel(lib: ctypes.CDLL, h: int, w: int, out_c: int,
                                            stride: int,
                                            pads: tuple[int, int, int, int]) -> None:
    top, left, bottom, right = pads
    if h + top + bottom < 3 or w + left + right < 3:
        return
    dims, win = Dims(h, w, 3), Window(3, 3, stride, stride, top, left, bottom, right)
    pixels = _out(h, 3, stride, top, bottom) * _out(w, 3, stride, left, right)
    assert rgb_conv(3, (3, 3))
    assert lib.tf_conv2d_rgb_get_buffer_size(ctypes.byref(dims), ctypes.byref(win), out_c) == \
        rgb_conv_scratch_bytes(pixels, out_c) >= conv_scratch_bytes(3, (3, 3), pixels)
