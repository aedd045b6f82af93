"""firmware.codegen: golden files (diffed AND compiled and run), patch == layer, QEMU runs.

Set TINYFLEET_UPDATE_GOLDEN=1 to rewrite the golden files after an intended change.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from firmware.codegen import PROFILE_FILE, render_model, write_model
from firmware.errors import UnsupportedOpError
from firmware.int8.quantize import QuantizedGraph
from firmware.int8.reference import run_quantized
from firmware.ir import OpKind
from firmware.plan.memory import MemoryModel
from firmware.plan.patch import PatchPlan, plan_patches
from firmware.targets import get_target
from firmware.toolchain.build import LinkOverflowError, build_firmware, build_host_program
from firmware.toolchain.emulator import decode_outputs, encode_inputs, run_firmware, run_qemu
from tests.firmware.small_models import tiny_inputs, tiny_quantized

GOLDEN = Path(__file__).resolve().parent / "golden"
CASES = {"tiny_layer": None, "tiny_patch": (2, "b1.project")}


@pytest.fixture(scope="module")
def qgraph() -> QuantizedGraph:
    return tiny_quantized()


@pytest.fixture(scope="module")
def inputs(qgraph: QuantizedGraph) -> np.ndarray:
    return tiny_inputs(qgraph, 6)


@pytest.fixture(scope="module")
def expected(qgraph: QuantizedGraph, inputs: np.ndarray) -> np.ndarray:
    return run_quantized(qgraph, inputs).reshape(len(inputs), -1)


def _plan(qgraph: QuantizedGraph, case: str) -> PatchPlan | None:
    spec = CASES[case]
    return None if spec is None else plan_patches(qgraph.graph, spec[0], spec[1])


def _hwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


@pytest.mark.unit
@pytest.mark.parametrize("case", sorted(CASES))
def test_generated_sources_match_the_golden_files(qgraph: QuantizedGraph, case: str) -> None:
    files = render_model(qgraph, _plan(qgraph, case)).files
    folder = GOLDEN / case
    if os.environ.get("TINYFLEET_UPDATE_GOLDEN") == "1":
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / name).write_text(text)
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)
    for name, text in files.items():
        assert text == (folder / name).read_text(), f"{case}/{name} differs from its golden"


@pytest.mark.unit
def test_rendering_is_deterministic_and_readable(qgraph: QuantizedGraph) -> None:
    a = render_model(qgraph, _plan(qgraph, "tiny_patch")).files
    b = render_model(tiny_quantized(), _plan(qgraph, "tiny_patch")).files
    assert a == b
    model_c = render_model(qgraph).files["model.c"]
    assert "static const int8_t l0_w[216]" in model_c  # stem 8x3x3x3, in Flash
    assert "l5_dw_out" in model_c and "tf_conv2d_1x1_add_fast_s8" in model_c


@pytest.mark.unit
def test_rendering_does_not_depend_on_the_hash_seed() -> None:
    script = ("import hashlib; from firmware.codegen import render_model; "
              "from firmware.plan.patch import plan_patches; "
              "from tests.firmware.small_models import tiny_quantized; q = tiny_quantized(); "
              "f = render_model(q, plan_patches(q.graph, 2, 'b2.add')).files; "
              "print(hashlib.sha256(''.join(f[k] for k in sorted(f)).encode()).hexdigest())")
    root = Path(__file__).resolve().parents[3]
    digests = {subprocess.run([sys.executable, "-c", script], cwd=root, check=True, text=True,
                              capture_output=True, env={**os.environ, "PYTHONHASHSEED": seed}
                              ).stdout for seed in ("1", "2")}
    assert len(digests) == 1


@pytest.mark.toolchain
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mcu", ["stm32f412", "stm32f746"])
def test_golden_files_compile_and_run_bit_exact_in_qemu(tmp_path: Path, case: str, mcu: str,
                                                       inputs: np.ndarray,
                                                       expected: np.ndarray) -> None:
    src = tmp_path / case
    shutil.copytree(GOLDEN / case, src)  # the golden text itself, not a fresh rendering
    target = get_target(mcu)
    build = build_firmware(src, target, out_dir=tmp_path / "build")
    run = run_firmware(build.elf_path, target, _hwc(inputs), static_ram_bytes=build.ram_bytes)
    assert np.array_equal(run.outputs, expected)
    assert 0 < run.arena_used_bytes <= run.arena_bytes
    assert run.stack_bytes > 0 and run.instructions_per_image > 0
    assert run.peak_ram_bytes == (run.static_other_bytes + run.arena_used_bytes
                                  + run.scratch_used_bytes + run.stack_bytes)


@pytest.mark.toolchain
def test_golden_files_compile_and_run_bit_exact_on_the_host(tmp_path: Path, inputs: np.ndarray,
                                                          expected: np.ndarray) -> None:
    for case in sorted(CASES):
        src = GOLDEN / case
        exe = build_host_program(sorted(src.glob("*.c")), tmp_path / case, include_dirs=[src])
        (tmp_path / case / "input.bin").write_bytes(encode_inputs(_hwc(inputs)))
        subprocess.run([str(exe)], cwd=tmp_path / case, check=True, timeout=30)
        got, _ = decode_outputs((tmp_path / case / "output.bin").read_bytes(), len(inputs))
        assert np.array_equal(got, expected), case


@pytest.mark.toolchain
@pytest.mark.parametrize(("patches", "split", "memory_model", "dsp"), [
    (2, "b0.add", MemoryModel.INPLACE, True),
    (3, "b2.add", MemoryModel.INPLACE, False),
    (4, "stem", MemoryModel.INPLACE, True),
    (2, "b3.add", MemoryModel.SEPARATE, True),
    (1, None, MemoryModel.SEPARATE, False),
])
def test_every_schedule_computes_what_the_reference_computes(
        tmp_path: Path, qgraph: QuantizedGraph, inputs: np.ndarray, expected: np.ndarray,
        patches: int, split: str | None, memory_model: MemoryModel, dsp: bool) -> None:
    plan = (None if split is None
            else plan_patches(qgraph.graph, patches, split, memory_model=memory_model))
    model = write_model(qgraph, plan, tmp_path / "src", memory_model)
    target = get_target("stm32f412")
    build = build_firmware(tmp_path / "src", target, out_dir=tmp_path / "build", dsp=dsp)
    run = run_firmware(build.elf_path, target, _hwc(inputs))
    assert np.array_equal(run.outputs, expected)
    assert run.arena_bytes == model.arena_bytes


@pytest.mark.toolchain
def test_patch_based_uses_less_arena_than_layer_based(tmp_path: Path, qgraph: QuantizedGraph,
                                                      inputs: np.ndarray) -> None:
    target = get_target("stm32f746")
    used = {}
    for name, plan in (("layer", None), ("patch", plan_patches(qgraph.graph, 3, "b1.project"))):
        write_model(qgraph, plan, tmp_path / name)
        build = build_firmware(tmp_path / name, target, out_dir=tmp_path / f"{name}-build")
        used[name] = run_firmware(build.elf_path, target, _hwc(inputs[:1])).arena_used_bytes
    assert used["patch"] < used["layer"]


@pytest.mark.toolchain
def test_a_model_too_big_for_the_device_fails_with_the_linkers_numbers(
        tmp_path: Path, qgraph: QuantizedGraph) -> None:
    write_model(qgraph, None, tmp_path / "src")
    small = dataclasses.replace(get_target("stm32f412"), name="tiny-mcu", sram_bytes=3 * 1024)
    with pytest.raises(LinkOverflowError) as info:
        build_firmware(tmp_path / "src", small, out_dir=tmp_path / "build")
    assert info.value.overflow_bytes["RAM"] > 0
    assert "RAM overflowed by" in str(info.value) and "tiny-mcu" in str(info.value)


@pytest.mark.unit
def test_grouped_conv_is_refused_naming_the_layer(qgraph: QuantizedGraph) -> None:
    graph = qgraph.graph
    layer = graph.layer("b1.expand")
    bad_layers = tuple(dataclasses.replace(x, groups=2) if x is layer else x
                       for x in graph.layers)
    bad_graph = dataclasses.replace(graph, layers=bad_layers)
    bad = dataclasses.replace(qgraph, graph=bad_graph)
    with pytest.raises(UnsupportedOpError, match=r"b1\.expand.*grouped"):
        render_model(bad)


@pytest.mark.toolchain
@settings(max_examples=10, deadline=None, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(patches=st.integers(2, 4), split_index=st.integers(0, 7),
       memory_model=st.sampled_from(list(MemoryModel)))
def test_any_patch_schedule_equals_the_whole_tensor_reference_on_the_host(
        tmp_path: Path, qgraph: QuantizedGraph, inputs: np.ndarray, expected: np.ndarray,
        patches: int, split_index: int, memory_model: MemoryModel) -> None:
    from firmware.plan.patch import split_points

    points = split_points(qgraph.graph)
    split = points[split_index % len(points)]
    plan = plan_patches(qgraph.graph, patches, split, memory_model=memory_model)
    out = tmp_path / f"p{patches}-{split}-{memory_model.value}"
    write_model(qgraph, plan, out / "src", memory_model)
    exe = build_host_program(sorted((out / "src").glob("*.c")), out, include_dirs=[out / "src"])
    (out / "input.bin").write_bytes(encode_inputs(_hwc(inputs)))
    subprocess.run([str(exe)], cwd=out, check=True, timeout=30)
    got, _ = decode_outputs((out / "output.bin").read_bytes(), len(inputs))
    assert np.array_equal(got, expected), (patches, split, memory_model)


@pytest.mark.toolchain
def test_a_jointly_planned_patch_arena_runs_bit_exact(tmp_path: Path) -> None:
    from firmware.plan.arena import build_stage, place_stage, rest_graph
    from firmware.plan.memory import plan_arena
    from tests.firmware.small_models import small_rd_quantized

    qg = small_rd_quantized()
    plan = plan_patches(qg.graph, 2, "b1.project")
    stage, rest = build_stage(qg.graph, plan), rest_graph(qg.graph, "b1.project")
    rest_plan = plan_arena(rest)
    side_by_side = place_stage(rest_plan.offsets[rest.input], rest.tensor(rest.input).numel,
                               rest_plan.size_bytes, plan_arena(stage.graph).size_bytes)[2]
    model = write_model(qg, plan, tmp_path / "src")
    assert model.arena_bytes < side_by_side  # the joint plan was chosen
    x = qg.input.quantize(np.random.default_rng(5).standard_normal((2, 3, 32, 32)))
    target = get_target("stm32f746")
    build = build_firmware(tmp_path / "src", target, out_dir=tmp_path / "build")
    run = run_firmware(build.elf_path, target, _hwc(x))
    assert np.array_equal(run.outputs, run_quantized(qg, x).reshape(2, -1))
    assert run.arena_used_bytes <= model.arena_bytes


@pytest.mark.toolchain
def test_a_profiled_model_is_bit_exact_and_its_layers_add_up_to_the_run(
        tmp_path: Path, qgraph: QuantizedGraph, inputs: np.ndarray,
        expected: np.ndarray) -> None:
    """render_model(profile=True): SysTick ticks per layer in profile.bin (bench.layer_profile)."""
    plain = render_model(qgraph, _plan(qgraph, "tiny_patch")).files
    write_model(qgraph, _plan(qgraph, "tiny_patch"), tmp_path / "src", profile=True)
    assert "TF_PROF" not in plain["model.c"] + plain["main.c"]
    target = get_target("stm32f746")
    build = build_firmware(tmp_path / "src", target, out_dir=tmp_path / "build")
    run = run_qemu(build.elf_path, target, {"input.bin": encode_inputs(_hwc(inputs[:2]))},
                   ("output.bin", PROFILE_FILE))
    assert run.exit_code == 0, run.console
    got, trailer = decode_outputs(run.files["output.bin"], 2)
    assert np.array_equal(got, expected[:2])
    ticks = np.frombuffer(run.files[PROFILE_FILE], dtype="<u8")
    layers = qgraph.graph.layers
    assert len(ticks) == len(layers)
    total = trailer[1]  # the ticks of every tf_model_run call
    assert 0.97 * total <= ticks.sum() <= total
    for i, layer in enumerate(layers):
        if layer.op is OpKind.CONV:
            assert ticks[i] > 0, layer.name
