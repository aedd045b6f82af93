"""The suite passes on any x86 machine: golden, quantization and pipeline tests under other kernels.

A fresh machine with another CPU makes numpy's OpenBLAS and torch pick other kernels (which sum
in other orders). Each variation below re-runs the golden-file, quantization and (one)
pipeline tests in a subprocess with one kernel forced, asserts that the kernel it asked for is
the one that ran (threadpoolctl / torch report it: a misspelt or unsupported value silently
falls back to the default), and that the C generated for two quantized models is byte for
byte the C this process generates with its own kernels. Forcing `SkylakeX` would crash with
SIGILL on a CPU without AVX-512, so it is never forced; a variation the CPU cannot run is
skipped with the reason.

Budget: at most 2 minutes for all four (two subprocesses at a time, one per core).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.firmware.host_variation import PREFIX, generated_c_digests

pytestmark = [pytest.mark.toolchain, pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

ROOT = Path(__file__).resolve().parents[2]
TESTS = [
    "tests/firmware/codegen/test_codegen.py::test_generated_sources_match_the_golden_files",
    "tests/firmware/int8/test_quantize.py",
    # One compile end to end: the other parametrizations differ in target and schedule only,
    # which no float kernel touches.
    "tests/firmware/test_pipeline.py::test_torch_model_to_verified_image"
    "[patch-stm32f746-Cpu.CORTEX_M7]",
]
# A guard against a hung subprocess, not a speed target (~30 s each on a quiet machine; the
# 2-minute figure is measured in BENCHMARKS): generous, so a loaded machine does not fail it.
TIMEOUT_S = 400.0


@dataclass(frozen=True)
class Variation:
    """One forced kernel: the environment variable, its value, what must be reported."""

    variable: str
    value: str
    reported: frozenset[str]  # kernel names that show the variation took effect
    cpu_flags: frozenset[str]  # what the CPU needs to run it

    @property
    def id(self) -> str:
        return f"{self.variable}={self.value}"


VARIATIONS = [
    Variation("OPENBLAS_CORETYPE", "Haswell", frozenset({"Haswell"}),
              frozenset({"avx2", "fma"})),
    # This OpenBLAS (numpy's scipy-openblas, DYNAMIC_ARCH) serves Prescott with its generic
    # SSE3 kernels, which it reports as "Katmai".
    Variation("OPENBLAS_CORETYPE", "Prescott", frozenset({"Prescott", "Katmai"}),
              frozenset({"pni"})),
    Variation("ATEN_CPU_CAPABILITY", "avx2", frozenset({"AVX2"}), frozenset({"avx2", "fma"})),
    Variation("ATEN_CPU_CAPABILITY", "default", frozenset({"DEFAULT"}), frozenset()),
]


@dataclass(frozen=True)
class Outcome:
    """A finished subprocess: exit status, what it reported, its output."""

    returncode: int
    report: dict[str, object] | None
    output: str


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    match = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    return frozenset(match.group(1).split()) if match else frozenset()


def unsupported(variation: Variation) -> str | None:
    """Why this machine cannot run the variation, or None."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"{variation.id} names an x86 kernel; this is {platform.machine()}"
    missing = variation.cpu_flags - cpu_flags()
    if missing:
        return f"{variation.id} needs CPU flags {sorted(missing)}"
    return None


def run_variation(variation: Variation) -> Outcome:
    """Run the tests under one forced kernel (everything else as in this process, but one
    BLAS / OpenMP thread: two subprocesses share the cores, and a thread count is one more
    summation order the generated C must not depend on)."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
           variation.variable: variation.value}
    try:
        proc = subprocess.run([sys.executable, "-m", "tests.firmware.host_variation", *TESTS],
                              cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, str) else ""
        return Outcome(-1, None, f"timed out after {TIMEOUT_S:.0f} s\n{out}")
    output = proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith(PREFIX)]
    report = json.loads(lines[0][len(PREFIX):]) if lines else None
    return Outcome(proc.returncode, report, output)


@pytest.fixture(scope="module")
def outcomes() -> dict[str, Outcome | str]:
    """Every variation's outcome (or why it was not run), two subprocesses at a time."""
    runnable = [v for v in VARIATIONS if unsupported(v) is None]
    with ThreadPoolExecutor(max_workers=2) as pool:
        finished = dict(zip([v.id for v in runnable], pool.map(run_variation, runnable),
                            strict=True))
    return {v.id: finished.get(v.id) or str(unsupported(v)) for v in VARIATIONS}


@pytest.fixture(scope="module")
def own_digests() -> dict[str, str]:
    """The generated C's digests under this process's own (default) kernels."""
    return generated_c_digests()


@pytest.mark.parametrize("variation", VARIATIONS, ids=lambda v: v.id)
def test_suite_passes_under_other_kernels(variation: Variation, outcomes: dict[str, Outcome | str],
                                          own_digests: dict[str, str]) -> None:
    outcome = outcomes[variation.id]
    if isinstance(outcome, str):
        pytest.skip(outcome)
    tail = outcome.output[-3000:]
    assert outcome.report is not None, f"{variation.id}: no report\n{tail}"
    kernels = outcome.report["kernels"]
    assert isinstance(kernels, dict)
    ran = set(kernels["openblas"]) if variation.variable == "OPENBLAS_CORETYPE" \
        else {kernels["aten"]}
    assert ran & variation.reported, (
        f"{variation.id} did not take effect: {kernels} (expected {sorted(variation.reported)})")
    assert outcome.returncode == 0, f"{variation.id}: tests failed\n{tail}"
    summary = outcome.output.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary) and not re.search(
        r"failed|error|skipped|deselected", summary), summary
    # The same input gives the same C on every machine.
    assert outcome.report["c_sha256"] == own_digests, variation.id
