"""`tinyfleet demo --once` (what `make demo` runs) end to end, with real processes: the
stack, a campaign through the Celery worker and the MQTT bridge to `tinyfleet-agent
--simulate` on QEMU, a personalization round, the summary, and a clean stop."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from service.demo.steps import SAMPLE_DEVICES
from tests.servers import run_cli, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.toolchain, pytest.mark.slow]

DEMO_TIMEOUT_S = 420


def test_demo_runs_a_campaign_through_the_queue_to_simulated_devices(
        digits_family: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="tinyfleet-demo-"))
    root.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINYFLEET_")}
    env["TINYFLEET_CACHE_DIR"] = str(root / "cache")
    try:
        # Warm caches: the family's contribution analysis, small (what a first demo keeps).
        analysis = run_cli(["contributions", str(digits_family), "--blocks", "1", "--steps",
                            "20", "--lr", "0.02", "--workers", "1", "--json"],
                           env={**env, "TINYFLEET_VAR_DIR": str(root / "analysis")})
        assert analysis.returncode == 0, analysis.stderr[-3000:]
        kept = root / "cache" / "demo" / "contributions"
        kept.mkdir(parents=True)
        for path in (root / "analysis" / "contributions").glob("*.json"):
            shutil.copy(path, kept / path.name)
        started = time.monotonic()
        result = run_cli(["demo", "--once", "--var", str(root / "demo"),
                          "--family", str(digits_family)], env=env, timeout_s=DEMO_TIMEOUT_S)
        seconds = time.monotonic() - started
        out = result.stdout
        assert result.returncode == 0, out[-6000:] + result.stderr[-3000:]
        assert f"{len(SAMPLE_DEVICES)} devices registered" in out
        assert re.search(r"connected to mqtt://127\.0\.0\.1:\d+: Success", out)
        assert "nothing delivered" in out and "wrong password: Not authorized" in out
        assert "contribution analysis done)" in out  # from the cache: no worker analysis
        assert f"all {len(SAMPLE_DEVICES)} devices online" in out
        assert "tinyfleet-agent --simulate 6" in out
        assert "gh-air-004   rp2040     tinyfleet-agent, host backend (host-" in out
        # Five installed (the two STM32H743 share one build), the 20 kB board refused.
        assert re.search(r"campaign 1 completed: \{'failed': 1, 'installed': 5\}", out), out
        assert re.search(r"cc-tag-03: no subnet of \S+ fits: the smallest .* needs [\d.]+ kB "
                         r"SRAM .* device has 20\.0 kB", out)
        db = sqlite3.connect(root / "demo" / "tinyfleet.db")
        rows = db.execute("SELECT d.name, m.accuracy_before, m.accuracy_after FROM "
                          "device_metrics m JOIN devices d ON d.id = m.device_id").fetchall()
        builds = db.execute("SELECT hw_class, emulated FROM class_builds "
                            "WHERE state = 'done'").fetchall()
        db.close()
        assert sorted(r[0] for r in rows) == ["cc-truck-01", "gh-air-003", "gh-air-004",
                                              "gh-cam-001", "gh-cam-002"]  # agents' rounds
        assert all(0.0 <= b <= 1.0 and 0.0 <= a <= 1.0 for _n, b, a in rows)
        assert len(builds) == 4 and sum(1 for _h, e in builds if not e) == 1  # rp2040
        for _name, before, after in rows:  # each printed in the summary table
            assert f"{before:.1%}" in out and f"{after:.1%}" in out
        assert re.search(r"dashboard: http://127\.0\.0\.1:\d+/login", out)
        assert "\n      tinyfleet_bridge_up 1\n" in out  # the bridge's exporter, via /metrics
        assert re.search(r"tinyfleet_jobs\{state=installed\} 5\n", out)
        assert re.search(r"operator token \(log in with it; stored hashed\): tf_\S+", out)
        assert "agents   stopped" in out and "clients  stopped" not in out
        assert out.count(" stopped\n") == 7  # the devices, then redis, mqtt, web, worker...
        assert not (root / "demo" / "stack.json").exists()
        print(f"demo --once: {seconds:.1f} s")
        _stops_on_sigterm(root, env, digits_family)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _stops_on_sigterm(root: Path, env: dict[str, str], family: Path) -> None:
    """Without --once the demo keeps its stack for the dashboard; started with SIGINT ignored
    (as `make demo &` is), SIGTERM stops the devices and the stack (its default action left
    them running). Plans and builds come from the demo cache."""
    script = Path(sys.executable).with_name("tinyfleet")
    log = root / "demo-kept.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(script), "demo", "--var", str(root / "kept"), "--family", str(family)],
            env=env, stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        try:
            assert wait_for(lambda: "press Ctrl-C to stop it" in log.read_text()
                            or proc.poll() is not None, DEMO_TIMEOUT_S), log.read_text()
            assert proc.poll() is None, log.read_text()[-6000:]
            assert "(file cache)" in (root / "kept" / "log" / "worker.log").read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0  # the way out of the last step, like Ctrl-C
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert "demo finished in" in text
    assert "agents   stopped" in text and text.count(" stopped\n") == 7, text[-3000:]
    assert not (root / "kept" / "stack.json").exists()
