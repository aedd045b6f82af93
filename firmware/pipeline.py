"""The compiler pipeline: float graph -> int8 -> schedule -> C -> ELF -> QEMU -> signed image.

`compile_model(graph, target, key, work_dir, ...)` runs the stages in order, each a call into
the module that owns it:

    quantize   firmware.int8.quantize.quantize_graph (calibration data or generated inputs)
    plan       firmware.plan.account.fit_schedule: the fewest-MAC schedule whose SRAM account
               (arena + scratch + static + stack) fits the target's SRAM
    codegen    firmware.codegen: model.c / model.h / main.c for the plan's schedule
    build      firmware.toolchain.build.build_firmware (arm-none-eabi-gcc, the device's ld script
               reserving the account's stack; the image's call-graph stack bound checked)
    emulate    firmware.toolchain.emulator.run_firmware (QEMU, semihosting, measured RAM, instrs)
    check      outputs bit-exact against firmware.int8.reference on every test input
    onnx       onnxruntime cross-check of the QDQ export, per layer and end to end
               (firmware.int8.onnx_export.cross_check)
    sign       firmware.image: manifest + ELF payload + Ed25519 signature

Nothing is signed unless the QEMU outputs equal the reference's exactly. Predicted figures
come from the SRAM account before any code exists; linked ones from the linker (which must
not exceed them), measured ones from QEMU (RAM painted at reset, scanned after the run). The
report sets them side by side, total against total and part by part (`sram_check`). The
report is a JSON-ready dict (see `CompileResult.report`).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.codegen import GeneratedModel
from firmware.codegen.overlay import overlay_layout
from firmware.errors import BuildError, DoesNotFitError, EmulationError, FirmwareError
from firmware.float_exec import run_graph
from firmware.image import (
    FirmwareImage,
    ImageSchedule,
    ImageTarget,
    Manifest,
    MemoryFigures,
    OverlayRegion,
    PayloadFormat,
    TensorQuant,
    TestVector,
    key_id,
    make_manifest,
    sign_image,
)
from firmware.int8.quantize import QuantizedGraph, quantize_graph
from firmware.int8.serialize import dump_quantized
from firmware.ir import Graph
from firmware.plan.account import Fit, SramAccount, fit_schedule, sram_account
from firmware.plan.flash import FlashAccount, flash_account
from firmware.plan.kernels import NONE_GENERIC, SPECIALIZED_KINDS, generic_steps
from firmware.plan.memory import MemoryModel, MemoryReport, analyze
from firmware.plan.patch import PatchPlan
from firmware.targets import OtaLayout, TargetSpec, UnknownMcuError, custom_target, get_target
from firmware.toolchain.build import BuildResult, build_firmware, overlay_address
from firmware.toolchain.emulator import EmulationResult, board_for, run_firmware

FloatArray = npt.NDArray[np.float32]
Int8Array = npt.NDArray[np.int8]


class Stage(enum.Enum):
    """The pipeline's stages, in order (progress callbacks receive them)."""

    QUANTIZE = "quantize"
    PLAN = "plan"
    CODEGEN = "codegen"
    BUILD = "build"
    EMULATE = "emulate"
    CHECK = "check"
    ONNX = "onnx"
    SIGN = "sign"


Progress = Callable[[Stage, str], None]


@dataclass(frozen=True)
class Dataset:
    """Float samples (N, C, H, W) and, optionally, their integer labels (N,)."""

    x: FloatArray
    y: npt.NDArray[np.int64] | None = None


@dataclass(frozen=True)
class CompileOptions:
    """Knobs of one compilation. `patches` None lets the planner choose (1 = layer-based)."""

    patches: int | None = None
    split_after: str | None = None
    memory_model: MemoryModel = MemoryModel.INPLACE
    layout: OtaLayout = OtaLayout.AB
    dsp: bool = True
    test_vectors: int = 4
    generated_calibration: int = 16
    model_id: str | None = None
    model_version: str = "1"
    onnx_check: bool = True
    onnx_samples: int = 64  # inputs onnxruntime and the reference both run
    emulator_timeout_s: float = 120.0
    # A sparse-update scheme (firmware.training.scheme JSON) for on-device personalization:
    # shipped in the manifest, and its trainable layers become a weights overlay in Flash.
    sparse_update: Mapping[str, Any] | None = None


@dataclass(frozen=True, eq=False)
class CompileResult:
    """A signed image and everything measured on the way to it."""

    image: bytes
    report: Mapping[str, Any]
    qgraph: QuantizedGraph
    plan: PatchPlan
    account: SramAccount
    build: BuildResult
    emulation: EmulationResult
    test_inputs: Int8Array  # (N, H, W, C) int8, what QEMU ran
    expected: Int8Array  # (N, outputs) int8, the reference's outputs
    warnings: tuple[str, ...] = field(default_factory=tuple)
    options: CompileOptions = field(default_factory=CompileOptions)
    overlay: OverlayRegion | None = None


def _quiet(stage: Stage, message: str) -> None:
    """Progress sink that drops everything."""


def reference_outputs(qgraph: QuantizedGraph, x_q: Int8Array) -> Int8Array:
    """The int8 reference's outputs (N, -1) for an int8 NCHW batch (integer arithmetic only)."""
    from firmware.int8.reference import run_quantized

    return np.asarray(run_quantized(qgraph, x_q), dtype=np.int8).reshape(len(x_q), -1)


def plan_schedule(graph: Graph, target: TargetSpec, options: CompileOptions,
                  extra_static_bytes: int = 0, overlay_layers: Sequence[str] = ()) -> Fit:
    """The schedule whose SRAM account fits the target and whose Flash account (with the
    weights overlay of `overlay_layers`) fits its slot, with the specialized kernels or,
    when only that fits, some kinds of layer on the generic ones (`Fit.generic`);
    DoesNotFitError names the numbers."""
    fit = fit_schedule(graph, target.sram_bytes, target.cpu, options.memory_model,
                       patches=options.patches, split_after=options.split_after,
                       extra_static_bytes=extra_static_bytes)
    slot = target.slot_bytes(options.layout)
    # Kinds of layer given up to the generic kernels (firmware.plan.kernels.generic_steps:
    # slower, never more scratch, often less code): a model that fills its slot to within the
    # specialized kernels' code still ships.
    accounts = []
    for generic in generic_steps():
        needed = flash_account(graph, target.cpu, fit.plan, dsp=options.dsp,
                               overlay_layers=overlay_layers, generic=generic)
        if needed.fits(slot):
            if not generic:
                return fit
            return Fit(fit.plan, sram_account(graph, fit.plan, target.cpu,
                                              extra_static_bytes=extra_static_bytes,
                                              generic=generic), generic=generic)
        accounts.append(needed)
    least, most = min(accounts, key=lambda a: a.total_bytes), accounts[0]
    raise DoesNotFitError(
        f"{graph.name}: needs {least.total_bytes / 1024:.1f} kB of Flash "
        f"({least.total_bytes} bytes: {least.describe()}; with the least code, "
        f"{most.total_bytes} bytes with the specialized ones), one "
        f"{options.layout.value} OTA slot of {target.name} holds {slot / 1024:.1f} kB "
        f"({slot} bytes)"
    )


def _test_batch(graph: Graph, qgraph: QuantizedGraph, calib: Dataset | None,
                test: Dataset | None, count: int) -> Int8Array:
    """int8 NCHW test inputs: the first `count` test (else calibration) samples, or generated."""
    source = test if test is not None else calib
    if source is not None:
        x = source.x[:count]
    else:
        shape = graph.tensor(graph.input).shape
        x = np.random.default_rng(1).standard_normal((count, *shape)).astype(np.float32)
    return qgraph.input.quantize(x)


def _accuracy(graph: Graph, qgraph: QuantizedGraph, data: Dataset,
              source: str) -> dict[str, Any] | None:
    """Top-1 of the float graph and of the int8 reference on labelled samples."""
    if data.y is None:
        return None
    float_pred = run_graph(graph, data.x).reshape(len(data.x), -1).argmax(1)
    int8_pred = reference_outputs(qgraph, qgraph.input.quantize(data.x)).argmax(1)
    float_top1 = float(np.mean(float_pred == data.y))
    int8_top1 = float(np.mean(int8_pred == data.y))
    return {"samples": len(data.x), "source": source, "float_top1": float_top1,
            "int8_top1": int8_top1, "top1_drop": float_top1 - int8_top1,
            "argmax_agreement": float(np.mean(float_pred == int8_pred))}


def _onnx_check(qgraph: QuantizedGraph, x_q: Int8Array) -> dict[str, Any]:
    """onnxruntime on the QDQ export vs the reference: per layer (the criterion) and end to end.

    `passes` means every layer, fed the reference's own int8 input, is within 1 LSB of
    onnxruntime (TFLite's double rounding against exact rounding); the whole network's
    agreement is reported beside it (see firmware.int8.onnx_export).
    """
    from firmware.int8.onnx_export import cross_check

    return cross_check(qgraph, x_q).report()


def _schedule_dict(plan: PatchPlan) -> dict[str, Any]:
    s = plan.schedule
    return {"patches": s.patches, "split_after": s.split_after,
            "input_patch": list(s.input_patch) if s.patches > 1 else None,
            "memory_model": plan.memory_model.value, "peak_layer": plan.peak_layer,
            "mac_overhead": plan.mac_overhead}


def overlay_layers(qgraph: QuantizedGraph, options: CompileOptions) -> tuple[str, ...]:
    """The layers a weights overlay carries: the sparse-update scheme's trainable ones."""
    if options.sparse_update is None:
        return ()
    from firmware.training.scheme import SparseUpdateScheme, resolve

    scheme = SparseUpdateScheme.from_dict(options.sparse_update)
    return tuple(resolve(scheme, qgraph.graph).trainable)


def _generate(qgraph: QuantizedGraph, fit: Fit, options: CompileOptions,
              out_dir: Path) -> GeneratedModel:
    """Write model.c / model.h / main.c for the plan's schedule into `out_dir`.

    The arena and scratch the code declares are the account's (one source: firmware.plan).
    """
    from firmware.codegen import write_model

    model = write_model(qgraph, fit.plan, out_dir, memory_model=options.memory_model,
                        overlay_layers=overlay_layers(qgraph, options),
                        generic=fit.generic)
    declared = (model.arena_bytes, model.scratch_bytes)
    if declared != (fit.account.arena_bytes, fit.account.scratch_bytes):
        raise FirmwareError(f"generated code declares arena {declared[0]} B and scratch "
                            f"{declared[1]} B, the SRAM account {fit.account.arena_bytes} B and "
                            f"{fit.account.scratch_bytes} B")
    return model


_KIND_NAMES = {"conv": "dense convs", "dw": "depthwise convs", "pw": "1x1 convs"}


def _kinds(generic: frozenset[str]) -> str:
    """'dense convs and depthwise convs' (in SPECIALIZED_KINDS order)."""
    return " and ".join(_KIND_NAMES[k] for k in SPECIALIZED_KINDS if k in generic)


def _round8(n: int) -> int:
    return -(-n // 8) * 8


def linked_sram_bytes(build: BuildResult) -> int:
    """RAM the linked image claims: static data, .noinit (arena, scratch), stack reserve."""
    return (_round8(build.static_bytes) + _round8(build.sections.get(".noinit", 0))
            + build.stack_reserve_bytes)


def _check_linked(build: BuildResult, account: SramAccount) -> None:
    """BuildError if the linked image claims more RAM than the account predicted."""
    linked = linked_sram_bytes(build)
    if linked > account.total_bytes:
        raise BuildError(
            f"the linked image claims {linked} B of RAM (static {build.static_bytes} B, "
            f".noinit {build.sections.get('.noinit', 0)} B, stack {build.stack_reserve_bytes} B)"
            f", the SRAM account {account.total_bytes} B ({account.describe()}): the runtime's "
            "static data grew; refresh firmware.plan.account.RUNTIME_FOOTPRINTS "
            "(python -m bench.runtime_footprint)")


def _measured(build: BuildResult, emulation: EmulationResult) -> dict[str, Any]:
    """Measured SRAM and Flash with the named buffers that make them up."""
    return {
        "sram_bytes": emulation.peak_ram_bytes,
        "flash_bytes": build.flash_bytes,
        "sram_breakdown": {
            "arena_used_bytes": emulation.arena_used_bytes,
            "arena_bytes": emulation.arena_bytes,
            "scratch_used_bytes": emulation.scratch_used_bytes,
            "scratch_bytes": emulation.scratch_bytes,
            "stack_bytes": emulation.stack_bytes,
            "static_other_bytes": emulation.static_other_bytes,
        },
        "sections": dict(build.sections),
        "slot_bytes": build.slot_bytes,
    }


def _predicted(plan: PatchPlan, account: SramAccount, flash: FlashAccount) -> dict[str, Any]:
    """The SRAM account and the Flash account (params + runtime and generated code), by part."""
    return {"sram_bytes": account.total_bytes, "sram": account.to_dict(),
            "flash_bytes": flash.total_bytes, "flash": flash.to_dict(),
            "activation_peak_bytes": plan.peak_bytes,
            "layer_based_sram_bytes": plan.layer_peak_bytes}


def _linked(build: BuildResult) -> dict[str, Any]:
    """What the linker placed in RAM, and the image's call-graph stack bound."""
    bound = build.stack_bound
    return {"sram_bytes": linked_sram_bytes(build), "static_bytes": build.static_bytes,
            "noinit_bytes": build.sections.get(".noinit", 0),
            "stack_reserve_bytes": build.stack_reserve_bytes,
            "stack_bound_bytes": None if bound is None else bound.total_bytes,
            "stack_chain": None if bound is None else bound.describe()}


def flash_check(account: FlashAccount, build: BuildResult) -> dict[str, Any]:
    """The Flash account's image part against the linked image (arm-none-eabi-size: vectors,
    code, constants, .data initialisers): meant to be >= it, within 2 %. An overlay region
    is reserved beside the image, not in it."""
    linked = build.flash_bytes
    return {"predicted_bytes": account.image_bytes, "linked_bytes": linked,
            "over_bytes": account.image_bytes - linked,
            "over_fraction": (account.image_bytes - linked) / max(linked, 1),
            "overlay_bytes": account.overlay_bytes, "slot_bytes": build.slot_bytes}


# DESIGN's aim for predicted against measured SRAM: within 2 % or 512 B, whichever is larger.
SRAM_AIM_FRACTION = 0.02
SRAM_AIM_BYTES = 512


def sram_check(account: SramAccount, build: BuildResult,
               emulation: EmulationResult) -> dict[str, Any]:
    """Predicted, linked and measured SRAM, total against total and buffer by buffer."""
    bound = build.stack_bound
    parts = [
        ("arena", account.arena_bytes, emulation.arena_bytes, emulation.arena_used_bytes),
        ("scratch", account.scratch_bytes, emulation.scratch_bytes,
         emulation.scratch_used_bytes),
        ("static", account.static_bytes, build.static_bytes, emulation.static_other_bytes),
        ("stack", account.stack_bytes, None if bound is None else bound.total_bytes,
         emulation.stack_bytes),
        ("training", account.training_bytes, None, None),
    ]
    predicted, measured = account.total_bytes, emulation.peak_ram_bytes
    over = predicted - measured
    return {
        "parts": [{"part": name, "predicted_bytes": p, "linked_bytes": linked,
                   "measured_bytes": m} for name, p, linked, m in parts],
        "predicted_bytes": predicted, "linked_bytes": linked_sram_bytes(build),
        "measured_bytes": measured, "over_bytes": over,
        "over_fraction": over / max(measured, 1),
        "covers_measured": over >= 0,
        "within_aim": 0 <= over <= max(SRAM_AIM_FRACTION * measured, SRAM_AIM_BYTES),
    }


def _check_bit_exact(got: Int8Array, expected: Int8Array) -> None:
    """EmulationError naming the first differing input and output unless equal."""
    if got.shape != expected.shape:
        raise EmulationError(f"QEMU returned outputs of shape {got.shape}, the reference "
                             f"{expected.shape}")
    bad = np.argwhere(got != expected)
    if len(bad):
        n, j = (int(v) for v in bad[0])
        inputs = len(np.unique(bad[:, 0]))
        raise EmulationError(
            f"QEMU outputs differ from the int8 reference on {inputs} of {len(got)} inputs "
            f"({len(bad)} values); first: input {n}, output {j}: {int(got[n, j])} vs "
            f"{int(expected[n, j])}"
        )


@dataclass(frozen=True, eq=False)
class _Built:
    """What the stages up to the bit-exact check produced."""

    graph: Graph
    target: TargetSpec
    options: CompileOptions
    qgraph: QuantizedGraph
    plan: PatchPlan
    account: SramAccount
    memory: MemoryReport
    flash: FlashAccount
    build: BuildResult
    emulation: EmulationResult | None  # None: built for a core QEMU cannot run
    inputs_hwc: Int8Array
    expected: Int8Array
    overlay: OverlayRegion | None = None
    generic: frozenset[str] = NONE_GENERIC  # kinds on the generic kernels (plan_schedule)


def _build_and_check(graph: Graph, target: TargetSpec, opts: CompileOptions, work_dir: Path,
                     calib: Dataset | None, test: Dataset | None, say: Progress,
                     quantized: QuantizedGraph | None = None, emulate: bool = True) -> _Built:
    """Quantize, plan, generate, build, run in QEMU; EmulationError unless bit-exact.

    `emulate` False builds without running (a core with no QEMU board): the caller marks
    the result "not emulated", it is never passed as checked.
    """
    # No image is signed unchecked: refuse a core QEMU cannot run before any work is done.
    if emulate:
        board_for(target)
    if quantized is not None:
        say(Stage.QUANTIZE, "already int8 (a fine-tuned model version)")
        qgraph = quantized
    else:
        say(Stage.QUANTIZE, "post-training int8 quantization")
        qgraph = quantize_graph(graph, None if calib is None else calib.x,
                                generated_count=opts.generated_calibration)

    say(Stage.PLAN, f"schedule whose SRAM account fits {target.sram_bytes / 1024:.1f} kB")
    layers = overlay_layers(qgraph, opts)
    fit = plan_schedule(graph, target, opts,
                        overlay_layout(qgraph, layers).ram_bytes if layers else 0, layers)
    plan = fit.plan

    p = plan.schedule.patches
    say(Stage.CODEGEN, (f"C for {p}x{p} patches" if p > 1 else "C for layer-based inference")
        + ("" if not fit.generic else f", generic kernels for {_kinds(fit.generic)} (the "
           "specialized ones' code does not fit the slot)"))
    model_dir = work_dir / "model"
    generated = _generate(qgraph, fit, opts, model_dir)
    layout = generated.overlay
    region_bytes = 0 if layout is None else layout.region_bytes

    say(Stage.BUILD, f"arm-none-eabi-gcc for {target.name} ({target.cpu.value})")
    build = build_firmware(model_dir, target, opts.layout, out_dir=work_dir / "build",
                           dsp=opts.dsp, stack_bytes=fit.account.stack_bytes,
                           overlay_bytes=region_bytes)
    overlay = None if layout is None else OverlayRegion(
        overlay_address(target, opts.layout, region_bytes), region_bytes, layout.body_bytes,
        layout.layout_id, layout.layers)
    _check_linked(build, fit.account)

    x_q = _test_batch(graph, qgraph, calib, test, opts.test_vectors)
    inputs_hwc = np.ascontiguousarray(x_q.transpose(0, 2, 3, 1))
    expected = reference_outputs(qgraph, x_q)
    emulation = None
    if emulate:
        say(Stage.EMULATE, f"QEMU {target.qemu_board} on {len(x_q)} inputs")
        emulation = run_firmware(build.elf_path, target, inputs_hwc,
                                 static_ram_bytes=build.ram_bytes,
                                 timeout_s=opts.emulator_timeout_s)
        say(Stage.CHECK, "outputs against the int8 reference")
        _check_bit_exact(emulation.outputs, expected)
    return _Built(graph=graph, target=target, options=opts, qgraph=qgraph, plan=plan,
                  account=fit.account, memory=analyze(graph, opts.memory_model),
                  flash=flash_account(graph, target.cpu, plan, dsp=opts.dsp,
                                      overlay_layers=layers, generic=fit.generic),
                  build=build, emulation=emulation,
                  inputs_hwc=inputs_hwc, expected=expected, overlay=overlay,
                  generic=fit.generic)


def _manifest(b: _Built, payload: bytes) -> Manifest:
    """The image manifest of a build (checked in QEMU unless `b.emulation` is None); an image
    built with a sparse-update scheme carries it, its overlay region and its int8 graph."""
    graph, target, opts, qgraph, s = b.graph, b.target, b.options, b.qgraph, b.plan.schedule
    return make_manifest(
        model_id=opts.model_id or graph.name, model_version=opts.model_version,
        target=ImageTarget(target.name, target.cpu.value, target.sram_bytes,
                           target.flash_bytes, target.slot_bytes(opts.layout)),
        schedule=ImageSchedule(s.patches, s.split_after,
                               s.input_patch if s.patches > 1 else None,
                               opts.memory_model.value),
        predicted=MemoryFigures(b.account.total_bytes, b.flash.total_bytes),
        measured=(None if b.emulation is None else
                  MemoryFigures(b.emulation.peak_ram_bytes, b.build.flash_bytes)),
        input=TensorQuant(qgraph.input.scale, qgraph.input.zero_point,
                          graph.tensor(graph.input).shape),
        output=TensorQuant(qgraph.output.scale, qgraph.output.zero_point,
                           graph.tensor(graph.output).shape),
        test_vectors=tuple(TestVector(b.inputs_hwc[i].tobytes(),
                                      tuple(int(v) for v in b.expected[i]))
                           for i in range(len(b.inputs_hwc))),
        payload=payload, payload_format=PayloadFormat.ELF,
        sparse_update=opts.sparse_update, overlay=b.overlay,
        int8_model=None if opts.sparse_update is None else dump_quantized(qgraph),
        emulated=b.emulation is not None,
    )


def _report(b: _Built, image: bytes, payload: bytes, key: Ed25519PrivateKey,
            calib: Dataset | None, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-ready report of a signed build (`extra`: onnxruntime, accuracy, warnings)."""
    graph, target, opts, qgraph = b.graph, b.target, b.options, b.qgraph
    assert b.emulation is not None, "compile_model always emulates"
    per_image = b.emulation.instructions_per_image
    return {
        "model": {"id": opts.model_id or graph.name, "version": opts.model_version,
                  "graph": graph.name, "input_shape": list(graph.tensor(graph.input).shape)},
        "target": {"name": target.name, "cpu": target.cpu.value,
                   "sram_bytes": target.sram_bytes, "flash_bytes": target.flash_bytes,
                   "slot_bytes": target.slot_bytes(opts.layout), "ota_layout": opts.layout.value},
        "calibration": {"source": qgraph.calibration,
                        "samples": opts.generated_calibration if calib is None else len(calib.x)},
        "schedule": _schedule_dict(b.plan),
        "predicted": _predicted(b.plan, b.account, b.flash),
        "linked": _linked(b.build),
        "measured": _measured(b.build, b.emulation),
        "sram_check": sram_check(b.account, b.build, b.emulation),
        "flash_check": flash_check(b.flash, b.build),
        "bit_exact": True,
        "test_vectors": len(b.inputs_hwc),
        "macs": b.plan.macs,
        "instructions": per_image,
        "instructions_per_mac": per_image / max(b.plan.macs, 1),
        "dsp": b.build.dsp,
        "generic_kernels": sorted(b.generic),
        "quantization": {"input": {"scale": qgraph.input.scale,
                                   "zero_point": qgraph.input.zero_point},
                         "output": {"scale": qgraph.output.scale,
                                    "zero_point": qgraph.output.zero_point}},
        "image": {"bytes": len(image), "sha256": hashlib.sha256(image).hexdigest(),
                  "payload_bytes": len(payload), "key_id": key_id(key.public_key())},
        **extra,
    }


def compile_model(graph: Graph, target: TargetSpec, key: Ed25519PrivateKey, work_dir: Path,
                  calib: Dataset | None = None, test: Dataset | None = None,
                  options: CompileOptions | None = None,
                  progress: Progress | None = None,
                  quantized: QuantizedGraph | None = None) -> CompileResult:
    """Quantize, plan, generate, build, emulate, check bit-exactness and sign (module doc).

    `quantized` skips quantization: the int8 graph of a fine-tuned model version
    (firmware.training.model_version), whose float `graph` it carries.
    """
    opts = options or CompileOptions()
    say = progress or _quiet
    built = _build_and_check(graph, target, opts, work_dir, calib, test, say, quantized)
    qgraph = built.qgraph
    assert built.emulation is not None

    onnx_report = None
    if opts.onnx_check:
        check_q = _test_batch(graph, qgraph, calib, test, opts.onnx_samples)
        say(Stage.ONNX, f"onnxruntime on the QDQ export, {len(check_q)} inputs")
        onnx_report = _onnx_check(qgraph, check_q)
    accuracy = None
    if test is not None:
        accuracy = _accuracy(graph, qgraph, test, "test")
    elif calib is not None:
        accuracy = _accuracy(graph, qgraph, calib, "calibration")

    say(Stage.SIGN, f"Ed25519 key {key_id(key.public_key())}")
    payload = built.build.elf_path.read_bytes()
    image = sign_image(_manifest(built, payload), payload, key)
    warnings = tuple(qgraph.notes) + (() if not built.generic else (
        f"{_kinds(built.generic)} built with the generic kernels: with the specialized ones "
        f"the image would not fit the {opts.layout.value} OTA slot of {target.name} (slower, "
        "same results)",))
    report = _report(built, image, payload, key, calib, {
        "onnxruntime": onnx_report, "accuracy": accuracy, "warnings": list(warnings)})
    return CompileResult(image=image, report=MappingProxyType(report), qgraph=qgraph,
                         plan=built.plan, account=built.account, build=built.build,
                         emulation=built.emulation,
                         test_inputs=built.inputs_hwc, expected=built.expected,
                         warnings=warnings, options=opts, overlay=built.overlay)


@dataclass(frozen=True)
class UnsignedBuild:
    """A built image before signing: one per (model version, hardware class), signed once
    per fleet (`sign_image(manifest, payload, fleet_key)`)."""

    manifest: Manifest
    payload: bytes
    emulated: bool  # False: a core with no QEMU board; built, never run ("not emulated")
    report: Mapping[str, Any]
    # The same C as a host shared library (manifest target host-<arch>), checked bit-exact
    # on the test vectors: for devices whose agent runs the `host` backend. None: not asked
    # for, or it failed (`host_reason` says why).
    host_manifest: Manifest | None = None
    host_payload: bytes | None = None
    host_reason: str | None = None


def build_unsigned(graph: Graph, target: TargetSpec, work_dir: Path,
                   calib: Dataset | None = None, options: CompileOptions | None = None,
                   progress: Progress | None = None,
                   sparse_update: Mapping[str, Any] | None = None,
                   host: bool = False) -> UnsignedBuild:
    """Quantize, plan, generate, build and (where QEMU has a board for the core) run and
    check bit-exactness; the manifest carries `sparse_update` and whether it was emulated.

    `host`: also the same C as a host shared library, checked bit-exact against the int8
    reference on the same test vectors (the `host` backend's image, `host_image`'s
    manifest); a failure there leaves the MCU build and names its reason."""
    opts = options or CompileOptions()
    if sparse_update is not None:  # the overlay region and the int8 graph come with it
        opts = replace(opts, sparse_update=dict(sparse_update))
    emulate = target.qemu_board is not None
    built = _build_and_check(graph, target, opts, work_dir, calib, None, progress or _quiet,
                             emulate=emulate)
    payload = built.build.elf_path.read_bytes()
    manifest = _manifest(built, payload)
    report: dict[str, Any] = {
        "target": target.name, "cpu": target.cpu.value, "emulated": emulate,
        "schedule": _schedule_dict(built.plan),
        "predicted": _predicted(built.plan, built.account, built.flash),
        "linked": _linked(built.build), "payload_bytes": len(payload),
        "generic_kernels": sorted(built.generic),
        "measured": None if built.emulation is None else _measured(built.build,
                                                                   built.emulation),
    }
    host_manifest = host_payload = host_reason = None
    if host:
        try:
            host_manifest, host_payload = _host_build(
                built.qgraph, built.plan, opts, built.inputs_hwc, built.expected, manifest,
                work_dir / "host")
            report["host"] = {"target": host_manifest.target.name, "bit_exact": True,
                              "payload_bytes": len(host_payload)}
        except FirmwareError as exc:
            host_reason = f"the host library build failed: {exc}"
            report["host"] = {"error": host_reason}
    return UnsignedBuild(manifest, payload, emulate, MappingProxyType(report), host_manifest,
                         host_payload, host_reason)


@dataclass(frozen=True, eq=False)
class RerunResult:
    """An image's firmware re-run in QEMU on its own test vectors (and optional inputs)."""

    vectors: int
    mismatched_vectors: int  # test vectors whose outputs differ from the manifest's
    outputs: Int8Array  # outputs for the vectors, then for the extra inputs
    emulation: EmulationResult

    @property
    def matches(self) -> bool:
        """True when every test vector reproduced its expected output exactly."""
        return self.mismatched_vectors == 0


def image_target(image: FirmwareImage) -> TargetSpec:
    """The TargetSpec an image was built for: the catalog entry, or one from its sizes."""
    t = image.manifest.target
    try:
        spec = get_target(t.name)
    except UnknownMcuError:
        return custom_target(t.sram_bytes, t.flash_bytes, t.cpu, name=t.name)
    if (spec.cpu.value, spec.sram_bytes, spec.flash_bytes) != (t.cpu, t.sram_bytes,
                                                               t.flash_bytes):
        return custom_target(t.sram_bytes, t.flash_bytes, t.cpu, name=t.name)
    return spec


def rerun_image(image: FirmwareImage, elf_path: Path, inputs: Int8Array | None = None,
                timeout_s: float = 120.0) -> RerunResult:
    """Run the image's ELF (already written to `elf_path`) on its vectors plus `inputs`.

    `inputs` are int8 (N, H, W, C); the vectors' outputs are compared with the manifest.
    """
    m = image.manifest
    c, h, w = m.input.shape
    vectors = [np.frombuffer(v.input_q, dtype=np.int8).reshape(h, w, c) for v in m.test_vectors]
    batch = np.stack(vectors) if vectors else np.zeros((0, h, w, c), np.int8)
    if inputs is not None:
        extra = np.asarray(inputs)
        if extra.dtype != np.int8 or extra.shape[1:] != (h, w, c):
            raise EmulationError(f"inputs must be int8 (N, {h}, {w}, {c}) as the manifest says, "
                                 f"got {extra.dtype} {extra.shape}")
        batch = np.concatenate([batch, extra])
    if len(batch) == 0:
        raise EmulationError("the image has no test vectors and no inputs were given")
    target = image_target(image)
    emulation = run_firmware(elf_path, target, np.ascontiguousarray(batch),
                             timeout_s=timeout_s)
    n = len(vectors)
    expected = np.array([v.expected for v in m.test_vectors], dtype=np.int64).reshape(n, -1)
    got = emulation.outputs[:n].astype(np.int64)
    mismatched = (int(np.sum(np.any(got != expected, axis=1))) if got.shape == expected.shape
                  else n)
    return RerunResult(vectors=n, mismatched_vectors=mismatched, outputs=emulation.outputs,
                       emulation=emulation)


def host_image(result: CompileResult, key: Ed25519PrivateKey, work_dir: Path,
               machine: str | None = None) -> bytes:
    """The signed host shared-library image of a compiled artifact (manifest target
    `host-<machine>`, e.g. host-x86_64), for the device agent's `host` backend.

    The same generated C as `result`'s firmware (same schedule, same weights overlay layout),
    built with the host gcc (firmware.toolchain.build.build_host_model), run on the same test
    vectors and signed only if its outputs equal the int8 reference's bit for bit. The
    manifest keeps the MCU class's memory figures (what the device has), its test vectors and
    its sparse-update scheme; the payload is the .so. The campaigns build job makes the same
    image unsigned beside each class build (`build_unsigned(..., host=True)`).
    """
    manifest, payload = _host_build(result.qgraph, result.plan, result.options,
                                    result.test_inputs, result.expected,
                                    parse_manifest_of(result.image), work_dir, machine)
    return sign_image(manifest, payload, key)


def _host_build(qgraph: QuantizedGraph, plan: PatchPlan, opts: CompileOptions,
                inputs_hwc: Int8Array, expected: Int8Array, manifest: Manifest,
                work_dir: Path, machine: str | None = None) -> tuple[Manifest, bytes]:
    """The host library of an MCU build and its manifest (host_image's docstring), unsigned;
    EmulationError unless its outputs equal `expected` bit for bit."""
    import platform

    from firmware.codegen import write_model
    from firmware.toolchain.build import build_host_model
    from firmware.toolchain.host_run import HostModel

    arch = machine or platform.machine()
    src = work_dir / "host-model"
    write_model(qgraph, plan, src, memory_model=opts.memory_model,
                overlay_layers=overlay_layers(qgraph, opts))
    library = build_host_model(src, work_dir / "host-build")
    got = HostModel(library).run(inputs_hwc)
    _check_bit_exact(got, expected)
    payload = library.read_bytes()
    mcu = manifest.target
    host_manifest = make_manifest(
        model_id=manifest.model_id, model_version=manifest.model_version,
        target=ImageTarget(f"host-{arch}", arch, mcu.sram_bytes, mcu.flash_bytes,
                           mcu.slot_bytes),
        schedule=manifest.schedule, predicted=manifest.predicted, measured=manifest.measured,
        input=manifest.input, output=manifest.output, test_vectors=manifest.test_vectors,
        payload=payload, payload_format=PayloadFormat.ELF,
        sparse_update=manifest.sparse_update, overlay=manifest.overlay,
        int8_model=manifest.int8_model)
    return host_manifest, payload


def parse_manifest_of(image: bytes) -> Manifest:
    """The manifest of signed image bytes (structure checked; the signature is not)."""
    from firmware.image import parse_image

    return parse_image(image).manifest
