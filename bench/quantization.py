"""Post-training int8 quantization accuracy and the onnxruntime cross-check, on digits.

    .venv/bin/python -m bench.quantization [--json]

The model is the test suite's TinyNet (tests/firmware/digits_model.py: sklearn's 8x8 digits
upsampled to 16x16, a MobileNetV2-shaped net with BN folded, ~3 s of Adam), calibrated on 200
training images and evaluated on 500 held-out ones. Three implementations of the int8 model
run on the same int8 inputs: firmware.reference (integer numpy, the golden spec of the C
kernels), onnxruntime on the QDQ export with its graph optimizations (QDQ fused into
QLinearConv & co.) and without (every op as written, float between Q and DQ).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from firmware.float_exec import run_graph
from firmware.onnx_export import compare_outputs, export_onnx, run_onnxruntime
from firmware.quantize import quantize_graph
from firmware.reference import run_quantized
from tests.firmware.digits_model import digits


def measure() -> dict[str, Any]:
    """Float and int8 top-1, and onnxruntime agreement with the integer reference."""
    start = time.perf_counter()
    d = digits()
    trained_s = time.perf_counter() - start
    qg = quantize_graph(d.graph, d.calib)
    x_q = qg.input.quantize(d.x_test)
    ref = run_quantized(qg, x_q).reshape(len(x_q), -1)
    float_pred = run_graph(d.graph, d.x_test).reshape(len(x_q), -1).argmax(1)
    model = export_onnx(qg)
    result: dict[str, Any] = {
        "samples": len(x_q), "train_s": trained_s,
        "float_top1": float(np.mean(float_pred == d.y_test)),
        "int8_top1": float(np.mean(ref.argmax(1) == d.y_test)),
        "float_int8_argmax_agreement": float(np.mean(float_pred == ref.argmax(1))),
    }
    result["top1_drop"] = result["float_top1"] - result["int8_top1"]
    for label, optimize in (("ort_fused", True), ("ort_plain", False)):
        a = compare_outputs(run_onnxruntime(model, x_q, optimize=optimize), ref)
        result[label] = {"argmax_agreement": a.argmax_agreement, "mean_abs_lsb": a.mean_abs_lsb,
                         "max_abs_lsb": a.max_abs_lsb, "exact_fraction": a.exact_fraction}
    return result


def main() -> None:
    """Print the numbers (JSON, or a short table)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = measure()
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(f"top-1 float {r['float_top1']:.1%}  int8 {r['int8_top1']:.1%}  drop "
          f"{r['top1_drop']:+.1%}  argmax agreement {r['float_int8_argmax_agreement']:.1%} "
          f"({r['samples']} held-out digits)")
    for label in ("ort_fused", "ort_plain"):
        a = r[label]
        print(f"{label}: argmax agreement {a['argmax_agreement']:.1%}, mean |diff| "
              f"{a['mean_abs_lsb']:.3f} LSB, max {a['max_abs_lsb']} LSB, exact "
              f"{a['exact_fraction']:.1%}")


if __name__ == "__main__":
    main()
