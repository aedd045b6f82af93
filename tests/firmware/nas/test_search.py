"""Joint architecture + schedule search: fits, determinism, constraints, comparisons."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from firmware.errors import DoesNotFitError
from firmware.frontend.builtin import build_graph
from firmware.nas.search import (
    Candidate,
    Constraints,
    EvolutionSettings,
    TrainingMemoryUnavailableError,
    evolve,
    macs_objective,
    plan_candidate,
)
from firmware.nas.space import compact_space
from firmware.nas.specialize import ObjectiveKind, export_subnet, specialize
from firmware.plan.account import fit_schedule
from firmware.plan.memory import analyze
from firmware.plan.patch import best_schedule
from firmware.targets import KIB, MIB, Cpu, custom_target, get_target
from tests.firmware.tiny_family import EVAL, tiny_predictor, tiny_space, trained_tiny

pytestmark = pytest.mark.unit

# A space where early activations dominate: 1-channel 64..96 px inputs.
SPACE = compact_space(10, 1, (64, 80, 96))
FAST = EvolutionSettings(population=12, generations=3, parents=4, seed=0)


def _check_fits(cand: Candidate, constraints: Constraints) -> None:
    assert cand.fits, cand.why_not
    graph = build_graph(cand.config, with_weights=False)
    assert cand.plan is not None
    # The planner, asked again, confirms the peak; the candidate's numbers add up.
    if cand.plan.schedule.patches == 1:
        assert analyze(graph).peak_bytes == cand.peak_bytes
    else:
        again = best_schedule(graph, cand.peak_bytes, patches=cand.plan.schedule.patches,
                              split_after=cand.plan.schedule.split_after)
        assert again.peak_bytes == cand.peak_bytes
    assert cand.sram_needed_bytes <= constraints.sram_bytes
    assert cand.flash_bytes <= constraints.slot_bytes
    # The account is the planner's, asked again with the same budget.
    fit = fit_schedule(graph, constraints.sram_bytes, constraints.cpu,
                       patches=None if constraints.patches else 1)
    assert fit.account == cand.account


def test_search_is_deterministic_and_fits() -> None:
    constraints = Constraints(sram_bytes=56 * KIB, slot_bytes=512 * KIB, cpu=Cpu.CORTEX_M4)
    one = evolve(SPACE, constraints, macs_objective, FAST)
    two = evolve(SPACE, constraints, macs_objective, FAST)
    assert one.best.arch == two.best.arch and one.history == two.history
    _check_fits(one.best, constraints)
    assert list(one.history) == sorted(one.history)  # elitism: the best never gets worse
    other = evolve(SPACE, constraints, macs_objective, dataclasses.replace(FAST, seed=1))
    _check_fits(other.best, constraints)


def test_joint_search_beats_layer_based_under_a_tight_budget() -> None:
    joint = Constraints(sram_bytes=42 * KIB, slot_bytes=1 * MIB, cpu=Cpu.CORTEX_M7)
    layer = dataclasses.replace(joint, patches=False)
    with_patches = evolve(SPACE, joint, macs_objective, FAST).best
    without = evolve(SPACE, layer, macs_objective, FAST).best
    _check_fits(with_patches, joint)
    _check_fits(without, layer)
    assert without.plan is not None and without.plan.schedule.patches == 1
    assert with_patches.plan is not None and with_patches.plan.schedule.patches > 1
    assert with_patches.layer_macs > without.layer_macs
    assert with_patches.layer_peak_bytes > 42 * KIB  # only patches make it fit


def test_training_memory_and_flash_limit_what_fits() -> None:
    base = Constraints(sram_bytes=256 * KIB, slot_bytes=4 * MIB, cpu=Cpu.CORTEX_M4)
    free = plan_candidate(SPACE, SPACE.largest(), base)
    assert free.fits and free.training_bytes == 0
    need = base.sram_bytes - 4 * KIB  # leaves less than any schedule of it needs
    heavy = dataclasses.replace(base, personalize=True, training_memory=lambda cfg, graph: need)
    squeezed = plan_candidate(SPACE, SPACE.largest(), heavy)
    assert squeezed.training_bytes == need
    assert not squeezed.fits and "SRAM account" in squeezed.why_not
    explained = plan_candidate(SPACE, SPACE.largest(), heavy, explain=True).account
    assert explained is not None and explained.training_bytes == need
    assert explained.total_bytes > base.sram_bytes
    # The term counts only with personalization on.
    off = dataclasses.replace(heavy, personalize=False)
    assert plan_candidate(SPACE, SPACE.largest(), off).training_bytes == 0
    tiny_slot = dataclasses.replace(base, slot_bytes=free.flash_bytes - 1)
    cand = plan_candidate(SPACE, SPACE.largest(), tiny_slot)
    assert not cand.fits and "> slot" in cand.why_not


def test_nothing_fits_names_the_smallest_models_needs() -> None:
    constraints = Constraints.for_target(custom_target(4 * KIB, 1 * MIB, "cortex-m3"))
    with pytest.raises(DoesNotFitError, match=r"smallest .* needs .* kB SRAM \(arena .* "
                                              r"scratch .* static .* stack .*\), device has "
                                              r"4\.0 kB"):
        evolve(SPACE, constraints, macs_objective, FAST)


def test_personalization_without_a_training_memory_model_is_refused() -> None:
    with pytest.raises(TrainingMemoryUnavailableError, match="training memory model"):
        Constraints.for_target(get_target("stm32f746"), personalize=True)
    # The hook: a training memory model plugged in lifts the refusal.
    plugged = Constraints.for_target(get_target("stm32f746"), personalize=True,
                                     training_memory=lambda cfg, graph: 1024)
    assert plan_candidate(SPACE, SPACE.smallest(), plugged).training_bytes == 1024


def test_mcu_constraints_come_from_the_catalog() -> None:
    target = get_target("stm32f412")
    constraints = Constraints.for_target(target, patches=False)
    assert constraints.sram_bytes == 256 * KIB and constraints.cpu is Cpu.CORTEX_M4
    assert constraints.slot_bytes == target.slot_bytes()
    assert not constraints.patches


def test_mac_overhead_cap_rejects_heavy_recompute() -> None:
    joint = Constraints(sram_bytes=42 * KIB, slot_bytes=1 * MIB, cpu=Cpu.CORTEX_M7)
    best = evolve(SPACE, joint, macs_objective, FAST).best
    assert best.plan is not None and best.plan.mac_overhead > 0
    capped = dataclasses.replace(joint, max_mac_overhead=best.plan.mac_overhead / 2)
    cand = plan_candidate(SPACE, best.arch, capped)
    assert not cand.fits and "recompute" in cand.why_not


def test_specialize_measures_the_winner_and_exports_it() -> None:
    supernet, data = trained_tiny()
    from firmware.nas.family import ModelFamily

    family = ModelFamily(name="tiny", version="0" * 16, space=tiny_space(),
                         data_source=data.source, classes=data.classes,
                         predictor=tiny_predictor())
    constraints = Constraints(sram_bytes=18 * KIB, slot_bytes=256 * KIB, cpu=Cpu.CORTEX_M4)
    settings = EvolutionSettings(population=8, generations=2, parents=2)
    found = specialize(family, supernet, data, constraints, settings,
                       ObjectiveKind.PREDICTED, EVAL)
    assert 0.3 < found.val_accuracy <= 1.0 and 0.3 < found.test_accuracy <= 1.0
    assert found.memory["sram_needed_bytes"] <= 18 * KIB
    assert found.memory["sram"]["total_bytes"] == found.memory["sram_needed_bytes"]
    assert found.to_dict()["schedule"]["patches"] >= 1
    measured = specialize(family, supernet, data, constraints, settings,
                          ObjectiveKind.MEASURED, EVAL)
    # Measured objective: the score is the validation accuracy of the winner.
    assert measured.score == pytest.approx(measured.val_accuracy)
    module = export_subnet(supernet, data, found.arch, EVAL)
    x = torch.zeros(1, 1, found.arch.resolution, found.arch.resolution)
    assert module(x).shape == (1, 10)
