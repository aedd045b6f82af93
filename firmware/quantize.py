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

from firmware.errors import InvalidModelError
from firmware.ir import Graph, Layer

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


def frozen_mapping(items: Mapping[str, object]) -> Mapping[str, object]:
    """A read-only view of a dict (the QuantizedGraph mappings are never mutated)."""
    return MappingProxyType(dict(items))


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
