"""`tinyfleet plan`: JSON contract, human table, budgets, ONNX input and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from service.cli import main

pytestmark = pytest.mark.unit

KEYS = ["macs", "weights_bytes", "layer_peak_bytes", "layer_peak_layer", "patch", "sram",
        "flash", "fits", "layers"]
SRAM_KEYS = ["arena_bytes", "scratch_bytes", "static_bytes", "stack_bytes", "training_bytes",
             "total_bytes", "cpu"]
PATCH_KEYS = ["patches", "split_after", "input_patch", "peak_bytes", "macs", "mac_overhead",
              "stage_mac_overhead"]


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["plan", *args])
    return result.exit_code, result.stdout, result.stderr


def test_json_reproduces_mcunetv2() -> None:
    code, out, _ = _run("--builtin", "mobilenetv2", "--patches", "4", "--sram", "180KiB",
                        "--flash", "4MiB", "--json")
    assert code == 0
    doc = json.loads(out)
    assert list(doc) == KEYS and list(doc["patch"]) == PATCH_KEYS
    assert (doc["layer_peak_bytes"], doc["layer_peak_layer"]) == (1_404_928, "b1.expand")
    patch = doc["patch"]
    assert (patch["patches"], patch["split_after"], patch["input_patch"]) == \
        (4, "b3.project", [75, 75])
    assert abs(patch["peak_bytes"] - 172 * 1024) <= 1024
    assert patch["mac_overhead"] == pytest.approx(patch["macs"] / doc["macs"] - 1)
    assert doc["fits"] == {"sram": True, "flash": True}
    sram = doc["sram"]
    assert list(sram) == SRAM_KEYS and sram["cpu"] == "cortex-m7"
    assert sram["arena_bytes"] == patch["peak_bytes"]  # the arena holds exactly the peak
    assert sram["total_bytes"] == sum(sram[k] for k in SRAM_KEYS[:5]) <= 180 * 1024
    assert 0 < sram["stack_bytes"] <= 2048 and 1000 <= sram["static_bytes"] <= 1100
    assert list(doc["layers"][0]) == ["name", "op", "in_bytes", "out_bytes", "live_bytes", "macs"]
    assert max(r["live_bytes"] for r in doc["layers"]) == 1_404_928
    flash = doc["flash"]  # the Flash account: the weights and the code the schedule links
    assert flash["params_bytes"] == doc["weights_bytes"] and flash["cpu"] == "cortex-m7"
    assert flash["total_bytes"] == flash["params_bytes"] + flash["code_bytes"]
    assert 10 * 1024 < flash["code_bytes"] < 64 * 1024


def test_flash_budget_counts_the_code() -> None:
    _, out, _ = _run("--builtin", "mobilenetv2", "--patches", "4", "--json")
    doc = json.loads(out)
    budget = doc["weights_bytes"] + 1024  # the weights fit, weights and code do not
    code, out, err = _run("--builtin", "mobilenetv2", "--patches", "4", "--flash",
                          str(budget), "--json")
    assert code == 1 and json.loads(out)["fits"]["flash"] is False
    assert "weights and code (params" in err and "> Flash budget" in err


def test_human_table_marks_the_peaks() -> None:
    code, out, _ = _run("--builtin", "mobilenetv2", "--resolution", "160", "--width", "0.5",
                        "--memory-model", "separate")
    assert code == 0
    peak_rows = [line for line in out.splitlines() if "<- layer peak" in line]
    assert len(peak_rows) == 1 and peak_rows[0].startswith("b1.dw ")
    assert "<- patch peak" in out and "patch-based:" in out and "memory model separate" in out


def test_nothing_fits_exits_nonzero_with_the_numbers() -> None:
    code, out, err = _run("--builtin", "mobilenetv2", "--sram", "64KiB")
    assert code == 1 and out == ""
    assert "does not fit: needs 177.2 kB SRAM" in err and "device has 64.0 kB" in err
    assert "arena 171.5 kB + scratch" in err and "at layer" in err


def test_explicit_schedule_over_budget_is_reported() -> None:
    code, out, err = _run("--builtin", "mobilenetv2", "--patches", "1", "--sram", "256KiB",
                          "--json")
    assert code == 1
    assert json.loads(out)["fits"] == {"sram": False, "flash": None}
    assert "activation peak 1,372.0 kB > SRAM budget 256.0 kB at layer b1.expand" in err
    assert "needs 1,386.6 kB (arena 1,372.0 kB + scratch" in err


def test_bad_options_are_usage_errors() -> None:
    assert _run("--builtin", "mobilenetv2", "--sram", "lots")[0] == 2
    assert _run("--builtin", "mobilenetv2", "--patches", "many")[0] == 2
    assert _run()[0] == 2  # neither a model nor --builtin
    code, _, err = _run("--builtin", "mobilenetv2", "--patches", "4", "--split-after", "b2.dw")
    assert code == 1 and "cannot split" in err


def test_onnx_model_and_plot(tmp_path: Path) -> None:
    import torch
    from torch import nn

    net = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU6(), nn.Conv2d(16, 16, 3, 1, 1,
                        groups=16), nn.ReLU6(), nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 4)).eval()
    model = tmp_path / "tiny.onnx"
    torch.onnx.export(net, (torch.zeros(1, 3, 64, 48),), str(model), dynamo=False)
    png = tmp_path / "plan.png"
    code, out, _ = _run(str(model), "--plot", str(png), "--bytes-per-element", "4", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["layer_peak_bytes"] == 4 * (3 * 64 * 48 + 16 * 32 * 24)
    assert doc["patch"]["peak_bytes"] < doc["layer_peak_bytes"]
    assert "fits" not in doc
    assert doc["sram"] is None  # the account is for int8 activations only
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
