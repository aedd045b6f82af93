"""The metrics a device reports after a personalization round: a fixed allow-list of numbers.

Nothing else may leave the device: no sample, label, feature, file name or free text. The
message is validated when it is built (`MetricsReport.__post_init__`), again when it is
encoded, and `MetricsReport.decode` applies the same rules to bytes received (the service
validates again with it). Unknown keys, missing keys, booleans, strings, NaN or infinities,
out-of-range values and oversized payloads are refused with a reason naming the field.

When device_agent.protocol (the OTA issue's wire protocol) lands with its MetricsReport, this
module becomes an alias of it: the allow-list below is the one both sides validate.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from device_agent.errors import AgentError

MAX_CURVE_POINTS = 50
MAX_PAYLOAD_BYTES = 4096
MAX_INT = 2**53  # exact in a JSON number / float64
INT_FIELDS = ("round", "samples_used", "training_memory_bytes")
UNIT_FIELDS = ("accuracy_before", "accuracy_after")  # in [0, 1]
NONNEG_FIELDS = ("loss_before", "loss_after", "duration_s")
ALLOWED = (*INT_FIELDS, *UNIT_FIELDS, *NONNEG_FIELDS, "loss_curve")


class MetricsError(AgentError):
    """A metrics message outside the allow-list (the reason names the field)."""


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MetricsError(f"metrics field {name} must be a number, got "
                           f"{type(value).__name__}")
    if not math.isfinite(value):
        raise MetricsError(f"metrics field {name} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class MetricsReport:
    """One round's numbers (module docstring)."""

    round: int
    samples_used: int
    accuracy_before: float
    accuracy_after: float
    loss_before: float
    loss_after: float
    loss_curve: tuple[float, ...]
    training_memory_bytes: int
    duration_s: float

    def __post_init__(self) -> None:
        for name in INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise MetricsError(f"metrics field {name} must be an integer, got "
                                   f"{type(value).__name__}")
            if not 0 <= value <= MAX_INT:
                raise MetricsError(f"metrics field {name} {value} outside [0, 2^53]")
        for name in UNIT_FIELDS:
            if not 0.0 <= _number(name, getattr(self, name)) <= 1.0:
                raise MetricsError(f"metrics field {name} {getattr(self, name)!r} outside "
                                   "[0, 1]")
        for name in NONNEG_FIELDS:
            if _number(name, getattr(self, name)) < 0:
                raise MetricsError(f"metrics field {name} {getattr(self, name)!r} is negative")
        if not isinstance(self.loss_curve, tuple | list):
            raise MetricsError("metrics field loss_curve must be a list of numbers")
        if len(self.loss_curve) > MAX_CURVE_POINTS:
            raise MetricsError(f"metrics field loss_curve has {len(self.loss_curve)} points, "
                               f"at most {MAX_CURVE_POINTS}")
        for i, v in enumerate(self.loss_curve):
            if _number(f"loss_curve[{i}]", v) < 0:
                raise MetricsError(f"metrics field loss_curve[{i}] {v!r} is negative")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready numbers."""
        out = asdict(self)
        out["loss_curve"] = [float(v) for v in self.loss_curve]
        return out

    def encode(self) -> bytes:
        """The message bytes (checked against the size cap)."""
        data = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"),
                          allow_nan=False).encode()
        if len(data) > MAX_PAYLOAD_BYTES:
            raise MetricsError(f"metrics message is {len(data)} bytes, over "
                               f"{MAX_PAYLOAD_BYTES}")
        return data

    @classmethod
    def from_dict(cls, obj: Any) -> MetricsReport:
        """A report from a parsed JSON object; MetricsError unless exactly the allow-list."""
        if not isinstance(obj, dict):
            raise MetricsError("metrics message must be a JSON object")
        unknown = sorted(set(obj) - set(ALLOWED))
        if unknown:
            raise MetricsError(f"metrics field {unknown[0]} is not in the allow-list "
                               f"({', '.join(ALLOWED)})")
        missing = [k for k in ALLOWED if k not in obj]
        if missing:
            raise MetricsError(f"metrics field {missing[0]} is missing")
        curve = obj["loss_curve"]
        if not isinstance(curve, list):
            raise MetricsError("metrics field loss_curve must be a list of numbers")
        return cls(**{**obj, "loss_curve": tuple(curve)})

    @classmethod
    def decode(cls, data: bytes) -> MetricsReport:
        """Strictly decode message bytes (size cap, JSON, allow-list, ranges)."""
        if len(data) > MAX_PAYLOAD_BYTES:
            raise MetricsError(f"metrics message is {len(data)} bytes, over "
                               f"{MAX_PAYLOAD_BYTES}")
        try:
            obj = json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MetricsError(f"metrics message is not UTF-8 JSON: {exc}") from None
        return cls.from_dict(obj)


def _refuse_constant(name: str) -> float:
    raise MetricsError(f"metrics message holds {name}, which is not a number")
