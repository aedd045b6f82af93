"""Post-training int8 quantization of an IR `Graph` (CMSIS-NN / TFLite Micro conventions).

Conventions (see /work/notes/QUANT_CONTRACT.md; every kernel follows them):
- Activations: int8 per tensor, asymmetric: real = scale * (q - zero_point), q in [-128, 127].
- Weights: int8 per output channel, symmetric (zero point 0), q in [-127, 127], OIHW as in the
  IR (fully connected: (out, in)).
- Biases: int32, scale s_in * s_w[c], zero point 0: bias_q = round(b / (s_in * s_w[c])).
  Kernels add `input_offset` (= -zp_in) to every input element on the fly (CMSIS style).
- Requantization per output channel: out = clamp(requantize(acc, multiplier[c], shift[c])
  + output_offset, act_min, act_max); multiplier is Q31 in [2^30, 2^31), shift in [-31, 30];
  both computed here from s_in * s_w[c] / s_out with frexp. No float in any kernel.
- ReLU / ReLU6 become clamps: act_min = zp_out, act_max = min(127, zp_out + round(6 / s_out)).
- Add: TFLite's int8 add (left shift 20, per-input and output (multiplier, shift)).
- Average / global average pooling, max pooling and reshape keep the input's (scale, zero
  point) on their output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from firmware.errors import InvalidModelError, UnsupportedOpError
from firmware.float_exec import run_graph
from firmware.ir import Activation, Graph, Layer, OpKind

INT8_MIN = -128
INT8_MAX = 127
WEIGHT_QMAX = 127  # symmetric weights use [-127, 127] so that -w is representable
ADD_LEFT_SHIFT = 20  # TFLite int8 add: inputs are scaled up by 2^20 before rescaling

Int8Array = npt.NDArray[np.int8]
Int32Array = npt.NDArray[np.int32]
FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class QuantParams:
    """Per-tensor affine int8 parameters: real = scale * (q - zero_point)."""

    scale: float
    zero_point: int

    def __post_init__(self) -> None:
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise InvalidModelError(f"quantization scale {self.scale!r} must be finite and > 0")
        if not INT8_MIN <= self.zero_point <= INT8_MAX:
            raise InvalidModelError(
                f"zero point {self.zero_point} outside int8 [{INT8_MIN}, {INT8_MAX}]"
            )

    def quantize(self, real: npt.ArrayLike) -> Int8Array:
        """Real values to int8: round half to even of real / scale, plus zero point, saturated."""
        q = np.rint(np.asarray(real, dtype=np.float64) / self.scale) + self.zero_point
        out: Int8Array = np.clip(q, INT8_MIN, INT8_MAX).astype(np.int8)
        return out

    def dequantize(self, q: npt.ArrayLike) -> FloatArray:
        """int8 values to real: scale * (q - zero_point), as float32."""
        return (self.scale * (np.asarray(q, dtype=np.float64) - self.zero_point)).astype(
            np.float32
        )

    @property
    def real_min(self) -> float:
        """Smallest representable real value."""
        return self.scale * (INT8_MIN - self.zero_point)

    @property
    def real_max(self) -> float:
        """Largest representable real value."""
        return self.scale * (INT8_MAX - self.zero_point)


@dataclass(frozen=True)
class AddParams:
    """TFLite int8 add: both inputs moved to a common scale 2 * max(s1, s2) at 2^left_shift.

    For x in {1, 2}: v_x = requantize((q_x + input{x}_offset) << left_shift,
    input{x}_multiplier, input{x}_shift); out = clamp(requantize(v_1 + v_2, output_multiplier,
    output_shift) + output_offset, act_min, act_max). Offsets are -zero_point of each input
    and +zero_point of the output.
    """

    left_shift: int
    input1_offset: int
    input1_multiplier: int
    input1_shift: int
    input2_offset: int
    input2_multiplier: int
    input2_shift: int
    output_offset: int
    output_multiplier: int
    output_shift: int


@dataclass(frozen=True, eq=False)
class QuantLayer:
    """One layer with every integer parameter its kernel needs, computed at compile time.

    `weight_q` is int8 in the IR layout (conv OIHW with I = in/groups, fully connected
    (out, in)); `weight_scale` the float per-output-channel scales it came from (for export);
    `bias_q` int32 (always present for conv and fully connected: zeros where the float layer
    has no bias). `multiplier` / `shift` are int32 per output channel. `input_offset` is
    -zero_point of the (first) input, `output_offset` the output zero point. `add` is set for
    ADD layers only. Pooling layers carry only offsets and clamps.
    """

    layer: Layer
    inputs: tuple[QuantParams, ...]
    output: QuantParams
    act_min: int
    act_max: int
    input_offset: int
    output_offset: int
    weight_q: Int8Array | None = None
    weight_scale: npt.NDArray[np.float64] | None = None
    bias_q: Int32Array | None = None
    multiplier: Int32Array | None = None
    shift: Int32Array | None = None
    add: AddParams | None = None

    @property
    def name(self) -> str:
        """The layer's name."""
        return self.layer.name


@dataclass(frozen=True, eq=False)
class QuantizedGraph:
    """A float graph plus int8 parameters for every tensor and every layer.

    `tensors` maps each activation tensor name (the graph input included) to its QuantParams;
    `layers` maps each layer name to its QuantLayer, in the graph's execution order.
    """

    graph: Graph
    tensors: Mapping[str, QuantParams]
    layers: Mapping[str, QuantLayer]
    calibration: str = "data"  # "data" (given samples) or "generated" (synthetic inputs)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def input(self) -> QuantParams:
        """Quantization of the graph input."""
        return self.tensors[self.graph.input]

    @property
    def output(self) -> QuantParams:
        """Quantization of the logits."""
        return self.tensors[self.graph.output]

    def layer(self, name: str) -> QuantLayer:
        """The QuantLayer called `name`."""
        return self.layers[name]

    def ordered_layers(self) -> tuple[QuantLayer, ...]:
        """QuantLayers in the graph's execution order."""
        return tuple(self.layers[layer.name] for layer in self.graph.layers)


def quantize_multiplier(real: float) -> tuple[int, int]:
    """(multiplier, shift) with real = multiplier * 2^(shift - 31), multiplier in [2^30, 2^31).

    TFLite's QuantizeMultiplier: frexp, round half away from zero to Q31; 0 -> (0, 0); values
    below 2^-32 flush to (0, 0). Raises InvalidModelError for real >= 2^30 or negative.
    """
    if real < 0 or not math.isfinite(real):
        raise InvalidModelError(f"requantization scale {real!r} must be finite and >= 0")
    if real == 0.0:
        return 0, 0
    mantissa, exponent = math.frexp(real)
    q = math.floor(mantissa * (1 << 31) + 0.5)
    if q == 1 << 31:
        q //= 2
        exponent += 1
    if exponent < -31:
        return 0, 0
    if exponent > 30:
        raise InvalidModelError(f"requantization scale {real:g} exceeds 2^30 (shift > 30)")
    return q, exponent


def saturating_rounding_doubling_high_mul(a: npt.ArrayLike, b: npt.ArrayLike) -> Int32Array:
    """gemmlowp SaturatingRoundingDoublingHighMul on int32: round(a * b / 2^31), ties away."""
    a64 = np.asarray(a, dtype=np.int64)
    b64 = np.asarray(b, dtype=np.int64)
    prod = a64 * b64
    nudge = np.where(prod >= 0, 1 << 30, 1 - (1 << 30))
    # Truncating division toward zero, as the C code does with int64.
    num = prod + nudge
    result = np.where(num >= 0, num >> 31, -((-num) >> 31))
    overflow = (a64 == b64) & (a64 == -(1 << 31))
    return np.where(overflow, (1 << 31) - 1, result).astype(np.int32)


def rounding_divide_by_pot(x: npt.ArrayLike, exponent: npt.ArrayLike) -> Int32Array:
    """gemmlowp RoundingDivideByPOT: x / 2^exponent rounded half away from zero."""
    x64 = np.asarray(x, dtype=np.int64)
    e = np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << e) - 1
    remainder = x64 & mask
    threshold = (mask >> 1) + (x64 < 0)
    return ((x64 >> e) + (remainder > threshold)).astype(np.int32)


def requantize(acc: npt.ArrayLike, multiplier: npt.ArrayLike, shift: npt.ArrayLike) -> Int32Array:
    """CMSIS arm_nn_requantize: SRDHM(acc * 2^max(shift, 0), m) then RDByPOT(max(-shift, 0)).

    `acc` int32 (the left-shifted value must fit int32, as in C); broadcasting applies, so a
    per-channel multiplier/shift can be given along the last axis.
    """
    s = np.asarray(shift, dtype=np.int64)
    left = np.maximum(s, 0)
    right = np.maximum(-s, 0)
    shifted = np.asarray(acc, dtype=np.int64) << left
    shifted = np.clip(shifted, -(1 << 31), (1 << 31) - 1)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, multiplier),
                                  right)


# --- calibration -------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorRange:
    """Observed real range of one tensor over the calibration data (float32 values)."""

    low: float
    high: float


def calibrate(graph: Graph, samples: npt.ArrayLike, batch_size: int = 32) -> dict[str, TensorRange]:
    """Run the float graph on calibration samples (N, C, H, W); min/max of every tensor.

    Host-independent: the graph runs in float64 and each range is rounded to float32 once, at
    the end. A float32 forward pass would inherit the summation order of the BLAS kernel the
    host's CPU selects (OpenBLAS Haswell vs SkylakeX, ...), and a tensor's minimum could then
    differ by one float32 step between machines, and with it a scale and every multiplier
    derived from it. In float64 two summation orders differ by ~1e-16 relative, far below
    float32's 6e-8 rounding step, so the rounded ranges agree on every machine (barring a
    value within ~1e-16 of a float32 rounding boundary).
    """
    data = np.asarray(samples, dtype=np.float32)
    if data.ndim != 4 or data.shape[0] == 0:
        raise InvalidModelError(
            f"calibration data must be a non-empty (N, C, H, W) batch, got shape {data.shape}"
        )
    lows: dict[str, float] = {}
    highs: dict[str, float] = {}

    def observe(name: str, value: npt.NDArray[np.floating]) -> None:
        lo, hi = float(value.min()), float(value.max())
        lows[name] = min(lo, lows.get(name, lo))
        highs[name] = max(hi, highs.get(name, hi))

    for start in range(0, data.shape[0], batch_size):
        run_graph(graph, data[start:start + batch_size], hook=observe, dtype=np.float64)
    return {name: TensorRange(float(np.float32(lows[name])), float(np.float32(highs[name])))
            for name in lows}


def generated_calibration(graph: Graph, count: int = 16, seed: int = 0) -> FloatArray:
    """Synthetic calibration inputs (standard normal, clipped to +-3) when no data is given."""
    shape = graph.tensor(graph.input).shape
    rng = np.random.default_rng(seed)
    out: FloatArray = np.clip(rng.standard_normal((count, *shape)), -3, 3).astype(np.float32)
    return out


def params_for_range(low: float, high: float) -> QuantParams:
    """Asymmetric int8 params covering [min(low, 0), max(high, 0)] (zero exactly representable)."""
    lo = min(float(low), 0.0)
    hi = max(float(high), 0.0)
    if hi - lo < 1e-8:
        hi = lo + 1e-8
    scale = (hi - lo) / (INT8_MAX - INT8_MIN)
    zero_point = int(np.clip(round(INT8_MIN - lo / scale), INT8_MIN, INT8_MAX))
    return QuantParams(scale=scale, zero_point=zero_point)


# --- per-layer parameters ----------------------------------------------------------------


def activation_clamp(activation: Activation, out: QuantParams) -> tuple[int, int]:
    """(act_min, act_max) of a fused activation: ReLU -> [zp, 127]; ReLU6 -> [zp, zp+6/s]."""
    if activation is Activation.NONE:
        return INT8_MIN, INT8_MAX
    act_min = max(INT8_MIN, out.zero_point)
    if activation is Activation.RELU:
        return act_min, INT8_MAX
    return act_min, min(INT8_MAX, out.zero_point + round(6.0 / out.scale))


def quantize_weights(weight: npt.ArrayLike) -> tuple[Int8Array, npt.NDArray[np.float64]]:
    """Per-output-channel (axis 0) symmetric int8: s_w[c] = max|w_c| / 127, q = round(w / s_w).

    An all-zero channel gets scale 0 here; the caller picks a scale for it (see _layer_scales).
    """
    w = np.asarray(weight, dtype=np.float64)
    flat = w.reshape(w.shape[0], -1)
    scale = np.abs(flat).max(axis=1) / WEIGHT_QMAX
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(flat / safe[:, None]), -WEIGHT_QMAX, WEIGHT_QMAX)
    return q.astype(np.int8).reshape(w.shape), scale


def _weighted_layer(layer: Layer, graph: Graph, inp: QuantParams, out: QuantParams) -> QuantLayer:
    """Conv or fully connected: int8 weights, int32 bias, per-channel (multiplier, shift)."""
    assert layer.weight is not None
    weight_q, w_scale = quantize_weights(graph.params[layer.weight])
    # A channel whose weights are all zero outputs its bias alone; give it the scale that
    # makes its requantization exactly 1 so the bias keeps full output precision.
    w_scale = np.where(w_scale > 0, w_scale, out.scale / inp.scale)
    channels = weight_q.shape[0]
    bias = (np.zeros(channels) if layer.bias is None
            else np.asarray(graph.params[layer.bias], dtype=np.float64))
    bias_scale = inp.scale * w_scale
    bias_real = np.rint(bias / bias_scale)
    if np.abs(bias_real).max(initial=0) > np.iinfo(np.int32).max:
        worst = int(np.argmax(np.abs(bias_real)))
        raise InvalidModelError(
            f"layer {layer.name}: bias of channel {worst} is {bias[worst]:g}, "
            f"{bias_real[worst]:.3g} steps of {bias_scale[worst]:.3g}: exceeds int32"
        )
    pairs = [quantize_multiplier(float(r)) for r in bias_scale / out.scale]
    act_min, act_max = activation_clamp(layer.activation, out)
    return QuantLayer(
        layer=layer, inputs=(inp,), output=out, act_min=act_min, act_max=act_max,
        input_offset=-inp.zero_point, output_offset=out.zero_point,
        weight_q=weight_q, weight_scale=w_scale, bias_q=bias_real.astype(np.int32),
        multiplier=np.array([m for m, _ in pairs], dtype=np.int32),
        shift=np.array([s for _, s in pairs], dtype=np.int32),
    )


def add_params(in1: QuantParams, in2: QuantParams, out: QuantParams) -> AddParams:
    """TFLite's int8 add parameters: common scale 2 * max(s1, s2), left shift 20."""
    twice_max = 2.0 * max(in1.scale, in2.scale)
    m1, s1 = quantize_multiplier(in1.scale / twice_max)
    m2, s2 = quantize_multiplier(in2.scale / twice_max)
    mo, so = quantize_multiplier(twice_max / ((1 << ADD_LEFT_SHIFT) * out.scale))
    return AddParams(
        left_shift=ADD_LEFT_SHIFT,
        input1_offset=-in1.zero_point, input1_multiplier=m1, input1_shift=s1,
        input2_offset=-in2.zero_point, input2_multiplier=m2, input2_shift=s2,
        output_offset=out.zero_point, output_multiplier=mo, output_shift=so,
    )


def quantize_layer(layer: Layer, graph: Graph, tensors: Mapping[str, QuantParams]) -> QuantLayer:
    """The QuantLayer of one layer, given the QuantParams of its input and output tensors."""
    ins = tuple(tensors[name] for name in layer.inputs)
    out = tensors[layer.output]
    if layer.op in (OpKind.CONV, OpKind.FULLY_CONNECTED):
        return _weighted_layer(layer, graph, ins[0], out)
    if layer.op is not OpKind.ADD and layer.op not in SAME_SCALE_OPS:
        raise UnsupportedOpError(
            f"layer {layer.name}: op {layer.op.value} has no int8 kernel "
            f"(supported: conv2d, fc, add, avgpool, maxpool, gap, reshape)"
        )
    if layer.op in (OpKind.GLOBAL_AVG_POOL, OpKind.RESHAPE) \
            and layer.activation is not Activation.NONE:
        # The int8 global pooling and reshape kernels have no clamp: refuse, never drop it.
        raise UnsupportedOpError(f"layer {layer.name}: {layer.activation.value} fused into "
                                 f"{layer.op.value} has no int8 kernel")
    act_min, act_max = activation_clamp(layer.activation, out)
    return QuantLayer(
        layer=layer, inputs=ins, output=out, act_min=act_min, act_max=act_max,
        input_offset=-ins[0].zero_point, output_offset=out.zero_point,
        add=add_params(ins[0], ins[1], out) if layer.op is OpKind.ADD else None,
    )


# Ops whose int8 output keeps the input's (scale, zero point): no requantization needed.
SAME_SCALE_OPS = frozenset({OpKind.AVG_POOL, OpKind.MAX_POOL, OpKind.GLOBAL_AVG_POOL,
                            OpKind.RESHAPE})


def tensor_params(graph: Graph, ranges: Mapping[str, TensorRange]) -> dict[str, QuantParams]:
    """QuantParams of every tensor: from its range, or its input's where the op keeps scale."""
    tensors = {graph.input: _from_range(graph.input, ranges)}
    for layer in graph.layers:
        if layer.op in SAME_SCALE_OPS:
            tensors[layer.output] = tensors[layer.inputs[0]]
        else:
            tensors[layer.output] = _from_range(layer.output, ranges)
    return tensors


def _from_range(name: str, ranges: Mapping[str, TensorRange]) -> QuantParams:
    if name not in ranges:
        raise InvalidModelError(f"tensor {name!r} was not observed during calibration")
    r = ranges[name]
    return params_for_range(r.low, r.high)


def quantize_graph(graph: Graph, calibration: npt.ArrayLike | None = None, *,
                   generated_count: int = 16, seed: int = 0) -> QuantizedGraph:
    """Post-training int8 quantization of a (BN-folded) float graph.

    With `calibration` (N, C, H, W float32 samples) activation ranges come from running the
    float graph on them; without, from `generated_count` synthetic inputs (recorded in
    `QuantizedGraph.calibration` = "generated" and a note).
    """
    if not graph.params:
        raise InvalidModelError(f"graph {graph.name} has no parameters to quantize")
    for layer in graph.layers:
        if layer.op is OpKind.CONCAT:
            raise UnsupportedOpError(f"layer {layer.name}: concat has no int8 kernel")
    notes: tuple[str, ...] = ()
    if calibration is None:
        samples = generated_calibration(graph, generated_count, seed)
        source = "generated"
        notes = (f"calibrated on {generated_count} generated inputs (standard normal): "
                 "pass real samples for representative activation ranges",)
    else:
        samples = np.asarray(calibration, dtype=np.float32)
        source = "data"
    tensors = tensor_params(graph, calibrate(graph, samples))
    layers = {layer.name: quantize_layer(layer, graph, tensors) for layer in graph.layers}
    return QuantizedGraph(graph=graph, tensors=MappingProxyType(tensors),
                          layers=MappingProxyType(layers), calibration=source, notes=notes)
