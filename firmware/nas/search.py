"""Joint architecture + patch-schedule search under an MCU's SRAM and Flash (MCUNetV2 §3.3).

Evolutionary search over `Arch` genes: a population of subnets that fit, the top-k become
parents, children come from crossover (each gene from either parent) and mutation (each gene
redrawn with a probability). Every candidate is built as an IR graph and planned: the schedule
is the (p, split) with the fewest MACs whose SRAM account fits the device
(`firmware.plan.account.fit_schedule`: arena + kernel scratch + static data + stack bound, +
the on-device training memory with personalization; `--no-patches`: layer-based only), the
same figure the compiler links against. Flash must hold the weights and the code in one OTA
slot: the Flash account (`firmware.plan.flash`: the runtime code the subnet's kernels link,
measured per core, and the generated code of its schedule). The objective (higher is
better; ties go to fewer MACs) is pluggable: predicted or measured accuracy, or MACs for an
architecture-only search. Everything is deterministic for a seed.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from firmware.arch import NetConfig
from firmware.errors import DoesNotFitError, FirmwareError
from firmware.frontend.builtin import build_graph
from firmware.ir import Graph
from firmware.nas.space import Arch, SearchSpace
from firmware.plan.account import SramAccount, SramDoesNotFitError, fit_schedule
from firmware.plan.flash import code_bytes as flash_code_bytes
from firmware.plan.memory import MemoryModel, analyze
from firmware.plan.patch import PatchPlan
from firmware.targets import KIB, Cpu, OtaLayout, TargetSpec

TrainingMemoryFn = Callable[[NetConfig, Graph], int]
CodeBytesFn = Callable[[Graph], int]


class TrainingMemoryUnavailableError(FirmwareError):
    """Personalization asked for, but no on-device training memory model is plugged in."""


def code_bytes_estimate(graph: Graph, cpu: Cpu = Cpu.CORTEX_M4,
                        plan: PatchPlan | None = None) -> int:
    """Flash for code of `graph` on `cpu` (layer-based unless `plan`): the Flash account's
    runtime and generated code (`firmware.plan.flash`, measured per core)."""
    return flash_code_bytes(graph, cpu, plan)


@dataclass(frozen=True)
class Constraints:
    """What a subnet must fit: its SRAM account on `cpu`, and one Flash slot.

    `training_memory(config, graph)` is the on-device training step's SRAM for a subnet: the
    sparse-update memory model's training term (`firmware.personalize.TrainingTerm`). It is
    charged (as the account's training part) only with `personalize`; `personalize` without
    it is refused, so that a search never reserves 0 bytes for training.
    """

    sram_bytes: int
    slot_bytes: int
    cpu: Cpu
    patches: bool = True
    personalize: bool = False
    memory_model: MemoryModel = MemoryModel.INPLACE
    max_patches: int = 8
    max_mac_overhead: float | None = None  # cap on patch recompute, e.g. 0.1 for +10 % MACs
    training_memory: TrainingMemoryFn | None = field(default=None, compare=False)
    # with personalize: the Flash the training scheme's weights overlay takes (its region at
    # the slot's end and the code that reads it; `TrainingTerm.overlay_bytes`)
    overlay_bytes: TrainingMemoryFn | None = field(default=None, compare=False)
    # None: the Flash account's code (`firmware.plan.flash`) of the schedule the search picks
    code_bytes: CodeBytesFn | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.personalize and self.training_memory is None:
            raise TrainingMemoryUnavailableError(
                "personalization needs the on-device training memory model as "
                "`training_memory` (firmware.personalize.training_term builds it from a "
                "family's contribution analysis): without it the search would reserve 0 "
                "bytes for training")

    @classmethod
    def for_target(cls, target: TargetSpec, layout: OtaLayout = OtaLayout.AB,
                   **options: Any) -> Constraints:
        """The constraints of one MCU: its SRAM and core, one OTA slot of its Flash."""
        return cls(sram_bytes=target.sram_bytes, slot_bytes=target.slot_bytes(layout),
                   cpu=target.cpu, **options)


@dataclass(frozen=True)
class Candidate:
    """One planned subnet: its schedule and SRAM account, and whether it fits."""

    arch: Arch
    config: NetConfig
    fits: bool
    why_not: str  # empty when it fits
    plan: PatchPlan | None  # None for a subnet that does not fit, unless explained
    account: SramAccount | None  # the plan's account (None without a plan)
    layer_peak_bytes: int
    layer_macs: int
    weights_bytes: int
    code_bytes: int
    training_bytes: int
    overlay_bytes: int = 0  # personalization's weights overlay (region + code), in Flash

    @property
    def peak_bytes(self) -> int:
        """Inference peak activation memory under the chosen schedule (else layer-based)."""
        return self.plan.peak_bytes if self.plan is not None else self.layer_peak_bytes

    @property
    def macs(self) -> int:
        """MACs under the chosen schedule, patch recompute included (else layer-based)."""
        return self.plan.macs if self.plan is not None else self.layer_macs

    @property
    def sram_needed_bytes(self) -> int:
        """The account's total: what the device's SRAM must hold."""
        if self.account is None:
            raise ValueError(f"{self.config.name} has no SRAM account: {self.why_not}")
        return self.account.total_bytes

    @property
    def flash_bytes(self) -> int:
        """Weights + code (+ the weights overlay): what one OTA slot must hold."""
        return self.weights_bytes + self.code_bytes + self.overlay_bytes

    def memory_report(self, constraints: Constraints) -> dict[str, Any]:
        """The numbers behind the fit, JSON-ready."""
        if self.plan is None or self.account is None:
            raise ValueError(f"{self.config.name} has no plan: {self.why_not}")
        schedule = self.plan.schedule
        return {
            "sram_bytes": constraints.sram_bytes, "sram_needed_bytes": self.sram_needed_bytes,
            "sram": self.account.to_dict(), "cpu": constraints.cpu.value,
            "peak_bytes": self.peak_bytes, "peak_layer": self.plan.peak_layer,
            "layer_peak_bytes": self.layer_peak_bytes,
            "training_bytes": self.training_bytes, "slot_bytes": constraints.slot_bytes,
            "flash_bytes": self.flash_bytes, "weights_bytes": self.weights_bytes,
            "code_bytes": self.code_bytes, "overlay_bytes": self.overlay_bytes,
            "macs": self.macs, "layer_macs": self.layer_macs,
            "mac_overhead": self.plan.mac_overhead, "patches": schedule.patches,
            "split_after": schedule.split_after, "input_patch": list(schedule.input_patch),
            "memory_model": constraints.memory_model.value,
        }


def plan_candidate(space: SearchSpace, arch: Arch, constraints: Constraints,
                   explain: bool = False) -> Candidate:
    """Build and plan subnet `arch`: the fewest-MAC schedule whose SRAM account fits.

    A subnet that does not fit gets no plan unless `explain`, which plans it for the lowest
    peak (the numbers an error message names); the search skips that cost.
    """
    config = space.to_config(arch)
    graph = build_graph(config, with_weights=False)
    report = analyze(graph, constraints.memory_model)
    training = overlay = 0
    if constraints.personalize and constraints.training_memory is not None:
        training = constraints.training_memory(config, graph)
    if constraints.personalize and constraints.overlay_bytes is not None:
        overlay = constraints.overlay_bytes(config, graph)
    measured_code = constraints.code_bytes is None
    code = (flash_code_bytes(graph, constraints.cpu, memory_model=constraints.memory_model)
            if constraints.code_bytes is None else constraints.code_bytes(graph))
    reasons = []
    if report.weights_bytes + code + overlay > constraints.slot_bytes:
        reasons.append(_flash_reason(report.weights_bytes, code, overlay, constraints))
    plan: PatchPlan | None = None
    account: SramAccount | None = None
    if not reasons or explain:
        try:
            fit = fit_schedule(graph, constraints.sram_bytes, constraints.cpu,
                               constraints.memory_model, training,
                               patches=None if constraints.patches else 1,
                               max_patches=constraints.max_patches)
            plan, account = fit.plan, fit.account
        except SramDoesNotFitError as exc:
            if explain:
                plan, account = exc.plan, exc.needed
            reasons.append(f"SRAM account {exc.needed.total_bytes} B ({exc.needed.describe()}"
                           f") > {constraints.sram_bytes} B")
    if plan is not None and measured_code and plan.schedule.split_after is not None:
        # the patch stage's loop, tables and tf_patch_store_s8: the account of the schedule
        code = flash_code_bytes(graph, constraints.cpu, plan)
        if not reasons and report.weights_bytes + code + overlay > constraints.slot_bytes:
            reasons.append(_flash_reason(report.weights_bytes, code, overlay, constraints))
    cap = constraints.max_mac_overhead
    if plan is not None and not reasons and cap is not None and plan.mac_overhead > cap:
        reasons.append(f"patch recompute +{plan.mac_overhead:.0%} MACs > cap +{cap:.0%}")
    return Candidate(arch, config, not reasons, "; ".join(reasons), plan, account,
                     report.peak_bytes, report.macs, report.weights_bytes, code, training,
                     overlay)


def _flash_reason(weights: int, code: int, overlay: int, constraints: Constraints) -> str:
    """'weights W B + code C B [+ weights overlay O B] > slot S B'."""
    extra = f" + weights overlay {overlay} B" if overlay else ""
    return f"weights {weights} B + code {code} B{extra} > slot {constraints.slot_bytes} B"


Objective = Callable[[Candidate], float]


def macs_objective(candidate: Candidate) -> float:
    """Architecture-only search: the most layer-based MACs (a proxy for accuracy)."""
    return float(candidate.layer_macs)


@dataclass(frozen=True)
class EvolutionSettings:
    """Population size, generations, parents (top-k), mutation probability, seed."""

    population: int = 48
    generations: int = 15
    parents: int = 12
    mutation_prob: float = 0.15
    mutation_share: float = 0.5  # fraction of children made by mutation, the rest by crossover
    seed: int = 0
    tries_per_child: int = 30

    def __post_init__(self) -> None:
        if not 1 <= self.parents <= self.population or self.generations < 0:
            raise ValueError(f"bad evolution settings {self}: need 1 <= parents <= population "
                             "and generations >= 0")


@dataclass(frozen=True)
class SearchResult:
    """The winner and how the search went."""

    best: Candidate
    score: float
    evaluated: int  # distinct subnets planned
    feasible: int  # of those, how many fit
    elapsed_s: float
    history: tuple[float, ...]  # best score after each generation
    ranked: tuple[Candidate, ...] = ()  # the final parents, best first
    most_macs: tuple[Candidate, ...] = ()  # the fitting subnets with the most MACs, as many


class _Evaluator:
    """Plans and scores subnets once each (keyed by canonical genes)."""

    def __init__(self, space: SearchSpace, constraints: Constraints, objective: Objective):
        self.space, self.constraints, self.objective = space, constraints, objective
        self.planned: dict[Arch, Candidate] = {}
        self.scores: dict[Arch, float] = {}

    def candidate(self, arch: Arch) -> Candidate:
        key = self.space.canonical(arch)
        if key not in self.planned:
            self.planned[key] = plan_candidate(self.space, key, self.constraints)
        return self.planned[key]

    def rank_key(self, arch: Arch) -> tuple[float, int, str]:
        key = self.space.canonical(arch)
        if key not in self.scores:
            self.scores[key] = self.objective(self.candidate(key))
        return (-self.scores[key], self.candidate(key).macs, repr(key))


def mutate(space: SearchSpace, arch: Arch, prob: float, rng: random.Random) -> Arch:
    """Redraw each gene of `arch` with probability `prob`."""
    def pick(value: Any, choices: tuple[Any, ...]) -> Any:
        return rng.choice(choices) if rng.random() < prob else value

    return Arch(pick(arch.resolution, space.resolutions), pick(arch.width, space.widths),
                tuple(pick(d, space.depths) for d in arch.depths),
                tuple(pick(k, space.kernels) for k in arch.kernels),
                tuple(pick(e, space.expand_ratios) for e in arch.expands))


def crossover(a: Arch, b: Arch, rng: random.Random) -> Arch:
    """Each gene from `a` or `b` with equal probability."""
    def mix(x: tuple[Any, ...], y: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(p if rng.random() < 0.5 else q for p, q in zip(x, y, strict=True))

    return Arch(rng.choice((a.resolution, b.resolution)), rng.choice((a.width, b.width)),
                mix(a.depths, b.depths), mix(a.kernels, b.kernels), mix(a.expands, b.expands))


def nothing_fits(space: SearchSpace, constraints: Constraints) -> DoesNotFitError:
    """The error for a budget that not even the smallest subnet fits, naming its needs."""
    small = plan_candidate(space, space.smallest(), constraints, explain=True)
    assert small.account is not None
    return DoesNotFitError(
        f"no subnet of {space.name} fits: the smallest ({small.config.name}) needs "
        f"{small.sram_needed_bytes / KIB:.1f} kB SRAM ({small.account.describe()}), device has"
        f" {constraints.sram_bytes / KIB:.1f} kB; and {small.flash_bytes / KIB:.1f} kB Flash, "
        f"one slot has {constraints.slot_bytes / KIB:.1f} kB")


def evolve(space: SearchSpace, constraints: Constraints, objective: Objective,
           settings: EvolutionSettings = EvolutionSettings()) -> SearchResult:
    """Evolutionary search for the best-scoring subnet that fits; DoesNotFitError if none."""
    started = time.monotonic()
    rng = random.Random(settings.seed)
    ev = _Evaluator(space, constraints, objective)
    if not ev.candidate(space.smallest()).fits:
        raise nothing_fits(space, constraints)
    population = _initial_population(space, ev, settings, rng)
    history: list[float] = []
    for _ in range(settings.generations):
        population.sort(key=ev.rank_key)
        parents = population[:settings.parents]
        history.append(-ev.rank_key(parents[0])[0])
        children: list[Arch] = []
        members = {space.canonical(a) for a in parents}
        budget = settings.tries_per_child * (settings.population - len(parents))
        while len(children) < settings.population - len(parents) and budget > 0:
            budget -= 1
            if rng.random() < settings.mutation_share:
                child = mutate(space, rng.choice(parents), settings.mutation_prob, rng)
            else:
                child = crossover(rng.choice(parents), rng.choice(parents), rng)
            child = space.canonical(child)
            if child not in members and ev.candidate(child).fits:
                members.add(child)
                children.append(child)
        population = parents + children
    population.sort(key=ev.rank_key)
    best = population[0]
    history.append(-ev.rank_key(best)[0])
    ranked = tuple(ev.candidate(a) for a in population[:settings.parents])
    fitting = sorted((c for c in ev.planned.values() if c.fits),
                     key=lambda c: (-c.layer_macs, repr(c.arch)))
    return SearchResult(ev.candidate(best), -ev.rank_key(best)[0], len(ev.planned),
                        len(fitting), time.monotonic() - started, tuple(history), ranked,
                        tuple(fitting[:settings.parents]))


def _initial_population(space: SearchSpace, ev: _Evaluator, settings: EvolutionSettings,
                        rng: random.Random) -> list[Arch]:
    # Random samples first; under a tight budget few fit, so grow the rest from the ones
    # that do by small mutations (the smallest subnet always fits here).
    # Both sandwich ends seed it: the smallest always fits here, the largest when it does.
    found = {space.canonical(space.smallest())}
    if ev.candidate(space.largest()).fits:
        found.add(space.canonical(space.largest()))
    for _ in range(settings.population * 4):
        if len(found) >= settings.population:
            break
        arch = space.canonical(space.sample(rng))
        if ev.candidate(arch).fits:
            found.add(arch)
    tries = settings.population * settings.tries_per_child
    while len(found) < settings.population and tries > 0:
        tries -= 1
        base = rng.choice(sorted(found, key=repr))
        arch = space.canonical(mutate(space, base, settings.mutation_prob, rng))
        if ev.candidate(arch).fits:
            found.add(arch)
    return sorted(found, key=repr)


def layer_based(constraints: Constraints) -> Constraints:
    """The same constraints with patch-based inference switched off (for comparison)."""
    return replace(constraints, patches=False)
