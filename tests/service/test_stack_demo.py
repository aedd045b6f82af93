"""`tinyfleet demo` (what `make demo` runs) end to end, with real processes."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from service.demo.steps import SAMPLE_DEVICES
from tests.servers import run_cli

pytestmark = pytest.mark.integration


def test_demo_registers_the_fleet_brings_a_device_online_and_stops_cleanly() -> None:
    root = Path(tempfile.mkdtemp(prefix="tinyfleet-demo-"))
    root.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINYFLEET_")}
    try:
        result = run_cli(["demo", "--var", str(root / "demo")], env=env, timeout_s=120)
        out = result.stdout
        assert result.returncode == 0, out + result.stderr
        assert f"{len(SAMPLE_DEVICES)} devices registered" in out
        for device in SAMPLE_DEVICES:  # every device is in the printed table
            assert re.search(rf"^\s+{device['name']}\s+dev-[0-9a-f]+\s+{device['fleet']}\s", out,
                             re.M), device["name"]
        assert f"{root / 'demo' / 'broker' / 'passwords'}" in out
        assert re.search(r"connected to mqtt://127\.0\.0\.1:\d+: Success", out)
        assert "nothing delivered" in out and "wrong password: Not authorized" in out
        # one image per hardware class with a QEMU board (5 of the 7 classes), each bit-exact
        assert out.count("bit-exact in QEMU: True") == 5, out
        assert "patches to" in out  # the 256 kB and smaller boards need a patch schedule
        assert len(list((root / "demo" / "firmware").glob("*/firmware.img"))) == 5
        assert out.count(" stopped\n") == 6  # redis, mqtt, web, worker, beat, bridge
        assert not (root / "demo" / "stack.json").exists()
    finally:
        shutil.rmtree(root, ignore_errors=True)
