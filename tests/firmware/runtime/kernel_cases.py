"""Kernel test cases: random shapes -> (bytes for kernel_runner.c, the reference's output).

One encoding drives both the host shared library (ctypes) and the QEMU image, so the two
run exactly the same kernel calls; the expected bytes come from firmware.int8.reference.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from firmware.int8 import reference as ref
from firmware.int8.quantize import AddParams

OP_CONV, OP_CONV1X1, OP_CONV1X1_ADD, OP_DW, OP_FC, OP_ADD, OP_AVGPOOL, OP_GAP = range(1, 9)
OP_PATCH_LOAD, OP_PATCH_STORE, OP_REQUANT, OP_MAXPOOL, OP_DW_FAST = 9, 10, 11, 12, 13
OP_CONV1X1_FAST, OP_CONV1X1_ADD_FAST, OP_CONV_FAST, OP_CONV_RGB = 14, 15, 16, 17


@dataclass(frozen=True)
class Case:
    """One kernel call: its encoding and the reference output (bytes)."""

    name: str
    payload: bytes
    expected: bytes


def _ints(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}i", *values)


def _arr(a: np.ndarray) -> bytes:
    raw = np.ascontiguousarray(a).tobytes()
    return struct.pack("<I", len(raw)) + raw + b"\0" * (-len(raw) % 4)


def encode(cases: list[Case]) -> bytes:
    """cases.bin: count, then each payload."""
    return struct.pack("<i", len(cases)) + b"".join(c.payload for c in cases)


def decode(data: bytes, count: int) -> list[tuple[int, bytes]]:
    """(status, output bytes) per case from results."""
    out = []
    pos = 0
    for _ in range(count):
        status, n = struct.unpack_from("<iI", data, pos)
        out.append((status, data[pos + 8:pos + 8 + n]))
        pos += 8 + n + (-n % 4)
    return out


def _quant(rng: np.random.Generator, cout: int, relu: bool,
           wide_shift: bool = False) -> ref.ConvQuant:
    mult = rng.integers(2**30, 2**31 - 1, size=cout, dtype=np.int64).astype(np.int32)
    # wide_shift: every right shift the specialized 1x1 folds (1..22), both ends drawn.
    shift = (rng.choice(np.array([-22, -1, *range(-12, -5)]), size=cout) if wide_shift
             else rng.integers(-12, -5, size=cout)).astype(np.int32)
    zp_out = int(rng.integers(-30, 30))
    return ref.ConvQuant(input_offset=int(rng.integers(-127, 129)), output_offset=zp_out,
                         multiplier=mult, shift=shift,
                         act_min=zp_out if relu else -128,
                         act_max=min(127, zp_out + 60) if relu else 127)


def _add_params(rng: np.random.Generator) -> tuple[AddParams, int, int]:
    m = rng.integers(2**30, 2**31 - 1, size=3)
    sh = rng.integers(-3, 1, size=2)  # 0: the input at the larger scale (multiplier 0.5)
    p = AddParams(left_shift=20, input1_offset=int(rng.integers(-127, 128)),
                  input1_multiplier=int(m[0]), input1_shift=int(sh[0]),
                  input2_offset=int(rng.integers(-127, 128)), input2_multiplier=int(m[1]),
                  input2_shift=int(sh[1]), output_offset=int(rng.integers(-20, 20)),
                  output_multiplier=int(m[2]), output_shift=int(rng.integers(-21, -18)))
    return p, -128, 127


def _add_ints(p: AddParams, lo: int, hi: int) -> bytes:
    return _ints(p.left_shift, p.input1_offset, p.input1_multiplier, p.input1_shift,
                 p.input2_offset, p.input2_multiplier, p.input2_shift, p.output_offset,
                 p.output_multiplier, p.output_shift, lo, hi)


def _i8(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(-128, 128, size=shape).astype(np.int8)


def _w8(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.integers(-127, 128, size=shape).astype(np.int8)


def _window_ints(k: int, s: int, pad: tuple[int, int, int, int]) -> bytes:
    return _ints(k, k, s, s, *pad)


def conv_case(seed: int, h: int, w: int, cin: int, cout: int, k: int, s: int,
              pad: tuple[int, int, int, int], fast: bool = False, rgb: bool = False,
              wide_quant: bool = False) -> Case:
    """Dense kxk conv (`fast`: tf_conv2d_fast_s8, `rgb`: tf_conv2d_rgb_s8), with a ReLU clamp
    on odd seeds. `wide_quant` gives one channel a bias around +-2**30 and a shift in
    [-31, -27], outside the specialized kernels' folded requantization (they fall back)."""
    rng = np.random.default_rng(seed)
    x, wt = _i8(rng, h, w, cin), _w8(rng, cout, k, k, cin)
    b = rng.integers(-5000, 5000, size=cout).astype(np.int32)
    q = _quant(rng, cout, relu=bool(seed % 2))
    if wide_quant:
        i = int(rng.integers(0, cout))
        b[i] = int(rng.choice([-1, 1])) * (2**30 + int(rng.integers(-40000, 40000)))
        shift = q.shift.copy()
        shift[i] = int(rng.integers(-31, -26))
        q = dataclasses.replace(q, shift=shift)
    y = ref.conv2d_s8(x, wt, b, q, (s, s), pad)
    op, tag = (OP_CONV_RGB, "-rgb") if rgb else (OP_CONV_FAST, "-fast") if fast else (OP_CONV, "")
    payload = (_ints(op, h, w, cin, *y.shape)
               + _window_ints(k, s, pad)
               + _ints(q.input_offset, q.output_offset, q.act_min, q.act_max, 0)
               + _arr(x) + _arr(wt) + _arr(b) + _arr(q.multiplier) + _arr(q.shift))
    return Case(f"conv{tag}{k}x{k}s{s} {h}x{w}x{cin}->{cout} pad {pad}"
                f"{' wide quant' if wide_quant else ''}", payload, y.tobytes())


def rgb_conv_case(seed: int, h: int, w: int, cout: int, s: int,
                  pad: tuple[int, int, int, int], wide_quant: bool = False) -> Case:
    """An RGB input layer (3x3 window, 3 input channels) on tf_conv2d_rgb_s8."""
    return conv_case(seed, h, w, 3, cout, 3, s, pad, rgb=True, wide_quant=wide_quant)


def rgb_conv_cases() -> list[Case]:
    """tf_conv2d_rgb_s8 on stem-like shapes: stride 1, 2 and 3, padding on every side (2:
    whole window rows outside), odd sizes and channel counts, ReLU clamps on odd seeds, an
    odd pixel count; and its fallbacks: a bias outside the folded requantization, one output
    pixel, one output channel."""
    return [rgb_conv_case(70, 17, 15, 16, 2, (1, 1, 1, 1)),
            rgb_conv_case(71, 17, 15, 16, 2, (1, 1, 1, 1)),
            rgb_conv_case(72, 9, 8, 7, 1, (1, 0, 1, 2)),
            rgb_conv_case(73, 6, 5, 5, 1, (2, 2, 2, 2)),
            rgb_conv_case(74, 12, 11, 24, 2, (0, 1, 2, 0)),
            rgb_conv_case(75, 11, 13, 6, 3, (2, 0, 1, 1)),
            rgb_conv_case(76, 3, 7, 8, 2, (0, 0, 0, 0)),  # 3 pixels
            rgb_conv_case(77, 12, 11, 9, 2, (1, 1, 1, 1), wide_quant=True),
            rgb_conv_case(78, 1, 1, 4, 1, (1, 1, 1, 1)),
            rgb_conv_case(79, 7, 7, 1, 2, (1, 1, 1, 1))]


def dw_case(seed: int, h: int, w: int, c: int, k: int, s: int, in_place: bool,
            pad: tuple[int, int, int, int] | None = None, fast: bool = False,
            wide_quant: bool = False) -> Case:
    """Depthwise conv, 'same' padding (as MobileNet) unless given, optionally in place.

    `fast` runs the specialized kernel (tf_depthwise_conv2d_fast_s8), with a ReLU clamp on
    odd seeds (even ones clamp to the int8 range, its SSAT path); `wide_quant` gives
    some channels biases around +-2**30 and shifts in [-31, 1], outside the fast
    requantization, so that both of its per-channel paths run.
    """
    rng = np.random.default_rng(seed)
    if pad is None:
        pad = (k // 2, k // 2, (k - 1) // 2, (k - 1) // 2) if s == 2 else (k // 2,) * 4
    x, wt = _i8(rng, h, w, c), _w8(rng, k, k, c)
    b = rng.integers(-5000, 5000, size=c).astype(np.int32)
    q = _quant(rng, c, relu=not fast or bool(seed % 2))  # fast: the int8 saturation too
    if wide_quant:
        odd = rng.integers(0, 2, size=c).astype(bool)
        big = rng.choice([-1, 1], size=c) * (2**30 + rng.integers(-40000, 40000, size=c))
        b = np.where(odd, big, b).astype(np.int32)
        shift = np.where(odd, rng.integers(-31, -27, size=c), rng.integers(-3, 2, size=c))
        q = dataclasses.replace(q, shift=shift.astype(np.int32))
    y = ref.depthwise_conv2d_s8(x, wt, b, q, (s, s), pad)
    payload = (_ints(OP_DW_FAST if fast else OP_DW, h, w, c, *y.shape) + _window_ints(k, s, pad)
               + _ints(q.input_offset, q.output_offset, q.act_min, q.act_max, int(in_place))
               + _arr(x) + _arr(wt) + _arr(b) + _arr(q.multiplier) + _arr(q.shift))
    name = f"dw{'-fast' if fast else ''}{k}x{k}s{s} {h}x{w}x{c} inplace={in_place}"
    return Case(name + (" wide quant" if wide_quant else ""), payload, y.tobytes())


def pointwise_case(seed: int, h: int, w: int, cin: int, cout: int, fused_add: bool,
                   huge_bias: bool = False, fast: bool = False) -> Case:
    """1x1 conv, optionally accumulating into a residual buffer.

    `huge_bias` puts accumulators around +-2**30, where the kernels leave their SMMULR fast
    path for the 64-bit one, with tiny scales so that the outputs still vary. `fast` runs
    the specialized kernel (tf_conv2d_1x1_fast_s8), with a ReLU clamp on odd seeds.
    """
    rng = np.random.default_rng(seed)
    x, wt = _i8(rng, h, w, cin), _w8(rng, cout, 1, 1, cin)
    b = rng.integers(-5000, 5000, size=cout).astype(np.int32)
    q = _quant(rng, cout, relu=fast and bool(seed % 2), wide_shift=fast and seed % 3 == 0)
    if huge_bias:
        b = (rng.choice([-1, 1], size=cout) * (2**30 + rng.integers(-40000, 40000, size=cout))
             ).astype(np.int32)
        q = dataclasses.replace(q, shift=rng.integers(-31, -27, size=cout).astype(np.int32))
    head = _ints(q.input_offset, q.output_offset, q.act_min, q.act_max)
    tail = _arr(x) + _arr(wt) + _arr(b) + _arr(q.multiplier) + _arr(q.shift)
    if not fused_add:
        y = ref.conv2d_s8(x, wt, b, q)
        op, name = (OP_CONV1X1_FAST, "pw-fast") if fast else (OP_CONV1X1, "pw")
        return Case(f"{name} {h}x{w}x{cin}->{cout}{' huge bias' if huge_bias else ''}",
                    _ints(op, h, w, cin, cout) + head + tail, y.tobytes())
    res = _i8(rng, h, w, cout)
    p, lo, hi = _add_params(rng)
    y = ref.conv2d_1x1_add_s8(x, wt, b, q, res, p, lo, hi)
    payload = (_ints(OP_CONV1X1_ADD_FAST if fast else OP_CONV1X1_ADD, h, w, cin, cout) + head
               + _add_ints(p, lo, hi) + tail + _arr(res))
    return Case(f"pw{'-fast' if fast else ''}+add {h}x{w}x{cin}->{cout}", payload, y.tobytes())


def pointwise_huge_bias_case(seed: int, fast: bool = False) -> Case:
    """A 1x1 conv whose accumulators straddle +-2**30 (both requantization paths)."""
    return pointwise_case(seed, 4, 5, 24, 6, False, huge_bias=True, fast=fast)


def fc_case(seed: int, cin: int, cout: int, huge_bias: bool = False) -> Case:
    """Fully connected, with a ReLU clamp on odd seeds (its DSP path applies when cin % 4 is
    0; `huge_bias` takes accumulators near 2**30, where it leaves for the generic kernel)."""
    rng = np.random.default_rng(seed)
    x, wt = _i8(rng, cin), _w8(rng, cout, cin)
    b = rng.integers(-5000, 5000, size=cout).astype(np.int32)
    q = _quant(rng, cout, relu=bool(seed % 2))
    if huge_bias:
        b[::2] = rng.integers(2**30 - 2**20, 2**30, size=len(b[::2])).astype(np.int32)
    y = ref.fully_connected_s8(x, wt, b, q)
    payload = (_ints(OP_FC, 1, 1, cin, cout, q.input_offset, q.output_offset, q.act_min,
                     q.act_max) + _arr(x) + _arr(wt) + _arr(b) + _arr(q.multiplier)
               + _arr(q.shift))
    return Case(f"fc {cin}->{cout}", payload, y.tobytes())


def add_case(seed: int, n: int) -> Case:
    """Elementwise add."""
    rng = np.random.default_rng(seed)
    a, b = _i8(rng, n), _i8(rng, n)
    p, lo, hi = _add_params(rng)
    y = ref.add_s8(a, b, p, lo, hi)
    return Case(f"add {n}", _ints(OP_ADD, n) + _add_ints(p, lo, hi) + _arr(a) + _arr(b),
                y.tobytes())


def pool_case(seed: int, h: int, w: int, c: int, k: int, s: int, pad: int,
              is_max: bool = False) -> Case:
    """Average (or max) pool, or global average pool when k == 0."""
    rng = np.random.default_rng(seed)
    x = _i8(rng, h, w, c)
    zp = int(rng.integers(-128, 128))
    if k == 0:
        return Case(f"gap {h}x{w}x{c}", _ints(OP_GAP, h, w, c, -zp, zp) + _arr(x),
                    ref.global_avg_pool_s8(x, -zp, zp).tobytes())
    pads = (pad,) * 4
    lo, hi = (zp, 127) if seed % 2 else (-128, 127)
    if is_max:
        y = ref.max_pool_s8(x, (k, k), (s, s), pads, lo, hi)
    else:
        y = ref.avg_pool_s8(x, (k, k), (s, s), pads, -zp, zp, lo, hi)
    payload = (_ints(OP_MAXPOOL if is_max else OP_AVGPOOL, h, w, c, *y.shape)
               + _window_ints(k, s, pads) + _ints(-zp, zp, lo, hi) + _arr(x))
    return Case(f"{'max' if is_max else 'avg'}pool{k}s{s}p{pad} {h}x{w}x{c}", payload,
                y.tobytes())


def patch_case(seed: int, h: int, w: int, c: int, ph: int, pw: int, row0: int, col0: int,
               store: bool) -> Case:
    """Patch load (with border padding) or store."""
    rng = np.random.default_rng(seed)
    if store:
        src, dst = _i8(rng, ph, pw, c), _i8(rng, h, w, c)
        row0, col0 = min(max(row0, 0), h - ph), min(max(col0, 0), w - pw)
        want = dst.copy()
        want[row0:row0 + ph, col0:col0 + pw] = src
        payload = (_ints(OP_PATCH_STORE, ph, pw, c, h, w, row0, col0, 0) + _arr(src)
                   + _arr(dst))
        return Case(f"patch store {ph}x{pw} at {row0},{col0}", payload, want.tobytes())
    src = _i8(rng, h, w, c)
    pad_value = int(rng.integers(-128, 128))
    padded = np.full((h + 2 * ph, w + 2 * pw, c), pad_value, dtype=np.int8)
    padded[ph:ph + h, pw:pw + w] = src
    want = padded[row0 + ph:row0 + 2 * ph, col0 + pw:col0 + 2 * pw]
    payload = _ints(OP_PATCH_LOAD, h, w, c, ph, pw, row0, col0, pad_value) + _arr(src)
    return Case(f"patch load {ph}x{pw} at {row0},{col0}", payload, want.tobytes())


def requant_case(seed: int, n: int) -> Case:
    """tf_requantize against firmware.int8.quantize.requantize over random int32s."""
    rng = np.random.default_rng(seed)
    acc = rng.integers(-(2**31), 2**31 - 1, size=n, dtype=np.int64)
    acc[: n // 2] >>= rng.integers(0, 31, size=n // 2)
    m = rng.integers(2**30, 2**31 - 1, size=n, dtype=np.int64)
    s = rng.integers(-31, 31, size=n)
    want = ref.requantize(acc, m, s).astype(np.int32)
    payload = (_ints(OP_REQUANT, n) + _arr(acc.astype(np.int32)) + _arr(m.astype(np.int32))
               + _arr(s.astype(np.int32)))
    return Case(f"requant {n}", payload, want.tobytes())


seeds = st.integers(0, 2**32 - 1)


@st.composite
def dw_fast_case(draw: st.DrawFn, max_hw: int = 9, max_c: int = 80) -> Case:
    """A specialized depthwise case: any window it has, any pads below the kernel, planes
    down to a single pixel (smaller than the window), many and odd channel counts, output
    widths of every remainder mod 4 (the groups of four, three, two and one), in place or
    not, ReLU, and channels outside the fast requantization."""
    k = draw(st.sampled_from([3, 5, 7]))
    s = draw(st.integers(1, 2))
    top, left, bottom, right = (draw(st.integers(0, k // 2)) for _ in range(4))
    h = draw(st.integers(max(1, k - top - bottom), max(max_hw, k)))
    w = draw(st.integers(max(1, k - left - right), max(max_hw, k)))
    return dw_case(draw(seeds), h, w, draw(st.integers(1, max_c)), k, s, draw(st.booleans()),
                   (top, left, bottom, right), fast=True,
                   wide_quant=draw(st.integers(0, 3)) == 0)


@st.composite
def any_case(draw: st.DrawFn, max_hw: int = 10, max_c: int = 24) -> Case:
    """One kernel case of any kind, with Hypothesis-chosen shapes."""
    kind = draw(st.sampled_from(["conv", "conv_fast", "conv_rgb", "dw", "dw_fast", "pw", "pw_fast",
                                 "pw_add_fast", "pw_add", "fc", "add", "pool", "patch",
                                 "requant"]))
    seed = draw(seeds)
    h, w = draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw))
    c = draw(st.integers(1, max_c))
    if kind in ("conv", "conv_fast"):
        k = draw(st.sampled_from([1, 3, 5]))
        s = draw(st.integers(1, 2))
        pad = tuple(draw(st.integers(0, k - 1)) for _ in range(4))
        h, w = max(h, k), max(w, k)
        return conv_case(seed, h, w, draw(st.integers(1, 8)), c, k, s,
                         (pad[0], pad[1], pad[2], pad[3]), fast=kind == "conv_fast")
    if kind == "conv_rgb":  # any pads below the window, any stride; the odd other shape
        cin, k = draw(st.sampled_from([(3, 3)] * 6 + [(1, 3), (4, 3), (3, 1), (3, 5)]))
        pad = tuple(draw(st.integers(0, min(k - 1, 2))) for _ in range(4))
        h, w = max(h, k - pad[0] - pad[2]), max(w, k - pad[1] - pad[3])
        return conv_case(seed, h, w, cin, c, k, draw(st.integers(1, 3)),
                         (pad[0], pad[1], pad[2], pad[3]), rgb=True,
                         wide_quant=draw(st.integers(0, 5)) == 0)
    if kind == "dw_fast" and draw(st.booleans()):
        return draw(dw_fast_case(max_hw, 4 * max_c))
    if kind in ("dw", "dw_fast"):
        k = draw(st.sampled_from([3, 5, 7]))
        # Patch tiles pad only the sides at the image border: any pads below the kernel.
        pads = (None if draw(st.booleans()) else
                tuple(draw(st.integers(0, k // 2)) for _ in range(4)))
        return dw_case(seed, max(h, k), max(w, k), c, k, draw(st.integers(1, 2)),
                       draw(st.booleans()), pads,  # type: ignore[arg-type]
                       fast=kind == "dw_fast", wide_quant=draw(st.integers(0, 3)) == 0)
    if kind in ("pw", "pw_fast") and draw(st.integers(0, 4)) == 0:
        return pointwise_huge_bias_case(seed, fast=kind == "pw_fast")
    if kind in ("pw", "pw_add", "pw_fast", "pw_add_fast"):
        fast = kind.endswith("fast")
        if fast and draw(st.integers(0, 3)) > 0:  # in channels the specialized path takes
            c = draw(st.sampled_from([4, 8, 8, 12, 16, 4 * max(max_c // 4, 1)]))
        cout = draw(st.sampled_from([1, 2, 8, 8, draw(st.integers(1, max_c))]))
        return pointwise_case(seed, h, w, c, cout, kind in ("pw_add", "pw_add_fast"),
                              fast=fast)
    if kind == "fc":
        return fc_case(seed, draw(st.integers(1, 4 * max_c)), c)
    if kind == "add":
        return add_case(seed, h * w * c)
    if kind == "pool":
        k = draw(st.integers(0, 3))
        return pool_case(seed, max(h, k), max(w, k), c, k, draw(st.integers(1, 2)),
                         draw(st.integers(0, max(k - 1, 0))), draw(st.booleans()))
    if kind == "patch":
        ph, pw = draw(st.integers(1, h)), draw(st.integers(1, w))
        return patch_case(seed, h, w, c, ph, pw, draw(st.integers(-ph + 1, h - 1)),
                          draw(st.integers(-pw + 1, w - 1)), draw(st.booleans()))
    return requant_case(seed, draw(st.integers(1, 64)))
