"""The training arena: named buffers checked against the memory model, and their live bytes.

The engine asks for every buffer by the memory model's name ("saved:b3.dw", "grad:b4.add");
the arena refuses a name the model did not plan or a size it did not predict, and counts live
bytes as the model does (grouped activation buffers share storage). So the engine cannot
hold more than the model says, and `peak_bytes` is what the engine really held.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from firmware.training.errors import TrainingError
from firmware.training.memory import Alloc, BufferKind, Free, Mark, Op, Phase, Rename, Tracker


class Arena:
    """Named numpy buffers with live-byte accounting (see the module docstring).

    `expected` maps buffer names to bytes (the memory model's); None accepts any buffer
    (the fp32 baseline, which the int8 model does not describe).
    """

    def __init__(self, expected: Mapping[str, int] | None = None, record: bool = True) -> None:
        self.expected = expected
        self.record = record
        self.tracker = Tracker.empty()
        self.arrays: dict[str, npt.NDArray[Any]] = {}
        self.peak_bytes = 0
        self.training_peak_bytes = 0
        self.log: list[Op] = []

    def mark(self, phase: Phase, layer: str = "") -> None:
        """Record where the engine is (for comparison with the model's program)."""
        if self.record:
            self.log.append(Mark(phase, layer))

    def alloc(self, name: str, kind: BufferKind, shape: tuple[int, ...],
              dtype: type[np.generic], group: str | None = None,
              nbytes: int | None = None) -> npt.NDArray[Any]:
        """A zeroed buffer; `nbytes` overrides shape x itemsize (a packed bit mask)."""
        array = np.zeros(shape, dtype=dtype)
        size = array.nbytes if nbytes is None else nbytes
        if self.expected is not None:
            if name not in self.expected:
                raise TrainingError(f"engine asked for buffer {name} ({size} B), which the "
                                    "memory model did not plan")
            if self.expected[name] != size:
                raise TrainingError(f"buffer {name}: engine needs {size} B, the memory model "
                                    f"planned {self.expected[name]} B")
        self.tracker.alloc(name, size, kind, group)
        self.arrays[name] = array
        self.peak_bytes = max(self.peak_bytes, self.tracker.total)
        self.training_peak_bytes = max(self.training_peak_bytes, self.tracker.training)
        if self.record:
            self.log.append(Alloc(name, size, kind, group))
        return array

    def free(self, name: str) -> None:
        """Release a buffer."""
        self.tracker.free(name)
        del self.arrays[name]
        if self.record:
            self.log.append(Free(name))

    def rename(self, old: str, new: str) -> None:
        """Buffer `old` now holds `new` (no bytes move)."""
        self.tracker.rename(old, new)
        self.arrays[new] = self.arrays.pop(old)
        if self.record:
            self.log.append(Rename(old, new))

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def __getitem__(self, name: str) -> npt.NDArray[Any]:
        return self.arrays[name]

    @property
    def live_bytes(self) -> int:
        """Bytes live now."""
        return self.tracker.total
