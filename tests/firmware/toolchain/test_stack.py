"""Stack bounds from gcc's call graph: chains, indirect calls, and the refusals."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from firmware.errors import BuildError
from firmware.toolchain.stack import (
    ASM_FRAME_BYTES,
    EXCEPTION_FRAME_BYTES,
    LIBRARY_FRAME_BYTES,
    read_callgraph,
    stack_bound,
)

pytestmark = pytest.mark.unit


def _ci(tmp_path: Path, name: str, nodes: dict[str, str], edges: list[tuple[str, str]]) -> Path:
    """A .ci file as gcc writes it: nodes with their frames, edges caller -> callee."""
    lines = [f'graph: {{ title: "{name}"']
    for title, frame in nodes.items():
        label = title.rsplit(":", 1)[-1] + "\\nsrc.c:1:1" + (f"\\n{frame}" if frame else "")
        lines.append(f'node: {{ title: "{title}" label: "{label}" }}')
    lines += [f'edge: {{ sourcename: "{a}" targetname: "{b}" }}' for a, b in edges]
    path = tmp_path / f"{name}.ci"
    path.write_text("\n".join([*lines, "}"]) + "\n")
    return path


def test_the_bound_is_the_deepest_chain_plus_library_and_one_exception(tmp_path: Path) -> None:
    start = _ci(tmp_path, "start", {"Reset_Handler": "8 bytes (static)", "main": "",
                                    "SysTick_Handler": "0 bytes (static)",
                                    "HardFault_Handler": "8 bytes (static)", "tf_exit": ""},
                [("Reset_Handler", "main"), ("HardFault_Handler", "tf_exit")])
    model = _ci(tmp_path, "model", {
        "main": "100 bytes (static)", "tf_model_run": "48 bytes (static)",
        "model.c:read_input": "8 bytes (static)", "tf_exit": "16 bytes (static)",
        "tf_conv2d_s8": "88 bytes (static)", "tf_matmul_columns": "264 bytes (static)",
        "kern.c:tf_fill_im2col": "56 bytes (dynamic,bounded)",
        "kern.c:tf_fill_pixel": "4 bytes (static)", "memset": ""},
        [("main", "tf_model_run"), ("tf_model_run", "__indirect_call"),
         ("tf_model_run", "tf_conv2d_s8"), ("tf_conv2d_s8", "tf_matmul_columns"),
         ("tf_matmul_columns", "__indirect_call"), ("kern.c:tf_fill_im2col", "memset")])
    bound = stack_bound(read_callgraph([start, model]))
    assert [name for name, _ in bound.chain] == ["Reset_Handler", "main", "tf_model_run",
                                                 "tf_conv2d_s8", "tf_matmul_columns",
                                                 "tf_fill_im2col"]
    assert bound.chain_bytes == 8 + 100 + 48 + 88 + 264 + 56
    assert bound.library_bytes == LIBRARY_FRAME_BYTES
    assert bound.exception_bytes == EXCEPTION_FRAME_BYTES + 8 + 16  # HardFault > tf_exit
    assert bound.total_bytes == bound.chain_bytes + LIBRARY_FRAME_BYTES + bound.exception_bytes
    assert bound.describe().endswith(f"= {bound.total_bytes} B")


@pytest.mark.parametrize(("nodes", "edges", "why"), [
    ({"Reset_Handler": "8 bytes (static)", "f": "16 bytes (static)"},
     [("Reset_Handler", "f"), ("f", "f")], "recursion"),
    ({"Reset_Handler": "8 bytes (static)", "f": "16 bytes (static)"},
     [("Reset_Handler", "f"), ("f", "__indirect_call")], "INDIRECT_CALLS"),
    ({"Reset_Handler": "8 bytes (static)", "f": "16 bytes (dynamic)"},
     [("Reset_Handler", "f")], "unbounded"),
])
def test_no_sound_bound_is_refused(tmp_path: Path, nodes: dict[str, str],
                                   edges: list[tuple[str, str]], why: str) -> None:
    with pytest.raises(BuildError, match=why):
        stack_bound(read_callgraph([_ci(tmp_path, "x", nodes, edges)]))


def _library_chains(elf: Path, ours: set[str]) -> dict[str, int]:
    """Stack bytes of every linked function outside our sources, its callees included."""
    symbols = subprocess.run(["arm-none-eabi-readelf", "-sW", str(elf)], capture_output=True,
                             text=True, check=True).stdout
    library = {cols[7] for cols in (line.split() for line in symbols.splitlines())
               if len(cols) >= 8 and cols[3] == "FUNC" and cols[7] not in ours}
    frames: dict[str, int] = {}
    calls: dict[str, set[str]] = {}
    for name in library:
        text = subprocess.run(["arm-none-eabi-objdump", "-d", f"--disassemble={name}",
                               str(elf)], capture_output=True, text=True, check=True).stdout
        frame = 0
        for regs in re.findall(r"\t(?:push(?:\.w)?|stmdb(?:\.w)?\s+sp!,)\s*\{([^}]*)\}", text):
            frame += 4 * len(regs.split(","))
        frame += sum(int(n) for n in re.findall(r"\tsub(?:\.w)?\s+sp, (?:sp, )?#(\d+)", text))
        frames[name] = frame
        calls[name] = set(re.findall(r"\tb(?:l|lx|\.w|\.n)?\s+[0-9a-f]+ <([\w.]+)>", text))

    def chain(name: str, seen: frozenset[str]) -> int:
        below = [chain(c, seen | {name}) for c in calls[name] if c in frames and c not in seen
                 and c != name]
        return frames[name] + max(below, default=0)

    return {name: chain(name, frozenset()) for name in frames}


@pytest.mark.toolchain
def test_model_builds_carry_a_bound_and_library_leaves_fit_their_allowance(
        tmp_path: Path) -> None:
    from firmware.codegen import write_model
    from firmware.targets import MIB, custom_target
    from firmware.toolchain.build import build_firmware
    from tests.firmware.small_models import tiny_quantized

    write_model(tiny_quantized(), None, tmp_path / "src")
    # Cortex-M0+: no divide instruction, so libgcc's division helpers are linked too.
    target = custom_target(64 * 1024, 1 * MIB, "cortex-m0plus")
    build = build_firmware(tmp_path / "src", target, out_dir=tmp_path / "build")
    bound = build.stack_bound
    assert bound is not None and bound.total_bytes <= build.stack_reserve_bytes
    names = [name for name, _ in bound.chain]
    assert names[:3] == ["Reset_Handler", "main", "tf_model_run"] and names[3].startswith("tf_")
    ours = {title.rsplit(":", 1)[-1] for title in read_callgraph(
        sorted((tmp_path / "build").glob("firmware.elf-*.ci"))).frames}
    chains = _library_chains(build.elf_path, ours)
    assert {"memcpy", "memset", "__aeabi_idiv"} <= set(chains)
    assert max(chains.values()) <= LIBRARY_FRAME_BYTES, chains


def _disassembled_frame(obj: Path, name: str) -> int:
    """Bytes `name` takes below its caller's stack: pushes and every `sub sp` (asm too)."""
    text = subprocess.run(["arm-none-eabi-objdump", "-d", f"--disassemble={name}", str(obj)],
                          capture_output=True, text=True, check=True).stdout
    frame = sum(4 * len(regs.split(",")) for regs in re.findall(
        r"\t(?:push(?:\.w)?|stmdb(?:\.w)?\s+sp!,)\s*\{([^}]*)\}", text))
    return frame + sum(int(n) for n in re.findall(r"\tsub(?:\.w)?\s+sp, (?:sp, )?#(\d+)",
                                                  text))


@pytest.mark.toolchain
@pytest.mark.parametrize("cpu", ["cortex-m4", "cortex-m7"])
def test_frames_asm_blocks_push_are_in_the_bound(tmp_path: Path, cpu: str) -> None:
    from firmware.targets import Cpu
    from firmware.toolchain.build import ARM_CC, INCLUDE_DIR, SRC_DIR, WARNINGS, cpu_flags

    obj = tmp_path / "tf_pw_fast.o"  # the runtime's asm blocks that move sp live there
    subprocess.run([ARM_CC, *cpu_flags(Cpu(cpu)), "-O2", *WARNINGS, "-ffunction-sections",
                    "-fcallgraph-info=su", f"-I{INCLUDE_DIR}", "-c",
                    str(SRC_DIR / "tf_pw_fast.c"), "-o", str(obj)], check=True, cwd=tmp_path)
    graph = read_callgraph(sorted(tmp_path.glob("*.ci")))
    for name in ASM_FRAME_BYTES:
        title = graph.title(name)
        assert title is not None, f"{name} is not in the runtime any more"
        frame = _disassembled_frame(obj, name)
        assert frame > ASM_FRAME_BYTES[name]  # its own pushes too
        assert graph.frames[title] == frame, name
