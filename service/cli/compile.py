"""`tinyfleet compile` (model -> signed firmware image) and `tinyfleet verify` (image -> QEMU)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import numpy as np

from firmware.errors import FirmwareError
from firmware.plan.memory import MemoryModel
from firmware.targets import OtaLayout
from service.cli.options import (
    kb,
    load_graph,
    parse_patches,
    resolve_target,
    target_options,
)
from service.cli.search import sram_parts
from service.cli.ui import progress_bar, stderr_is_terminal

KEY_FILE = "signing-key.pem"
PUBKEY_FILE = "signing-key.pub.pem"


def load_dataset(path: Path, x_key: str, y_key: str) -> Any:
    """A pipeline Dataset from an .npz: float (N, C, H, W) under x_key, labels under y_key."""
    from firmware.pipeline import Dataset

    with np.load(path) as data:
        if x_key not in data:
            return None
        x = np.asarray(data[x_key], dtype=np.float32)
        y = np.asarray(data[y_key], dtype=np.int64) if y_key in data else None
    if x.ndim != 4:
        raise click.BadParameter(f"{path}: {x_key} has shape {x.shape}, expected (N, C, H, W)")
    if y is not None and y.shape != (len(x),):
        raise click.BadParameter(f"{path}: {y_key} has shape {y.shape}, expected ({len(x)},)")
    return Dataset(x, y)


def _signing_key(key_path: Path | None, out: Path, notes: list[str]) -> Any:
    from firmware.image import generate_signing_key, load_private_key

    if key_path is not None:
        return load_private_key(key_path.read_bytes())
    notes.append(f"no --key given: signed with a new key written to {out / KEY_FILE}")
    return generate_signing_key()


def _write_key(key: Any, out: Path) -> None:
    from firmware.image import private_key_pem, public_key_pem

    path = out / KEY_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_key_pem(key))
    (out / PUBKEY_FILE).write_bytes(public_key_pem(key.public_key()))


@contextmanager
def _stage_progress(total: int) -> Iterator[Any]:
    """A progress bar over the compile stages on a terminal; one line per stage otherwise."""
    from firmware.pipeline import Stage

    order = list(Stage)
    bar = stderr_is_terminal()
    with progress_bar("compiling", total) as update:
        def show(stage: Stage, message: str) -> None:
            n = order.index(stage) + 1
            if bar:
                update(n - 1, label=f"[{n}/{total}] {stage.value}: {message}")
            else:
                click.echo(f"[{n}/{total}] {stage.value:<8} {message}", err=True)

        yield show
        update(total, label="compiled")


@click.command("compile")
@click.argument("model", required=False, type=click.Path(exists=True))
@click.option("--builtin", help="a built-in network instead of MODEL (random weights)")
@click.option("--width", default=1.0, show_default=True, help="width multiplier (--builtin)")
@click.option("--resolution", type=int, default=None,
              help="input size (--builtin; default: the network's own, 224 for MobileNetV2)")
@target_options
@click.option("--calib", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=".npz with x (N,C,H,W float32), optional y labels, x_test / y_test")
@click.option("--patches", default="auto", callback=parse_patches, show_default=True,
              help="auto, 1 (layer-based) or a patch count P")
@click.option("--split-after", help="last layer of the patch stage (default: planner's)")
@click.option("--memory-model", type=click.Choice([m.value for m in MemoryModel]),
              default="inplace", show_default=True)
@click.option("--ota-layout", type=click.Choice([o.value for o in OtaLayout]), default="ab",
              show_default=True, help="Flash slot the image must fit")
@click.option("--key", "key_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Ed25519 private key (PEM) to sign with")
@click.option("--test-vectors", default=4, show_default=True,
              help="inputs run in QEMU and embedded in the manifest")
@click.option("--no-dsp", is_flag=True, help="plain C kernels even where SMLAD exists")
@click.option("--model-id", help="model id in the manifest (default: the graph's name)")
@click.option("--model-version", default="1", show_default=True)
@click.option("-o", "--out", "out_dir", required=True,
              type=click.Path(file_okay=False, path_type=Path), help="output directory")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
def compile_cmd(model: str | None, builtin: str | None, width: float, resolution: int | None,
                mcu: str | None, sram: int | None, flash: int | None, cpu: str | None,
                calib: Path | None, patches: int | None, split_after: str | None,
                memory_model: str, ota_layout: str, key_path: Path | None, test_vectors: int,
                no_dsp: bool, model_id: str | None, model_version: str, out_dir: Path,
                as_json: bool) -> None:
    """Compile MODEL.onnx (or a fine-tuned model version directory) to a signed firmware
    image that fits one MCU, checked in QEMU."""
    from firmware.pipeline import CompileOptions, Stage, compile_model

    quantized = None
    try:
        target = resolve_target(mcu, sram, flash, cpu)
        if model is not None and Path(model).is_dir():
            from firmware.personalize import load_model
            from firmware.training.model_version import read_version

            if calib is not None:
                raise click.BadParameter("a fine-tuned version is already int8: no --calib",
                                         param_hint="--calib")
            quantized, _ = load_model(Path(model))
            graph = quantized.graph
            if model_version == "1":  # the default: name the version by its id
                model_version = read_version(Path(model)).id
        else:
            graph = load_graph(model, builtin, width,
                               None if resolution is None else (resolution, resolution))
        calib_set = test_set = None
        if calib is not None:
            calib_set = load_dataset(calib, "x", "y")
            test_set = load_dataset(calib, "x_test", "y_test")
            if calib_set is None:
                raise click.BadParameter(f"{calib}: no array named x")
        notes: list[str] = []
        key = _signing_key(key_path, out_dir, notes)
        options = CompileOptions(
            patches=patches, split_after=split_after, memory_model=MemoryModel(memory_model),
            layout=OtaLayout(ota_layout), dsp=not no_dsp, test_vectors=test_vectors,
            model_id=model_id or (Path(model).stem if model else graph.name),
            model_version=model_version)
        with tempfile.TemporaryDirectory(prefix="tf-compile-") as tmp, \
                _stage_progress(len(Stage)) as show:
            result = compile_model(graph, target, key, Path(tmp), calib_set, test_set, options,
                                   progress=show, quantized=quantized)
            # Only a finished, signed result reaches the output directory.
            out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copytree(Path(tmp) / "model", out_dir / "model", dirs_exist_ok=True)
            shutil.copy(result.build.elf_path, out_dir / "firmware.elf")
    except FirmwareError as exc:
        raise click.ClickException(str(exc)) from exc
    report = dict(result.report)
    report["warnings"] = [*report["warnings"], *notes]
    if key_path is None:
        _write_key(key, out_dir)
    (out_dir / "firmware.img").write_bytes(result.image)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for warning in report["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _summary(report, out_dir)


def _summary(report: dict[str, Any], out_dir: Path) -> None:
    p, m, s = report["predicted"], report["measured"], report["schedule"]
    sched = ("layer-based" if s["patches"] == 1
             else f"{s['patches']}x{s['patches']} patches up to {s['split_after']}")
    click.echo(f"{report['model']['id']} -> {report['target']['name']}: {sched}")
    check, b = report["sram_check"], m["sram_breakdown"]
    click.echo(f"  SRAM  predicted {kb(p['sram_bytes'])} ({sram_parts(p['sram'])})")
    click.echo(f"        linked {kb(check['linked_bytes'])}; measured {kb(m['sram_bytes'])} "
               f"(arena {kb(b['arena_used_bytes'])} + scratch {kb(b['scratch_used_bytes'])} + "
               f"static {kb(b['static_other_bytes'])} + stack {kb(b['stack_bytes'])}); "
               f"predicted {check['over_fraction']:+.1%} over measured")
    click.echo(f"  Flash predicted {kb(p['flash_bytes'])} (parameters)  measured "
               f"{kb(m['flash_bytes'])} of a {kb(m['slot_bytes'])} slot")
    click.echo(f"  bit-exact on {report['test_vectors']} inputs; {report['instructions']:,} "
               f"instructions for {report['macs']:,} MACs "
               f"({report['instructions_per_mac']:.2f}/MAC)")
    if report.get("accuracy"):
        a = report["accuracy"]
        click.echo(f"  top-1 float {a['float_top1']:.2%}  int8 {a['int8_top1']:.2%}  "
                   f"drop {a['top1_drop']:+.2%} ({a['samples']} {a['source']} samples)")
    click.echo(f"  wrote {out_dir / 'firmware.img'} ({report['image']['bytes']:,} bytes) and "
               f"{out_dir / 'report.json'}")


def _load_inputs(path: Path | None, image: Any) -> Any:
    """int8 NHWC inputs from an .npz: x_q (int8 N,H,W,C) or x (float N,C,H,W, quantized)."""
    if path is None:
        return None
    from firmware.int8.quantize import QuantParams

    with np.load(path) as data:
        if "x_q" in data:
            return np.asarray(data["x_q"], dtype=np.int8)
        if "x" not in data:
            raise click.BadParameter(f"{path}: needs x_q (int8 NHWC) or x (float NCHW)")
        x = np.asarray(data["x"], dtype=np.float32)
    q = image.manifest.input
    if x.ndim != 4 or x.shape[1:] != q.shape:
        raise click.BadParameter(f"{path}: x has shape {x.shape}, the model takes (N, "
                                 f"{', '.join(map(str, q.shape))})")
    return QuantParams(q.scale, q.zero_point).quantize(x).transpose(0, 2, 3, 1).copy()


@click.command("verify")
@click.argument("image_path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--inputs", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=".npz with more inputs: x_q (int8 N,H,W,C) or x (float N,C,H,W)")
@click.option("--pubkey", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=f"Ed25519 public key PEM (default: {PUBKEY_FILE} beside the image)")
@click.option("--timeout", "timeout_s", default=120.0, show_default=True, help="QEMU timeout, s")
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
def verify(image_path: Path, inputs: Path | None, pubkey: Path | None, timeout_s: float,
           as_json: bool) -> None:
    """Check a firmware image's signature and re-run it in QEMU on its test vectors."""
    from firmware.image import key_id, load_public_key, verify_image
    from firmware.pipeline import rerun_image

    key_file = pubkey or image_path.parent / PUBKEY_FILE
    if not key_file.exists():
        raise click.UsageError(f"no public key: pass --pubkey (looked for {key_file})")
    signature_ok = False
    try:
        public = load_public_key(key_file.read_bytes())
        image = verify_image(image_path.read_bytes(), public)
        signature_ok = True
        extra = _load_inputs(inputs, image)
        with tempfile.TemporaryDirectory(prefix="tf-verify-") as tmp:
            elf = Path(tmp) / "firmware.elf"
            elf.write_bytes(image.payload)
            rerun = rerun_image(image, elf, extra, timeout_s)
    except FirmwareError as exc:
        if as_json:
            click.echo(json.dumps({"ok": False, "signature_ok": signature_ok, "error": str(exc)}))
            sys.exit(1)
        raise click.ClickException(str(exc)) from exc
    m = image.manifest
    doc: dict[str, Any] = {
        "ok": rerun.matches, "signature_ok": True, "key_id": key_id(public),
        "model_id": m.model_id, "model_version": m.model_version, "target": m.target.name,
        "test_vectors": rerun.vectors, "mismatched_vectors": rerun.mismatched_vectors,
        "measured_sram_bytes": rerun.emulation.peak_ram_bytes,
        "instructions": rerun.emulation.instructions_per_image,
        "outputs": rerun.outputs[rerun.vectors:].tolist() if extra is not None else [],
    }
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(f"signature OK (key {doc['key_id']}); {m.model_id} v{m.model_version} for "
                   f"{m.target.name}")
        click.echo(f"QEMU: {rerun.vectors - rerun.mismatched_vectors}/{rerun.vectors} test "
                   f"vectors reproduced; peak RAM {kb(doc['measured_sram_bytes'])}; "
                   f"{doc['instructions']:,} instructions per inference")
        for row in doc["outputs"]:
            click.echo(f"  output argmax {int(np.argmax(row))}: {row}")
    if not rerun.matches:
        if not as_json:
            click.echo(f"error: {rerun.mismatched_vectors} test vectors differ from the "
                       "manifest", err=True)
        sys.exit(1)
