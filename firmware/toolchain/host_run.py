"""Run a generated model's host shared library (build_host_model) in this process via ctypes.

`HostModel(path)` loads the library; `run(inputs)` takes int8 (N, H, W, C) and returns the
int8 outputs (N, bytes), one `tf_host_run` per image; `use_overlay(data)` applies a weights
overlay (None: the built-in weights) and raises EmulationError with the status if the library
refuses it. Each HostModel loads its own copy of the library (a fresh path per load would be
needed for two overlays at once: the overlay pointers are the library's globals).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import numpy.typing as npt

from firmware.errors import EmulationError

_STATUS = {0: "TF_OK", 1: "TF_ERR_NULL (no overlay there)",
           2: "TF_ERR_ARG (torn, altered or for another build)", 3: "TF_ERR_SHAPE",
           4: "TF_ERR_ALIAS", 5: "TF_ERR_IO"}


class HostModel:
    """A loaded host model library (module docstring)."""

    def __init__(self, path: Path) -> None:
        try:
            self.lib = ctypes.CDLL(str(Path(path).resolve()), mode=ctypes.RTLD_LOCAL)
            self._run = self.lib.tf_host_run
            self._overlay = self.lib.tf_host_use_overlay
            sizes_fn = self.lib.tf_host_sizes
        except (OSError, AttributeError) as exc:
            raise EmulationError(f"{path}: not a tinyfleet host model library: {exc}") from None
        self._run.restype = ctypes.c_int32
        self._run.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._overlay.restype = ctypes.c_int32
        self._overlay.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        sizes = (ctypes.c_uint32 * 3)()
        sizes_fn(sizes)
        self.input_bytes, self.output_bytes, self.overlay_body_bytes = (int(v) for v in sizes)
        self._overlay_buffer: npt.NDArray[np.uint32] | None = None

    def use_overlay(self, data: bytes | None) -> None:
        """Point the overlaid layers at `data` (kept alive here), or back at the built-ins."""
        if data is None:
            self._overlay(None, 0)
            self._overlay_buffer = None
            return
        # uint32 storage: the C reads the int32 parts in place and checks 4-byte alignment
        buffer = np.zeros(-(-len(data) // 4), dtype=np.uint32)
        buffer.view(np.uint8)[:len(data)] = np.frombuffer(data, dtype=np.uint8)
        status = int(self._overlay(buffer.ctypes.data, len(data)))
        if status != 0:
            self._overlay(None, 0)
            raise EmulationError(f"the model library refused the overlay: "
                                 f"{_STATUS.get(status, status)}")
        self._overlay_buffer = buffer

    def run(self, inputs: npt.NDArray[np.int8]) -> npt.NDArray[np.int8]:
        """int8 outputs (N, output bytes) of int8 HWC inputs (N, H, W, C)."""
        batch = np.ascontiguousarray(inputs, dtype=np.int8)
        if batch.ndim != 4 or int(np.prod(batch.shape[1:])) != self.input_bytes:
            raise EmulationError(f"inputs must be int8 (N, H, W, C) of {self.input_bytes} "
                                 f"bytes each, got {inputs.dtype} {inputs.shape}")
        out = np.zeros((len(batch), self.output_bytes), dtype=np.int8)
        for i in range(len(batch)):
            status = int(self._run(batch[i].ctypes.data, out[i].ctypes.data))
            if status != 0:
                raise EmulationError(f"tf_host_run returned {_STATUS.get(status, status)} on "
                                     f"input {i}")
        return out
