"""Kill -9 at every durability boundary of an install, and at 20 seeded random moments.

A provisioned device (v1 installed in slot a) installs v2 in a child process that SIGKILLs
itself at the N-th boundary (each write, fsync, rename and directory fsync, enumerated by a
recording run), or that the test SIGKILLs after a seeded random delay. After each kill the
store is recovered as an agent does at start; then a good slot must boot (its image verifies
and passes the self-test), the update must be finished or reported failed, and installing
it again must succeed. Budget: at most 90 s.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from device_agent.backends import HostBackend, self_test
from device_agent.durable import CRASH_ENV, RECORD_ENV
from device_agent.profile import DeviceProfile
from device_agent.slots import Outcome, SlotStore, sha256_hex
from firmware.image import FirmwareImage, public_key_pem
from tests.device_agent.images import Images, resign

pytestmark = [pytest.mark.toolchain, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
RANDOM_KILLS = 20
BUDGET_S = 90.0


def _device() -> DeviceProfile:
    return DeviceProfile.for_mcu("dev-1", "stm32f746", "host")


def _store(root: Path, images: Images) -> tuple[SlotStore, HostBackend]:
    return SlotStore(root, _device(), images.key.public_key()), HostBackend(_device())


def _check(backend: HostBackend):  # type: ignore[no-untyped-def]
    def run(slot_dir: Path, image: FirmwareImage) -> str | None:
        return self_test(backend, slot_dir, image)
    return run


def _child(root: Path, work: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.device_agent.install_child", str(root),
         str(work / "v2.tfimg"), "u2", str(work / "fleet.pub")],
        cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)


def _assert_recovers(root: Path, images: Images, v1: bytes, v2: bytes, where: str) -> str:
    """Recover; a good slot boots; the update is installed or reported; a retry installs."""
    store, backend = _store(root, images)
    check = _check(backend)
    store.recover(check)
    active = store.state.active
    assert active is not None, f"{where}: no active slot after recovery"
    image = store.active_image()  # verifies signature and recorded sha256
    assert self_test(backend, store.active_dir(), image) is None, f"{where}: active fails"
    active_sha = store.state.slot(active).sha256  # type: ignore[union-attr]
    outcome = store.state.outcome
    assert outcome is not None
    if active_sha == sha256_hex(v2):
        assert (outcome.update_id, outcome.state) == ("u2", Outcome.INSTALLED), where
        result = "finished"
    else:
        assert active_sha == sha256_hex(v1), f"{where}: active slot holds neither image"
        if outcome.update_id == "u2":
            assert outcome.state is Outcome.FAILED and "interrupted" in outcome.reason, where
            result = "reported"
        else:  # killed before the install was recorded: nothing began, nothing to report
            assert (outcome.update_id, outcome.state) == ("u1", Outcome.INSTALLED), where
            result = "not begun"
        again = store.install("u2", v2, check)
        assert again.state is Outcome.INSTALLED, f"{where}: retry {again}"
    assert store.state.pending is None
    return result


def test_kill_9_at_every_boundary_and_20_random_points(images: Images, tmp_path: Path) -> None:
    started = time.monotonic()
    v1 = images.host
    v2 = resign(images.host, images.key, model_version="2")
    work = tmp_path / "work"
    work.mkdir()
    (work / "v2.tfimg").write_bytes(v2)
    (work / "fleet.pub").write_bytes(public_key_pem(images.key.public_key()))
    template = tmp_path / "provisioned"
    store, backend = _store(template, images)
    assert store.install("u1", v1, _check(backend)).state is Outcome.INSTALLED

    def fresh(name: str) -> Path:
        root = tmp_path / name
        shutil.copytree(template, root)
        return root

    # 1. enumerate the boundaries of one whole install (and time it)
    record = work / "boundaries.txt"
    root = fresh("record")
    t0 = time.monotonic()
    proc = _child(root, work, {RECORD_ENV: str(record)})
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.split() == ["ready", "installed"], err
    install_s = time.monotonic() - t0
    names = record.read_text().split()
    kinds = {n.split(":")[0] for n in names}
    assert {"write", "fsync", "rename", "fsync-dir"} <= kinds, names
    assert any("image.tfimg" in n for n in names) and any("state.json" in n for n in names)

    # 2. kill -9 at each of them
    results: dict[str, int] = {}
    for n, name in enumerate(names):
        root = fresh(f"b{n}")
        proc = _child(root, work, {CRASH_ENV: str(n)})
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, f"boundary {n} {name}: exit {proc.returncode}"
        result = _assert_recovers(root, images, v1, v2, f"boundary {n} ({name})")
        results[result] = results.get(result, 0) + 1
    assert results.get("finished") and results.get("reported"), results

    # 3. 20 seeded random moments between "ready" and the end of the install
    rng = random.Random(12)
    for k in range(RANDOM_KILLS):
        root = fresh(f"r{k}")
        proc = _child(root, work, {})
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, max(install_s / 4, 0.02)))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        _assert_recovers(root, images, v1, v2, f"random kill {k}")
    assert time.monotonic() - started < BUDGET_S
