"""`tinyfleet onnx-ops`: what the ONNX importer takes and refuses, for users to read."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from firmware.frontend.onnx_ops import SUPPORTED_OPS, refused_ops
from service.cli import main

pytestmark = pytest.mark.unit


def test_onnx_ops_lists_supported_and_refused_operators() -> None:
    runner = CliRunner()
    text = runner.invoke(main, ["onnx-ops"])
    assert text.exit_code == 0, text.output
    assert "BatchNormalization" in text.output and "training_mode 0" in text.output
    assert f"Refused ({len(refused_ops())} standard operators)" in text.output
    assert "Sigmoid" in text.output and "ConvTranspose" in text.output
    doc = json.loads(runner.invoke(main, ["onnx-ops", "--json"]).output)
    assert set(doc["supported"]) == set(SUPPORTED_OPS)
    assert doc["refused"] == refused_ops() and "Softmax" in doc["refused"]
