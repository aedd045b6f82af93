"""Run pytest under whatever BLAS / torch kernels this process got, and say which ones they are.

    python -m tests.firmware.host_variation [PYTEST ARGS...]

Prints one line `HOST-VARIATION {json}` first: the kernels actually selected (OpenBLAS's core
type per threadpoolctl, torch's ATen CPU capability) and the sha256 of the C generated for two
quantized models (the golden `tiny` net and the digits net imported from torch), then runs
pytest in this same process, so the tests run on exactly the kernels reported. Exits with
pytest's status. tests/firmware/test_host_variations.py starts it under forced kernels
(OPENBLAS_CORETYPE, ATEN_CPU_CAPABILITY) and compares everything with the default run.
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

PREFIX = "HOST-VARIATION "


def kernels() -> dict[str, Any]:
    """The kernels this process runs: OpenBLAS core types (numpy's and any other) and ATen's."""
    import numpy  # noqa: F401  (loads numpy's OpenBLAS, which threadpoolctl then inspects)
    import threadpoolctl
    import torch

    blas = sorted({str(info.get("architecture")) for info in threadpoolctl.threadpool_info()
                   if info.get("internal_api") == "openblas"})
    return {"openblas": blas, "aten": str(torch.backends.cpu.get_cpu_capability())}


def generated_c_digests() -> dict[str, str]:
    """sha256 of the C generated for the quantized tiny and digits models (must not vary)."""
    from firmware.codegen import render_model
    from firmware.frontend.onnx_import import import_torch
    from firmware.int8.quantize import quantize_graph
    from tests.firmware.digits_model import SIZE, digits
    from tests.firmware.small_models import tiny_quantized

    d = digits()
    models = {"tiny": tiny_quantized(),
              "digits": quantize_graph(import_torch(d.model, (1, 1, SIZE, SIZE)), d.calib)}
    digests = {}
    for name, qgraph in models.items():
        files = render_model(qgraph).files
        text = "".join(f"{key}\n{files[key]}" for key in sorted(files))
        digests[name] = hashlib.sha256(text.encode()).hexdigest()
    return digests


def main(argv: list[str]) -> int:
    """Report the kernels and digests, then run pytest with `argv`; return its exit status."""
    import pytest

    report = {"kernels": kernels(), "c_sha256": generated_c_digests()}
    print(PREFIX + json.dumps(report), flush=True)
    return int(pytest.main(["-p", "no:cacheprovider", "-q", *argv]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
