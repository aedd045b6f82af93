"""End to end: a trained torch model -> signed image, bit-exact in QEMU on M4 and M7.

The model's weights are checked in (tests/firmware/digits_model.py), not trained here: the
thresholds below hold on every CPU, whichever BLAS or torch kernels it selects
(tests/firmware/test_host_variations.py re-runs this file under other kernels).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from firmware.errors import DoesNotFitError, ImageError
from firmware.frontend.onnx_import import import_torch
from firmware.image import generate_signing_key, sign_image, verify_image
from firmware.pipeline import (
    CompileOptions,
    CompileResult,
    Dataset,
    Stage,
    compile_model,
    rerun_image,
)
from firmware.plan.flash import flash_account
from firmware.plan.kernels import SPECIALIZED_KINDS, generic_steps
from firmware.plan.patch import plan_patches
from firmware.targets import Cpu, OtaLayout, custom_target, get_target
from tests.firmware.digits_model import SIZE, digits

pytestmark = [pytest.mark.toolchain,
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

KEY = generate_signing_key()


def _compile(tmp_path: Path, mcu: str, patches: int) -> CompileResult:
    d = digits()
    graph = import_torch(d.model, (1, 1, SIZE, SIZE))
    stages: list[Stage] = []
    result = compile_model(
        graph, get_target(mcu), KEY, tmp_path, calib=Dataset(d.calib),
        test=Dataset(d.x_test, d.y_test), options=CompileOptions(patches=patches),
        progress=lambda stage, _msg: stages.append(stage))
    assert stages == list(Stage)
    return result


@pytest.mark.parametrize("mcu, cpu", [("stm32f412", Cpu.CORTEX_M4), ("stm32f746", Cpu.CORTEX_M7)])
@pytest.mark.parametrize("patches", [1, 2], ids=["layer", "patch"])
def test_torch_model_to_verified_image(tmp_path: Path, mcu: str, cpu: Cpu, patches: int) -> None:
    result = _compile(tmp_path, mcu, patches)
    report = result.report
    image = verify_image(result.image, KEY.public_key())
    assert image.manifest.target.cpu == cpu.value
    assert image.manifest.schedule.patches == patches == report["schedule"]["patches"]
    assert report["bit_exact"] is True
    assert np.array_equal(result.emulation.outputs, result.expected)
    # The image alone reproduces its test vectors in a fresh QEMU run.
    elf = tmp_path / "again.elf"
    elf.write_bytes(image.payload)
    rerun = rerun_image(image, elf)
    assert rerun.matches and rerun.vectors == 4
    # Measured RAM holds the planned activations; the difference is named buffers.
    measured, predicted = report["measured"], report["predicted"]
    assert measured["sram_breakdown"]["arena_used_bytes"] <= predicted["sram_bytes"] * 1.05
    assert measured["sram_bytes"] < get_target(mcu).sram_bytes
    # The Flash account (params + runtime and generated code) is >= the linked image, within 2 %
    assert measured["flash_bytes"] <= predicted["flash_bytes"] <= 1.02 * measured["flash_bytes"]
    assert report["flash_check"]["over_bytes"] == predicted["flash_bytes"] - measured[
        "flash_bytes"]
    assert report["instructions"] > report["macs"] > 0
    assert report["accuracy"]["top1_drop"] <= 0.02
    # onnxruntime: every layer, fed the reference's input, within 1 LSB (the criterion);
    # end to end, the top-1 agrees up to exact logit ties.
    ort = report["onnxruntime"]
    assert ort["passes"] and ort["per_layer"]["max_abs_lsb"] <= 1
    assert not ort["per_layer"]["failing"]
    assert ort["samples"] == 64 and ort["network"]["tie_aware_agreement"] >= 0.99
    assert ort["network"]["mean_abs_lsb"] <= 1.0
    assert report["calibration"]["source"] == "data"


def test_model_too_big_for_sram_names_the_numbers(tmp_path: Path) -> None:
    d = digits()
    graph = import_torch(d.model, (1, 1, SIZE, SIZE))
    # Its smallest SRAM account is 3.7 kB (arena, scratch, static data, stack).
    tiny = custom_target(3 * 1024, 512 * 1024, Cpu.CORTEX_M4, name="tiny")
    with pytest.raises(DoesNotFitError, match=r"kB") as info:
        compile_model(graph, tiny, KEY, tmp_path, calib=Dataset(d.calib))
    assert "needs 3.7 kB SRAM" in str(info.value) and "device has 3.0 kB" in str(info.value)
    assert not any(tmp_path.iterdir())  # failed before writing anything


def test_model_too_big_for_flash_names_the_numbers(tmp_path: Path) -> None:
    d = digits()
    graph = import_torch(d.model, (1, 1, SIZE, SIZE))
    # Parameters fit one 10.5 kB slot, the code around them does not: the Flash account says
    # so before anything is built (params + runtime code + generated code).
    small = custom_target(256 * 1024, 24 * 1024, Cpu.CORTEX_M4, name="small")
    # It names the smallest need (some kinds of layer on the generic kernels), and the
    # specialized kernels' beside it.
    with pytest.raises(DoesNotFitError, match=r"needs 1\d\.\d kB of Flash \(\d+ bytes: params "
                       r"2\.8 kB \+ runtime code .*; with the least code, \d+ bytes "
                       r"with the specialized ones\), one ab OTA slot of small holds 10\.5 kB"):
        compile_model(graph, small, KEY, tmp_path, calib=Dataset(d.calib))
    assert not (tmp_path / "build").exists()


def test_a_model_that_fits_its_slot_only_with_the_generic_kernels_ships_with_them(
        tmp_path: Path) -> None:
    d = digits()
    graph = import_torch(d.model, (1, 1, SIZE, SIZE))
    plan = plan_patches(graph, 1, None)
    # Which kinds of layer run on the generic kernels: the compiler tries these in order.
    steps = {g: flash_account(graph, Cpu.CORTEX_M4, plan, generic=g).total_bytes
             for g in generic_steps()}
    assert steps[frozenset(SPECIALIZED_KINDS)] < steps[frozenset()]
    snug = next(t for t in (custom_target(256 * 1024, kib * 1024, Cpu.CORTEX_M4, name="snug")
                            for kib in range(16, 256))
                if min(steps.values()) <= t.slot_bytes(OtaLayout.AB) < steps[frozenset()])
    chosen = next(g for g in generic_steps() if steps[g] <= snug.slot_bytes(OtaLayout.AB))
    stages: list[str] = []
    result = compile_model(graph, snug, KEY, tmp_path, calib=Dataset(d.calib),
                           options=CompileOptions(patches=1, onnx_check=False),
                           progress=lambda stage, msg: stages.append(msg))
    report = result.report
    assert report["generic_kernels"] == sorted(chosen) != [] and report["bit_exact"]
    assert any("built with the generic kernels" in w for w in report["warnings"])
    assert any("generic kernels" in m for m in stages)
    model_c = (tmp_path / "model" / "model.c").read_text()
    generic_calls = {"conv": "tf_conv2d_s8(", "dw": "tf_depthwise_conv2d_s8(",
                     "pw": "tf_conv2d_1x1_s8("}
    assert all(generic_calls[k] in model_c for k in chosen)
    measured, predicted = report["measured"], report["predicted"]
    assert predicted["flash_bytes"] == steps[chosen]
    assert measured["flash_bytes"] <= predicted["flash_bytes"] <= 1.02 * measured["flash_bytes"]
    assert measured["flash_bytes"] <= snug.slot_bytes(OtaLayout.AB)
    # The SRAM account is the generic kernels' (their scratch), and what QEMU measured fits it.
    assert report["sram_check"]["measured_bytes"] <= report["sram_check"]["predicted_bytes"]


def test_tampered_image_is_rejected_and_wrong_vectors_are_caught(tmp_path: Path) -> None:
    result = _compile(tmp_path, "stm32f746", 1)
    for offset in (3, len(result.image) // 2, len(result.image) - 1):
        tampered = bytearray(result.image)
        tampered[offset] ^= 0x40
        with pytest.raises(ImageError, match="image rejected"):
            verify_image(bytes(tampered), KEY.public_key())
    # A validly signed image whose manifest claims another output: the QEMU re-run says so.
    image = verify_image(result.image, KEY.public_key())
    first = image.manifest.test_vectors[0]
    wrong = dataclasses.replace(first, expected=(first.expected[0] ^ 1, *first.expected[1:]))
    manifest = dataclasses.replace(image.manifest,
                                   test_vectors=(wrong, *image.manifest.test_vectors[1:]))
    lying = verify_image(sign_image(manifest, image.payload, KEY), KEY.public_key())
    elf = tmp_path / "lying.elf"
    elf.write_bytes(lying.payload)
    rerun = rerun_image(lying, elf)
    assert not rerun.matches and rerun.mismatched_vectors == 1


@pytest.mark.parametrize("scheme", [False, True], ids=["no-overlay", "overlay"])
def test_unsigned_build_brings_its_host_library_checked_bit_exact(tmp_path: Path,
                                                                  scheme: bool) -> None:
    """The campaigns build job's class build (build_unsigned(host=True)) on a core with no
    QEMU board: the MCU ELF, never run, and the same C as a host library whose manifest is
    host-<machine> and whose outputs on the test vectors equal the reference's."""
    import platform

    from firmware.pipeline import build_unsigned
    from firmware.toolchain.host_run import HostModel
    from tests.device_agent.images import SCHEME
    from tests.firmware.training.fixture_model import quantized

    q = quantized()
    built = build_unsigned(q.graph, get_target("rp2040"), tmp_path,
                           options=CompileOptions(onnx_check=False, test_vectors=2),
                           sparse_update=SCHEME.to_dict() if scheme else None, host=True)
    assert not built.emulated and built.host_reason is None
    manifest, payload = built.host_manifest, built.host_payload
    assert manifest is not None and payload is not None
    assert manifest.target.name == f"host-{platform.machine()}"
    assert manifest.test_vectors == built.manifest.test_vectors
    assert (manifest.overlay is not None) is scheme
    library = tmp_path / "copy.so"
    library.write_bytes(payload)
    c, h, w = manifest.input.shape
    inputs = np.stack([np.frombuffer(v.input_q, np.int8).reshape(h, w, c)
                       for v in manifest.test_vectors])
    got = HostModel(library).run(inputs).astype(np.int64)
    assert got.tolist() == [list(v.expected) for v in manifest.test_vectors]
    assert built.report["host"] == {"target": manifest.target.name, "bit_exact": True,
                                    "payload_bytes": len(payload)}
