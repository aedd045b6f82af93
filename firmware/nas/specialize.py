"""Specialize a model family for one hardware class: search, then measure and extract.

The search ranks subnets by the family's accuracy predictor (fast) or by measured validation
accuracy (each candidate extracted and BN-recalibrated; slow, exact). The winner is always
measured on the validation and test splits after BN re-calibration, and its weights come out
of the supernet as a standalone module ready for ONNX export or `build_graph(config, params)`.
"""

from __future__ import annotations

import enum
import time
from dataclasses import asdict, dataclass
from typing import Any

from firmware.arch import NetConfig
from firmware.data import Dataset, batches
from firmware.errors import FirmwareError
from firmware.nas.accuracy import EvalSettings, measure
from firmware.nas.family import ModelFamily
from firmware.nas.search import (
    Candidate,
    Constraints,
    EvolutionSettings,
    Objective,
    SearchResult,
    evolve,
)
from firmware.nas.space import Arch
from firmware.nas.supernet import SubnetModule, Supernet, extract, recalibrate_bn

DEFAULT_EVOLUTION = EvolutionSettings()
DEFAULT_EVAL = EvalSettings()


class ObjectiveKind(enum.Enum):
    """How candidates are ranked."""

    PREDICTED = "predicted"  # the family's ridge-regression accuracy predictor
    MEASURED = "measured"  # validation accuracy after BN re-calibration, per candidate


@dataclass(frozen=True)
class Specialized:
    """A family's subnet for one hardware class, with its schedule, accuracy and memory."""

    family: str
    family_version: str
    arch: Arch
    config: NetConfig
    objective: ObjectiveKind
    score: float
    val_accuracy: float
    test_accuracy: float
    memory: dict[str, Any]
    evaluated: int
    feasible: int
    search_s: float
    total_s: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the network, schedule, accuracy and memory report."""
        return {
            "family": self.family, "family_version": self.family_version,
            "arch": self.arch.to_dict(), "config": _config_dict(self.config),
            "objective": self.objective.value, "score": self.score,
            "val_accuracy": self.val_accuracy, "test_accuracy": self.test_accuracy,
            "memory": self.memory,
            "schedule": {"patches": self.memory["patches"],
                         "split_after": self.memory["split_after"],
                         "input_patch": self.memory["input_patch"]},
            "search": {"evaluated": self.evaluated, "feasible": self.feasible,
                       "search_s": self.search_s, "total_s": self.total_s},
        }


def _config_dict(config: NetConfig) -> dict[str, Any]:
    data = asdict(config)
    data["input_size"] = list(config.input_size)
    return data


def config_from_dict(data: dict[str, Any]) -> NetConfig:
    """The NetConfig a `Specialized.to_dict()["config"]` describes."""
    from firmware.arch import BlockConfig

    fields = dict(data)
    fields["input_size"] = tuple(data["input_size"])
    fields["blocks"] = tuple(BlockConfig(**b) for b in data["blocks"])
    return NetConfig(**fields)


def make_objective(kind: ObjectiveKind, family: ModelFamily, supernet: Supernet,
                   dataset: Dataset, settings: EvalSettings) -> Objective:
    """The ranking function of `kind` for this family."""
    if kind is ObjectiveKind.PREDICTED:
        predictor = family.predictor
        if predictor is None:
            raise FirmwareError(f"family {family.name} has no accuracy predictor; "
                                "search with the measured objective")
        return lambda cand: predictor.predict(family.space, cand.arch)
    return lambda cand: measure(supernet, dataset, cand.arch, "val", settings)


def specialize(family: ModelFamily, supernet: Supernet, dataset: Dataset,
               constraints: Constraints, settings: EvolutionSettings = DEFAULT_EVOLUTION,
               objective: ObjectiveKind = ObjectiveKind.PREDICTED,
               eval_settings: EvalSettings = DEFAULT_EVAL, rerank: int = 5) -> Specialized:
    """Search the family under `constraints`, then measure the winner on val and test.

    With the predicted objective the `rerank` best predicted subnets and the `rerank`
    fitting subnets with the most MACs are measured on the validation split; the best
    measured one wins.
    """
    started = time.monotonic()
    objective_fn = make_objective(objective, family, supernet, dataset, eval_settings)
    result: SearchResult = evolve(family.space, constraints, objective_fn, settings)
    best: Candidate = result.best
    score = result.score
    if objective is ObjectiveKind.PREDICTED and rerank > 1:
        # The predictor ranks roughly (rank correlation ~0.5-0.7) and underrates the big
        # subnets the sandwich rule trains best: measure its top picks and the fitting
        # subnets with the most MACs, keep the best measured one (ties to fewer MACs).
        pool = {c.arch: c for c in (*result.ranked[:rerank], *result.most_macs[:rerank])}
        measured = [(measure(supernet, dataset, c.arch, "val", eval_settings), c)
                    for c in pool.values()]
        val, best = min(measured, key=lambda m: (-m[0], m[1].macs))
        score = objective_fn(best)
    else:
        val = measure(supernet, dataset, best.arch, "val", eval_settings)
    test = measure(supernet, dataset, best.arch, "test", eval_settings)
    return Specialized(family.name, family.version, best.arch, best.config, objective,
                       score, val, test, best.memory_report(constraints),
                       result.evaluated, result.feasible, result.elapsed_s,
                       time.monotonic() - started)


def export_subnet(supernet: Supernet, dataset: Dataset, arch: Arch,
                  settings: EvalSettings = DEFAULT_EVAL) -> SubnetModule:
    """The subnet as a standalone module with BN statistics re-estimated on training data."""
    module = extract(supernet, arch)
    recalibrate_bn(module, (x for x, _ in batches(dataset.train, arch.resolution,
                                                  settings.batch_size, shuffle_seed=0,
                                                  limit=settings.recal_images)))
    return module
