"""The agent starts without torch: `tinyfleet-agent`'s imports (and an agent's boot path)
load no deep-learning framework; a personalization round imports what it needs then."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

HEAVY = ("torch", "sklearn", "onnx", "onnxruntime")


def test_the_agent_cli_imports_no_torch() -> None:
    code = ("import sys, device_agent.cli, device_agent.agent, device_agent.loop; "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    assert out == "[]", f"the agent imports {out} at start"
