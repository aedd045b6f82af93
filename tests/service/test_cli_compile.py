"""`tinyfleet compile` and `tinyfleet verify` on a trained digits model exported to ONNX."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from service.cli import main
from tests.firmware.digits_model import SIZE, digits

pytestmark = [pytest.mark.toolchain,
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """digits.onnx and calib.npz (x, y and a labelled test split)."""
    d = digits()
    root = tmp_path_factory.mktemp("model")
    buffer = io.BytesIO()
    torch.onnx.export(d.model, (torch.zeros(1, 1, SIZE, SIZE),), buffer, dynamo=False)
    (root / "digits.onnx").write_bytes(buffer.getvalue())
    np.savez(root / "calib.npz", x=d.calib,
             x_test=d.x_test, y_test=d.y_test)
    return root / "digits.onnx", root / "calib.npz"


def test_compile_then_verify(model_files: tuple[Path, Path], tmp_path: Path) -> None:
    onnx_path, calib = model_files
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(main, ["compile", str(onnx_path), "--mcu", "stm32f746", "--calib",
                                  str(calib), "--patches", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "[1/8] quantize" in result.output and "[8/8] sign" in result.output
    report = json.loads((out / "report.json").read_text())
    for key in ("predicted", "measured"):
        assert set(report[key]) >= {"sram_bytes", "flash_bytes"}
    check = report["sram_check"]  # predicted >= linked >= measured, within the aim
    assert report["predicted"]["sram_bytes"] == check["predicted_bytes"] == \
        report["predicted"]["sram"]["total_bytes"] >= check["linked_bytes"]
    assert check["covers_measured"] and check["within_aim"]
    assert [row["part"] for row in check["parts"]] == ["arena", "scratch", "static", "stack",
                                                        "training"]
    assert "SRAM  predicted" in result.output and "linked" in result.output
    assert report["bit_exact"] is True
    assert report["schedule"]["patches"] == 2
    assert report["instructions"] > 0 and report["macs"] > 0
    assert report["accuracy"]["source"] == "test" and report["accuracy"]["top1_drop"] <= 0.02
    assert report["calibration"]["source"] == "data"
    assert (out / "signing-key.pem").stat().st_mode & 0o077 == 0

    verified = runner.invoke(main, ["verify", str(out / "firmware.img"), "--json"])
    assert verified.exit_code == 0, verified.output
    doc = json.loads(verified.output)
    assert doc["ok"] and doc["signature_ok"] and doc["mismatched_vectors"] == 0

    data = bytearray((out / "firmware.img").read_bytes())
    data[len(data) // 2] ^= 1
    (out / "firmware.img").write_bytes(bytes(data))
    tampered = runner.invoke(main, ["verify", str(out / "firmware.img")])
    assert tampered.exit_code == 1
    assert "signature does not verify" in tampered.output


def test_compile_without_calib_warns(model_files: tuple[Path, Path], tmp_path: Path) -> None:
    onnx_path, _ = model_files
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compile", str(onnx_path), "--mcu", "stm32f412",
                                       "--patches", "1", "--json", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "warning: calibrated on 16 generated inputs" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["calibration"]["source"] == "generated"
    assert any("generated" in w for w in report["warnings"])
    assert report["accuracy"] is None


def test_compile_too_big_fails_cleanly(model_files: tuple[Path, Path], tmp_path: Path) -> None:
    onnx_path, calib = model_files
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["compile", str(onnx_path), "--sram", "3KiB", "--flash",
                                       "1MiB", "--cpu", "cortex-m4", "--calib", str(calib),
                                       "-o", str(out)])
    assert result.exit_code == 1
    assert "needs 3.7 kB SRAM" in result.output and "device has 3.0 kB" in result.output
    assert "arena" in result.output and "stack" in result.output
    assert not out.exists()  # nothing half-written
