"""A search pick links at its budget: one SRAM account from search to link (issue 8, part 3).

The suite's tiny family is searched at tight SRAM budgets (the whole account: arena, scratch,
static data and stack; predictor objective), layer-based and jointly with patches, and every
pick is compiled for a Cortex-M4 with exactly that much SRAM: it must link, run in QEMU
bit-exact, and measure at or under the account the search used, within the DESIGN's aim.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from firmware.data import to_tensor
from firmware.errors import DoesNotFitError
from firmware.frontend.builtin import build_graph
from firmware.image import generate_signing_key
from firmware.nas.search import Candidate, Constraints, EvolutionSettings, evolve
from firmware.nas.supernet import extract
from firmware.pipeline import CompileOptions, Dataset, compile_model
from firmware.targets import KIB, Cpu, custom_target
from tests.firmware.tiny_family import tiny_predictor, tiny_space, trained_tiny

pytestmark = [pytest.mark.toolchain, pytest.mark.slow]

# From the smallest subnet's least need (1.9 kB with 2x2 patches; a device has at least 2 kB)
# to just under the largest subnet's layer-based need (5.0 kB).
BUDGETS = (2048, 3072, 4096, 5120)
SETTINGS = EvolutionSettings(population=8, generations=3, parents=3, seed=0)


def _picks() -> dict[tuple[int, str, int, str | None], tuple[int, Candidate]]:
    """Every distinct (budget, subnet, schedule) the search picks at the budgets."""
    space, predictor = tiny_space(), tiny_predictor()
    picks = {}
    for sram in BUDGETS:
        target = custom_target(sram, 1024 * KIB, Cpu.CORTEX_M4, name=f"m4-{sram}")
        for patches in (False, True):
            constraints = Constraints.for_target(target, patches=patches)
            try:
                best = evolve(space, constraints, lambda c: predictor.predict(space, c.arch),
                              SETTINGS).best
            except DoesNotFitError as exc:  # 2 kB: only patches fit the smallest subnet
                assert not patches and sram == BUDGETS[0], exc
                assert "needs 2.2 kB SRAM (arena" in str(exc)
                continue
            assert best.plan is not None and best.account is not None
            assert best.sram_needed_bytes <= sram
            s = best.plan.schedule
            picks[(sram, repr(best.arch), s.patches, s.split_after)] = (sram, best)
    return picks


def test_every_search_pick_links_and_runs_at_its_budget(tmp_path: Path) -> None:
    supernet, data = trained_tiny()
    picks = _picks()
    assert any(c.plan is not None and c.plan.schedule.patches > 1 for _, c in picks.values())
    key = generate_signing_key()
    for n, (sram, cand) in enumerate(picks.values()):
        assert cand.plan is not None and cand.account is not None
        graph = build_graph(cand.config, params=extract(supernet, cand.arch).folded_params())
        res = cand.arch.resolution
        calib = Dataset(to_tensor(data.train.images[:16], res).numpy())
        s = cand.plan.schedule
        result = compile_model(
            graph, custom_target(sram, 1024 * KIB, Cpu.CORTEX_M4, name=f"m4-{sram}"), key,
            tmp_path / str(n), calib,
            options=CompileOptions(patches=s.patches, split_after=s.split_after,
                                   onnx_check=False, test_vectors=2, generated_calibration=4))
        # Linked (the linker's own overflow check passed), bit-exact in QEMU (compile_model
        # refuses otherwise), with the account the search used.
        assert result.account == cand.account
        check = result.report["sram_check"]
        assert check["linked_bytes"] <= check["predicted_bytes"] <= sram
        assert check["covers_measured"] and check["within_aim"], check
        for part in check["parts"]:
            if part["measured_bytes"] is not None:
                assert part["measured_bytes"] <= part["predicted_bytes"], (sram, part)
        assert result.build.stack_bound is not None
        assert result.emulation.stack_bytes <= result.build.stack_bound.total_bytes
        assert np.array_equal(result.emulation.outputs, result.expected)
