"""The scheme planner (Eq. 5) against brute force, and the contributions format."""

from __future__ import annotations

import itertools
import json
from types import MappingProxyType

import pytest

from firmware.errors import DoesNotFitError
from firmware.training.analysis.contributions import AnalysisSettings, Contributions
from firmware.training.analysis.planner import (
    best_gain,
    cheapest_scheme,
    plan_scheme,
)
from firmware.training.errors import TrainingError
from firmware.training.memory import StepModel
from firmware.training.positions import Position, Role
from firmware.training.scheme import RATIOS, SchemeTemplate
from tests.firmware.small_models import tiny_graph

pytestmark = pytest.mark.unit

POSITIONS = (Position(1, Role.PROJECT), Position(1, Role.EXPAND), Position(0, Role.HEAD))
GAINS = {  # made-up but plausible: more channels help, with diminishing returns
    Position(1, Role.PROJECT): (0.010, 0.020, 0.030, 0.034),
    Position(1, Role.EXPAND): (0.004, 0.012, 0.016, 0.018),
    Position(0, Role.HEAD): (0.020, 0.024, 0.026, 0.027),
}


def _contributions() -> Contributions:
    weights = {(p, r): g for p, gains in GAINS.items() for r, g in zip(RATIOS, gains,
                                                                       strict=True)}
    weights[(Position(1, Role.DEPTHWISE), 0.5)] = -0.01  # worth nothing: never planned
    return Contributions(graph="tiny", settings=AnalysisSettings(lrs=(0.02,)),
                         baseline_accuracy=0.3, classifier_accuracy=0.6,
                         bias_gain=(0.01, 0.015, 0.04, 0.045),
                         weight_gain=MappingProxyType(weights),
                         train_samples=100, eval_samples=50, elapsed_s=1.0)


def _brute_force() -> list[tuple[float, int, SchemeTemplate]]:
    graph = tiny_graph()
    model = StepModel(graph)
    c = _contributions()
    out = []
    for depth in range(5):
        for ratios in itertools.product((0.0, *RATIOS), repeat=len(POSITIONS)):
            template = SchemeTemplate(depth, tuple((p, r) for p, r in zip(POSITIONS, ratios,
                                                                          strict=True) if r))
            scheme = template.instantiate(graph)
            out.append((c.gain(template), model.peaks(scheme)[1], template))
    return out


@pytest.fixture(scope="module")
def brute() -> list[tuple[float, int, SchemeTemplate]]:
    return _brute_force()


@pytest.mark.parametrize("budget_share", [0.0, 0.25, 0.5, 1.0])
def test_planner_finds_the_best_scheme_under_the_budget(
        brute: list[tuple[float, int, SchemeTemplate]], budget_share: float) -> None:
    low = min(b for _, b, _ in brute)
    high = max(b for _, b, _ in brute)
    budget = int(low + budget_share * (high - low))
    best = max(g for g, b, _ in brute if b <= budget)
    planned = plan_scheme(tiny_graph(), _contributions(), budget)
    assert planned.training_bytes <= budget
    assert planned.predicted_gain == pytest.approx(best)
    assert planned.memory.training_bytes == planned.training_bytes
    assert all(w.layer != "b3.dw" for w in planned.scheme.weights)  # negative gain
    assert planned.scheme.lr == 0.02  # the analysis's learning rate


def test_cheapest_scheme_reaches_the_gain_with_least_memory(
        brute: list[tuple[float, int, SchemeTemplate]]) -> None:
    target = 0.9 * best_gain(tiny_graph(), _contributions())
    assert best_gain(tiny_graph(), _contributions()) == pytest.approx(
        max(g for g, _, _ in brute))
    least = min(b for g, b, _ in brute if g >= target - 1e-12)
    planned = cheapest_scheme(tiny_graph(), _contributions(), 0.9)
    assert planned.predicted_gain >= target - 1e-12
    assert planned.training_bytes == least


def test_a_budget_below_the_classifier_alone_names_both() -> None:
    with pytest.raises(DoesNotFitError, match=r"classifier alone needs .* training budget is 1\.0"):
        plan_scheme(tiny_graph(), _contributions(), 1024)


def test_contributions_json_round_trip_and_refusals() -> None:
    c = _contributions()
    again = Contributions.from_json(c.to_json())
    assert again == c
    doc = json.loads(c.to_json())
    doc["bias"] = doc["bias"][1:]
    with pytest.raises(TrainingError, match=r"depths 1\.\.K"):
        Contributions.from_dict(doc)
    with pytest.raises(TrainingError, match="version"):
        Contributions.from_dict({**json.loads(c.to_json()), "version": 9})
    with pytest.raises(TrainingError, match="not JSON"):
        Contributions.from_json("{")
