"""Post-training int8 quantization accuracy and the onnxruntime cross-check, on digits.

    .venv/bin/python -m bench.quantization [--json] [--trained-mobilenet]

The model is the test suite's TinyNet (tests/firmware/digits_model.py: sklearn's 8x8 digits
upsampled to 16x16, a MobileNetV2-shaped net with BN folded, checked-in weights), calibrated on
200 training images and evaluated on 500 held-out ones. Three implementations of the int8
model run on the same int8 inputs: firmware.int8.reference (integer numpy, the golden spec of
the C kernels), onnxruntime on the QDQ export with its graph optimizations (QDQ fused into
QLinearConv & co.) and without (every op as written, float between Q and DQ). The
cross-check's criterion is per layer (each layer fed the reference's own int8 input, within 1
LSB: firmware.int8.onnx_export.cross_check); whole-network agreement, strict and tie-aware, is
reported beside it. The same check then runs on MobileNetV2 w0.35 r144 and MCUNet-10FPS (the
model zoo's block list) with random weights and generated calibration, the latter compiled
end to end for an STM32F746 (the compile report's `onnxruntime` entry); with
--trained-mobilenet, on a MobileNetV2 w0.35 trained on digits at 32x32.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import numpy as np

from bench.compiler import model as compiler_model
from firmware.float_exec import run_graph
from firmware.int8.onnx_export import (
    CrossCheck,
    compare_outputs,
    cross_check,
    export_onnx,
    run_onnxruntime,
    tie_aware_agreement,
)
from firmware.int8.quantize import generated_calibration, quantize_graph
from firmware.int8.reference import run_quantized
from tests.firmware.digits_model import digits


def measure() -> dict[str, Any]:
    """Float and int8 top-1, and onnxruntime agreement with the integer reference."""
    start = time.perf_counter()
    d = digits()
    loaded_s = time.perf_counter() - start
    qg = quantize_graph(d.graph, d.calib)
    x_q = qg.input.quantize(d.x_test)
    ref = run_quantized(qg, x_q).reshape(len(x_q), -1)
    float_pred = run_graph(d.graph, d.x_test).reshape(len(x_q), -1).argmax(1)
    model = export_onnx(qg)
    result: dict[str, Any] = {
        "samples": len(x_q), "load_s": loaded_s,
        "float_top1": float(np.mean(float_pred == d.y_test)),
        "int8_top1": float(np.mean(ref.argmax(1) == d.y_test)),
        "float_int8_argmax_agreement": float(np.mean(float_pred == ref.argmax(1))),
    }
    result["top1_drop"] = result["float_top1"] - result["int8_top1"]
    for label, optimize in (("ort_fused", True), ("ort_plain", False)):
        theirs = run_onnxruntime(model, x_q, optimize=optimize)
        a = compare_outputs(theirs, ref)
        result[label] = {"argmax_agreement": a.argmax_agreement,
                         "tie_aware_agreement": tie_aware_agreement(theirs, ref),
                         "mean_abs_lsb": a.mean_abs_lsb, "max_abs_lsb": a.max_abs_lsb,
                         "exact_fraction": a.exact_fraction}
    result["per_layer"] = _summary(cross_check(qg, x_q))
    return result


def _summary(check: CrossCheck) -> dict[str, Any]:
    """The cross-check's report plus per-op worst differences."""
    report = check.report()
    by_op: dict[str, int] = {}
    for la in check.layers:
        by_op[la.op] = max(by_op.get(la.op, 0), la.max_abs_lsb)
    report["per_layer"]["max_abs_lsb_by_op"] = by_op
    report["per_layer"]["differing_fraction_max_non_pool"] = max(
        (la.differing_fraction for la in check.layers if la.op not in ("gap", "avgpool")),
        default=0.0)
    return report


def mobilenet() -> dict[str, Any]:
    """The same cross-check on MobileNetV2 w0.35 r144 with random weights (60+ layers)."""
    graph = compiler_model("mobilenetv2")
    qg = quantize_graph(graph, generated_count=8)
    x_q = qg.input.quantize(generated_calibration(graph, 16, seed=5))
    return {"model": graph.name, **_summary(cross_check(qg, x_q))}


def mcunet(mcu: str = "stm32f746") -> dict[str, Any]:
    """MCUNet-10FPS compiled end to end (generated calibration, OTA layout single): the
    report's cross-check."""
    import tempfile
    from pathlib import Path

    from firmware.frontend.builtin import build_graph, builtin_config
    from firmware.image import generate_signing_key
    from firmware.pipeline import CompileOptions, compile_model
    from firmware.targets import OtaLayout, get_target

    graph = build_graph(builtin_config("mcunet-10fps"))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-mcunet-") as tmp:
        # 810 kB of weights (1000 classes): the whole Flash (`single`), not an A/B slot.
        result = compile_model(graph, get_target(mcu), generate_signing_key(), Path(tmp),
                               options=CompileOptions(layout=OtaLayout.SINGLE))
    report = dict(result.report)
    return {"model": graph.name, "mcu": mcu, "compile_s": time.perf_counter() - start,
            "layers": len(graph.layers), "bit_exact": report["bit_exact"],
            "schedule": report["schedule"], "onnxruntime": report["onnxruntime"]}


def trained_mobilenet(epochs: int = 8) -> dict[str, Any]:
    """MobileNetV2 w0.35 (17 blocks) trained on digits at 32x32: top-1 drop and ORT check."""
    import torch
    from torch import nn

    from firmware.arch import mobilenet_v2
    from firmware.frontend.builtin import build_graph
    from firmware.nas.supernet import SubnetModule
    from tests.firmware.digits_model import load_images

    x, y = load_images()
    x = x.repeat(2, axis=2).repeat(2, axis=3)  # 16x16 -> 32x32
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    config = dataclasses.replace(mobilenet_v2(0.35, 32, 10), in_channels=1)
    torch.manual_seed(0)
    module = SubnetModule(config)
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x[:-500]), torch.from_numpy(y[:-500])
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    module.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(module(xt[idx]), yt[idx])
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    with torch.no_grad():  # BN statistics of the whole training set
        for bn in module.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.reset_running_stats()
                bn.momentum = None
        module(xt)
    module.eval()
    graph = build_graph(config, params=module.folded_params())
    qg = quantize_graph(graph, x[:200])
    x_test, y_test = x[-500:], y[-500:]
    x_q = qg.input.quantize(x_test)
    ref = run_quantized(qg, x_q).reshape(len(x_q), -1)
    float_pred = run_graph(graph, x_test).reshape(len(x_q), -1).argmax(1)
    a = compare_outputs(run_onnxruntime(export_onnx(qg), x_q), ref)
    return {"model": graph.name, "train_s": time.perf_counter() - start, "samples": len(x_q),
            "float_top1": float(np.mean(float_pred == y_test)),
            "int8_top1": float(np.mean(ref.argmax(1) == y_test)),
            "argmax_agreement": a.argmax_agreement, "mean_abs_lsb": a.mean_abs_lsb,
            "max_abs_lsb": a.max_abs_lsb}


def main() -> None:
    """Print the numbers (JSON, or a short table)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--trained-mobilenet", action="store_true",
                        help="also train MobileNetV2 w0.35 on digits at 32x32 (~3 min)")
    args = parser.parse_args()
    r = measure()
    r["mobilenet"] = mobilenet()
    r["mcunet"] = mcunet()
    if args.trained_mobilenet:
        r["trained_mobilenet"] = trained_mobilenet()
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(f"top-1 float {r['float_top1']:.1%}  int8 {r['int8_top1']:.1%}  drop "
          f"{r['top1_drop']:+.1%}  argmax agreement {r['float_int8_argmax_agreement']:.1%} "
          f"({r['samples']} held-out digits)")
    for label in ("ort_fused", "ort_plain"):
        a = r[label]
        print(f"{label}: argmax agreement {a['argmax_agreement']:.1%} (tie-aware "
              f"{a['tie_aware_agreement']:.1%}), mean |diff| {a['mean_abs_lsb']:.3f} LSB, max "
              f"{a['max_abs_lsb']} LSB, exact {a['exact_fraction']:.1%}")
    for label, c in (("digits", r["per_layer"]), (r["mobilenet"]["model"], r["mobilenet"]),
                     (r["mcunet"]["model"], r["mcunet"]["onnxruntime"])):
        p, n = c["per_layer"], c["network"]
        print(f"{label}: passes {c['passes']}: per layer max {p['max_abs_lsb']} LSB (worst "
              f"{p['worst_layer']}), {p['layers_differing']}/{p['layers']} layers differ; "
              f"network argmax {n['argmax_agreement']:.1%} (tie-aware "
              f"{n['tie_aware_agreement']:.1%}), mean {n['mean_abs_lsb']:.2f} LSB, max "
              f"{n['max_abs_lsb']} LSB; known: {c['known_differences']}")
    if "trained_mobilenet" in r:
        t = r["trained_mobilenet"]
        print(f"{t['model']} trained on digits 32x32 ({t['train_s']:.0f} s): top-1 float "
              f"{t['float_top1']:.1%} int8 {t['int8_top1']:.1%}; ORT fused vs reference: "
              f"argmax agreement {t['argmax_agreement']:.1%}, mean {t['mean_abs_lsb']:.2f} "
              f"LSB, max {t['max_abs_lsb']} LSB ({t['samples']} held-out digits)")


if __name__ == "__main__":
    main()
