"""Stack bounds from gcc's call graph: chains, indirect calls, and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from firmware.errors import BuildError
from firmware.toolchain.stack import (
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
