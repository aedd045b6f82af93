"""The scheme planner (the paper's Eq. 5): the most accuracy a memory budget buys.

    maximise   bias_gain[k] + sum over layers i of weight_gain[i, r_i]
    subject to training_bytes(k, r) <= budget

over the bias depth k and one ratio r_i in {0, 1/8, 1/4, 1/2, 1} per analysed layer, with the
gains of a contribution analysis and the memory of the training memory model (the training
buffers the account adds to the inference arena). Memory is a peak, not a sum, so the
problem does not decompose: an evolutionary search (the paper's choice) explores it,
seeded with the bias-only schemes, and every candidate's memory is computed exactly. Layers
whose every ratio gains nothing are left out (they could only cost memory). Deterministic
for a seed.

`cheapest_scheme` answers the dual question (least memory for a gain) that the search's
training term asks: which scheme is worth planning for at all.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace

from firmware.errors import DoesNotFitError
from firmware.ir import Graph
from firmware.plan.memory import MemoryModel
from firmware.training.analysis.contributions import Contributions
from firmware.training.memory import StepModel, TrainingMemoryReport
from firmware.training.positions import Position, conv_layers, layers_at
from firmware.training.scheme import RATIOS, SchemeTemplate, SparseUpdateScheme

KIB = 1024
Genome = tuple[int, tuple[float, ...]]


@dataclass(frozen=True)
class PlannerSettings:
    """Evolution: population, generations, mutation probability per gene, seed."""

    population: int = 32
    generations: int = 25
    mutation_prob: float = 0.25
    seed: int = 0


@dataclass(frozen=True)
class PlannedScheme:
    """A planned scheme, its predicted gain and its memory."""

    scheme: SparseUpdateScheme
    template: SchemeTemplate
    predicted_gain: float
    training_bytes: int
    memory: TrainingMemoryReport
    evaluated: int


class _Problem:
    """Genomes, their gain and (cached) memory for one graph and analysis."""

    def __init__(self, graph: Graph, contributions: Contributions, base: SparseUpdateScheme,
                 memory_model: MemoryModel, reorder: bool) -> None:
        self.graph, self.contributions, self.base = graph, contributions, base
        self.reorder = reorder
        self.model = StepModel(graph, memory_model)
        at = layers_at(graph)
        useful = [p for p in contributions.positions if p in at and max(
            (contributions.weight_gain.get((p, r), 0.0) for r in RATIOS), default=0.0) > 0]
        self.positions: tuple[Position, ...] = tuple(useful)
        self.names = tuple(at[p] for p in useful)
        self.max_depth = min(contributions.bias_depth, len(conv_layers(graph)))
        self.ratios = tuple(r for r in RATIOS if any(
            (p, r) in contributions.weight_gain for p in useful)) or RATIOS
        self.cache: dict[Genome, int] = {}

    def template(self, genome: Genome) -> SchemeTemplate:
        depth, ratios = genome
        return SchemeTemplate(depth, tuple((p, r) for p, r in zip(self.positions, ratios,
                                                                   strict=True) if r))

    def gain(self, genome: Genome) -> float:
        return self.contributions.gain(self.template(genome))

    def scheme(self, genome: Genome) -> SparseUpdateScheme:
        return self.template(genome).instantiate(self.graph, self.base)

    def bytes(self, genome: Genome) -> int:
        if genome not in self.cache:
            _, training = self.model.peaks(self.scheme(genome), self.reorder)
            self.cache[genome] = training
        return self.cache[genome]

    def draw(self, rng: random.Random) -> Genome:
        return (rng.randint(0, self.max_depth),
                tuple(rng.choice((0.0, *self.ratios)) for _ in self.positions))

    def mutate(self, genome: Genome, prob: float, rng: random.Random) -> Genome:
        depth, ratios = genome
        if rng.random() < prob:
            depth = max(0, min(self.max_depth, depth + rng.choice((-2, -1, 1, 2))))
        return (depth, tuple(rng.choice((0.0, *self.ratios)) if rng.random() < prob else r
                             for r in ratios))

    def crossover(self, a: Genome, b: Genome, rng: random.Random) -> Genome:
        return (rng.choice((a[0], b[0])),
                tuple(x if rng.random() < 0.5 else y for x, y in zip(a[1], b[1], strict=True)))

    def seeds(self) -> list[Genome]:
        zero = tuple(0.0 for _ in self.positions)
        out = [(k, zero) for k in range(self.max_depth + 1)]
        for i in range(len(self.positions)):
            for r in self.ratios:
                out.append((0, tuple(r if j == i else 0.0 for j in range(len(self.positions)))))
        return out

    def planned(self, genome: Genome) -> PlannedScheme:
        scheme = self.scheme(genome)
        report = self.model.report(scheme, self.reorder)
        return PlannedScheme(scheme, self.template(genome), self.gain(genome),
                             report.training_bytes, report, len(self.cache))


def _evolve(problem: _Problem, key: Callable[[Genome], tuple[float, ...]],
            settings: PlannerSettings) -> Genome:
    rng = random.Random(settings.seed)
    population = list(dict.fromkeys(problem.seeds()))
    while len(population) < settings.population:
        population.append(problem.draw(rng))
    population = list(dict.fromkeys(population))
    parents = max(2, settings.population // 4)
    for _ in range(settings.generations):
        population.sort(key=key, reverse=True)
        elite = population[:parents]
        children = set(elite)
        tries = settings.population * 10
        while len(children) < settings.population and tries > 0:
            tries -= 1
            if rng.random() < 0.5:
                child = problem.mutate(rng.choice(elite), settings.mutation_prob, rng)
            else:
                child = problem.crossover(rng.choice(elite), rng.choice(elite), rng)
            children.add(child)
        population = sorted(children, key=repr)
    population.sort(key=key, reverse=True)
    return population[0]


def default_base(contributions: Contributions) -> SparseUpdateScheme:
    """The scheme settings an analysis measured with: its learning rate and classifier."""
    return SparseUpdateScheme(lr=contributions.settings.lr,
                              classifier=contributions.settings.classifier)


def plan_scheme(graph: Graph, contributions: Contributions, budget_bytes: int,
                base: SparseUpdateScheme | None = None,
                memory_model: MemoryModel = MemoryModel.INPLACE, reorder: bool = True,
                settings: PlannerSettings = PlannerSettings()) -> PlannedScheme:
    """The scheme with the highest predicted gain whose training memory fits the budget.

    DoesNotFitError when not even the classifier alone fits (the message names both).
    `base` gives the optimizer settings (default: the analysis's, `default_base`).
    """
    problem = _Problem(graph, contributions, base or default_base(contributions),
                       memory_model, reorder)
    floor = (0, tuple(0.0 for _ in problem.positions))
    if problem.bytes(floor) > budget_bytes:
        raise DoesNotFitError(
            f"{graph.name}: training the classifier alone needs {problem.bytes(floor) / KIB:.1f}"
            f" kB, the training budget is {budget_bytes / KIB:.1f} kB")

    def key(genome: Genome) -> tuple[float, ...]:
        cost = problem.bytes(genome)
        if cost > budget_bytes:
            return (0.0, -float(cost), 0.0)
        return (1.0, round(problem.gain(genome), 9), -float(cost))

    return problem.planned(_evolve(problem, key, settings))


def best_gain(graph: Graph, contributions: Contributions) -> float:
    """The highest predicted gain of any scheme on `graph`, memory aside (exact: additive)."""
    at = layers_at(graph)
    depth = min(contributions.bias_depth, len(conv_layers(graph)))
    bias = max((contributions.bias(k) for k in range(depth + 1)), default=0.0)
    weights = sum(max(0.0, *(contributions.weight_gain.get((p, r), 0.0) for r in RATIOS))
                  for p in contributions.positions if p in at)
    return bias + weights


def cheapest_scheme(graph: Graph, contributions: Contributions, fraction: float = 0.9,
                    base: SparseUpdateScheme | None = None,
                    memory_model: MemoryModel = MemoryModel.INPLACE, reorder: bool = True,
                    settings: PlannerSettings = PlannerSettings()) -> PlannedScheme:
    """The scheme with the least training memory whose gain is at least `fraction` of
    `best_gain` (ties to the higher gain)."""
    problem = _Problem(graph, contributions, base or default_base(contributions),
                       memory_model, reorder)
    target = fraction * best_gain(graph, contributions)

    def key(genome: Genome) -> tuple[float, ...]:
        gain = problem.gain(genome)
        if gain < target - 1e-12:
            return (0.0, gain, 0.0)
        return (1.0, -float(problem.bytes(genome)), gain)

    return problem.planned(_evolve(problem, key, settings))


def fixed_scheme(graph: Graph, template: SchemeTemplate, contributions: Contributions,
                 base: SparseUpdateScheme | None = None,
                 memory_model: MemoryModel = MemoryModel.INPLACE,
                 reorder: bool = True) -> PlannedScheme:
    """A given template on `graph`, with its predicted gain and memory (for baselines)."""
    scheme = template.instantiate(graph, base or default_base(contributions))
    report = StepModel(graph, memory_model).report(scheme, reorder)
    return PlannedScheme(replace(scheme), template, contributions.gain(template),
                         report.training_bytes, report, 1)
