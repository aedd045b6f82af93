"""On-device training from the command line: `plan --train-scheme`, `finetune` to a model
version that `compile` builds, and `contributions` + `search --personalize`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from firmware.data import shifted
from service.cli import main
from tests.firmware.training.fixture_model import export_onnx, plain_digits

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SCHEME = {"format": "tinyfleet.sparse-update", "version": 1, "classifier": "fp32",
          "bias_layers": 3, "weights": [{"layer": "head.head.0.Conv", "ratio": 0.5}],
          "optimizer": {"kind": "sgd", "lr": 0.005, "momentum": 0.0}}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The checked-in digits net as ONNX, the shifted digits as an .npz, a scheme."""
    root = tmp_path_factory.mktemp("training")
    device = shifted(plain_digits(), "device")
    images = np.concatenate([device.train.images, device.val.images, device.test.images])
    labels = np.concatenate([device.train.labels, device.val.labels, device.test.labels])
    np.savez(root / "shifted.npz", x=images, y=labels)
    (root / "scheme.json").write_text(json.dumps(SCHEME))
    return {"onnx": export_onnx(root / "digits.onnx"), "data": root / "shifted.npz",
            "scheme": root / "scheme.json"}


def _run(args: list[str], var: Path | None = None) -> tuple[int, str, str]:
    env = {"TINYFLEET_VAR_DIR": str(var)} if var is not None else {}
    result = CliRunner(env=env).invoke(main, args)
    return result.exit_code, result.stdout, result.output


@pytest.mark.unit
def test_plan_shows_training_memory_with_and_without_reordering(tmp_path: Path) -> None:
    scheme = tmp_path / "s.json"
    scheme.write_text(json.dumps({**SCHEME, "bias_layers": 12, "weights": [
        {"layer": "b13.project", "ratio": 0.125}, {"layer": "b12.expand", "ratio": 0.25}]}))
    args = ["plan", "--builtin", "mcunet-5fps", "--resolution", "128", "--classes", "10",
            "--train-scheme", str(scheme)]
    code, out, all_out = _run([*args, "--json"])
    assert code == 0, all_out
    doc = json.loads(out)["training"]
    assert doc["reorder"]["training_bytes"] < doc["no_reorder"]["training_bytes"]
    assert doc["inference_peak_bytes"] == json.loads(out)["layer_peak_bytes"]
    trained = {row["name"]: row["trains"] for row in doc["layers"] if row["trains"]}
    assert trained["b13.project"] == "W 1/8 + b" and trained["b12.expand"] == "W 1/4 + b"
    assert trained["classifier"] == "W + b" and "b0.dw" not in trained
    code, text, all_out = _run([*args, "--sram", "256KiB", "--plot", str(tmp_path / "p.png")])
    assert code == 0, all_out
    assert "training buffers (the account's training term)" in text and "fits" in text
    assert "SRAM account on cortex-m7" in text and "training" in text
    assert (tmp_path / "p.png").is_file() and (tmp_path / "p-training.png").is_file()
    code, _, all_out = _run([*args, "--sram", "64KiB"])
    training = doc["reorder"]["training_bytes"]
    assert code == 1 and "does not fit" in all_out
    assert f"training {training / 1024:.1f} kB" in all_out  # the account names its training part


@pytest.mark.unit
def test_bad_schemes_and_usage_are_refused(files: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**SCHEME, "weights": [{"layer": "b1.dw", "ratio": 0.3}]}))
    code, _, out = _run(["plan", "--builtin", "mcunet-5fps", "--train-scheme", str(bad)])
    assert code == 2 and "ratio 0.3" in out
    code, _, out = _run(["finetune", str(files["onnx"]), "--data", str(files["data"]),
                         "-o", str(tmp_path / "v")])
    assert code == 2 and "either --scheme" in out
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    code, _, out = _run(["finetune", str(files["onnx"]), "--data", str(files["data"]),
                         "--scheme", str(files["scheme"]), "-o", str(tmp_path / "full")])
    assert code == 2 and "not empty" in out
    code, _, out = _run(["finetune", str(files["onnx"]), "--data", str(tmp_path / "none.npz"),
                         "--scheme", str(files["scheme"]), "-o", str(tmp_path / "v")])
    assert code == 1 and "none.npz" in out
    assert not (tmp_path / "v").exists()


@pytest.mark.toolchain
def test_finetune_writes_a_version_that_compile_builds(files: dict[str, Path],
                                                       tmp_path: Path) -> None:
    out = tmp_path / "v1"
    code, stdout, all_out = _run(["finetune", str(files["onnx"]), "--data", str(files["data"]),
                                  "--scheme", str(files["scheme"]), "--epochs", "0.4",
                                  "-o", str(out), "--json"])
    assert code == 0, all_out
    doc = json.loads(stdout)
    assert doc["accuracy_after"] >= doc["accuracy_before"] + 0.1
    assert set(doc["changed"]) == {"dw2.dw2.0.Conv", "pw2.pw2.0.Conv", "head.head.0.Conv",
                                   "classifier.Gemm"}  # the names the ONNX importer gives
    manifest = json.loads((out / "model.json").read_text())
    assert manifest["id"] == doc["version"] and manifest["base"]["sha256"] == doc["base_sha256"]
    assert json.loads((out / "scheme.json").read_text())["bias_layers"] == 3

    built = tmp_path / "build"
    code, _, all_out = _run(["compile", str(out), "--mcu", "stm32f746", "--test-vectors", "2",
                             "-o", str(built)])
    assert code == 0, all_out
    report = json.loads((built / "report.json").read_text())
    assert report["bit_exact"] is True and report["model"]["version"] == doc["version"]
    assert "already int8" in all_out

    contributions = tmp_path / "c.json"
    contributions.write_text(json.dumps({
        "format": "tinyfleet.contributions", "version": 1, "graph": "tinynet", "settings": {
            "blocks": 1, "steps": 10, "lrs": [0.005], "ratios": [0.5], "classifier": "fp32",
            "seed": 0}, "baseline_accuracy": 0.2, "classifier_accuracy": 0.5,
        "bias": [{"layers": 1, "gain": 0.01}, {"layers": 2, "gain": 0.02}],
        "weights": [{"position": "0.head", "ratio": 0.5, "gain": 0.03}],
        "train_samples": 10, "eval_samples": 10, "elapsed_s": 1.0}))
    planned = tmp_path / "v2"
    code, stdout, all_out = _run(["finetune", str(out), "--data", str(files["data"]),
                                  "--budget", "12KiB", "--contributions", str(contributions),
                                  "--epochs", "0.1", "-o", str(planned), "--json"])
    assert code == 0, all_out
    doc2 = json.loads(stdout)
    assert doc2["training_bytes"] <= 12 * 1024
    assert json.loads((planned / "model.json").read_text())["base"]["path"] == str(out.resolve())


@pytest.mark.toolchain
def test_personalized_search_reserves_training_and_its_pick_compiles(
        digits_family: Path, tmp_path: Path) -> None:
    from firmware.frontend.builtin import build_graph
    from firmware.nas.family import read_manifest
    from firmware.nas.specialize import config_from_dict
    from firmware.personalize import load_contributions, training_term

    var = tmp_path / "var"
    code, _, all_out = _run(["search", str(digits_family), "--sram", "256KiB", "--flash",
                             "1MiB", "--cpu", "cortex-m7", "--personalize"], var)
    assert code == 1 and "tinyfleet contributions" in all_out  # no analysis yet
    code, out, all_out = _run(["contributions", str(digits_family), "--blocks", "1",
                               "--steps", "20", "--lr", "0.02", "--workers", "1", "--json"], var)
    assert code == 0, all_out
    assert json.loads(out)["family_version"] == read_manifest(digits_family).version
    term = training_term(read_manifest(digits_family).space,
                         load_contributions(var, read_manifest(digits_family)))

    def search(sram: int, personalize: bool) -> dict[str, object]:
        code, out, all_out = _run(["search", str(digits_family), "--sram", str(sram),
                                   "--flash", "1MiB", "--cpu", "cortex-m7", "--no-patches",
                                   "--population", "8", "--generations", "2", "--json",
                                   *(["--personalize"] if personalize else [])], var)
        assert code == 0, all_out
        return json.loads(out)  # type: ignore[no-any-return]

    def training_bytes(pick: dict[str, object]) -> int:
        graph = build_graph(config_from_dict(pick["config"]), with_weights=False)  # type: ignore[arg-type]
        return term(config_from_dict(pick["config"]), graph)  # type: ignore[arg-type]

    roomy = search(256 * 1024, personalize=False)
    memory = roomy["memory"]
    assert isinstance(memory, dict)
    # A budget where the inference-only pick fits but not with its training memory.
    budget = memory["sram_needed_bytes"] + training_bytes(roomy) - 1
    plain = search(budget, personalize=False)
    plain_memory = plain["memory"]
    assert isinstance(plain_memory, dict)
    assert plain_memory["sram_needed_bytes"] + training_bytes(plain) > budget
    personal = search(budget, personalize=True)
    pmem = personal["memory"]
    assert isinstance(pmem, dict)
    assert personal["arch"] != plain["arch"]
    assert pmem["training_bytes"] == training_bytes(personal) > 0
    assert pmem["sram_needed_bytes"] <= budget
    scheme = personal["personalization"]
    assert isinstance(scheme, dict)
    assert scheme["training_bytes"] <= scheme["training_budget_bytes"]
    assert scheme["inference_bytes"] + scheme["training_bytes"] <= budget
    code, text, all_out = _run(["search", str(digits_family), "--sram", str(budget), "--flash",
                                "1MiB", "--cpu", "cortex-m7", "--no-patches", "--population",
                                "8", "--generations", "2", "--personalize", "--export-onnx",
                                str(tmp_path / "pick.onnx")], var)
    assert code == 0, all_out
    assert "on-device training:" in text and "accounts: inference" in text
    code, _, all_out = _run(["compile", str(tmp_path / "pick.onnx"), "--sram", str(budget),
                             "--flash", "1MiB", "--cpu", "cortex-m7", "--patches", "1",
                             "--test-vectors", "2", "-o", str(tmp_path / "build")])
    assert code == 0, all_out
    assert json.loads((tmp_path / "build" / "report.json").read_text())["bit_exact"] is True
