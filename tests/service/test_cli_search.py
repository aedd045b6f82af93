"""`tinyfleet train-supernet` and `tinyfleet search` end to end on a small .npz data set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from service.cli import main

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def family(digits_family: Path) -> Path:
    """The session's CLI-trained digits family (tests/service/conftest.py)."""
    return digits_family


def _search(args: list[str], var: Path) -> tuple[int, str]:
    result = CliRunner(env={"TINYFLEET_VAR_DIR": str(var)}).invoke(
        main, ["search", *args, "--population", "8", "--generations", "2"])
    return result.exit_code, result.output


def test_search_prints_json_caches_and_exports_onnx(family: Path, tmp_path: Path) -> None:
    onnx_path = tmp_path / "net.onnx"
    code, out = _search([str(family), "--mcu", "stm32f412", "--json", "--export-onnx",
                         str(onnx_path)], tmp_path)
    assert code == 0, out
    result = json.loads(out)
    assert result["cached"] is False and result["target"] == "stm32f412"
    mem = result["memory"]
    assert mem["sram_needed_bytes"] <= 256 * 1024
    assert mem["sram"]["total_bytes"] == mem["sram_needed_bytes"]
    assert mem["sram"]["stack_bytes"] > 0 and mem["sram"]["static_bytes"] > 0
    assert mem["sram"]["arena_bytes"] >= mem["peak_bytes"]
    assert mem["flash_bytes"] <= mem["slot_bytes"]
    assert 0.0 <= result["val_accuracy"] <= 1.0
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    res = result["arch"]["resolution"]
    (logits,) = session.run(None, {"input": np.zeros((1, 1, res, res), np.float32)})
    assert logits.shape == (1, 10)
    cached = list((tmp_path / "cache" / "search").rglob("*.json"))
    assert len(cached) == 1
    code, again = _search([str(family), "--mcu", "stm32f412", "--json"], tmp_path)
    assert code == 0 and json.loads(again)["cached"] is True
    assert json.loads(again)["arch"] == result["arch"]


def test_search_text_layer_based_and_custom_budget(family: Path, tmp_path: Path) -> None:
    code, out = _search([str(family), "--sram", "64KiB", "--flash", "512KiB", "--cpu",
                         "cortex-m7", "--no-patches"], tmp_path)
    assert code == 0, out
    assert "layer-based only" in out and "schedule: layer-based" in out
    assert "accuracy: val" in out and "SRAM:" in out and "Flash:" in out


def test_search_nothing_fits_names_the_needs(family: Path, tmp_path: Path) -> None:
    # The smallest subnet's SRAM account (~1.8 kB) fits; its weights and code do not.
    code, out = _search([str(family), "--sram", "2KiB", "--flash", "16KiB", "--cpu",
                         "cortex-m4"], tmp_path)
    assert code == 1
    assert "smallest" in out and "needs" in out and "device has 2.0 kB" in out
    assert "arena" in out and "stack" in out and "one slot has 7.0 kB" in out


def test_search_personalize_needs_the_family_contribution_analysis(
        family: Path, tmp_path: Path) -> None:
    # The training term comes from the family's analysis (tests/service/test_cli_training.py
    # runs one and searches with it); without one the search stops and says how to make it.
    code, out = _search([str(family), "--mcu", "stm32f746", "--personalize"], tmp_path)
    assert code == 1
    assert "no contribution analysis" in out and "tinyfleet contributions" in out
    assert not (tmp_path / "cache").exists()


def test_search_usage_errors(family: Path, tmp_path: Path) -> None:
    code, out = _search([str(family), "--sram", "1MiB", "--flash", "1MiB"], tmp_path)
    assert code == 2 and "all of --sram, --flash and --cpu" in out
    code, out = _search([str(family), "--mcu", "stm32f412", "--sram", "lots"], tmp_path)
    assert code == 2 and "not a size: 'lots'" in out
    code, out = _search([str(family), "--mcu", "nosuchmcu"], tmp_path)
    assert code == 2 and "unknown MCU" in out
    code, out = _search([str(tmp_path)], tmp_path)
    assert code != 0
