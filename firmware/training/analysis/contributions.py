"""Contribution analysis (the paper's Sec. 3.2): what each part of a sparse update is worth.

On held-out data that no device uses, fine-tune the int8 graph several times from the same
start, with the same samples in the same order, and measure the accuracy after each run:

- the classifier alone (the baseline every scheme adds to);
- the classifier plus the biases of the last k conv layers, for each k up to the analysed
  depth: `bias_gain[k-1]` is its accuracy minus the classifier-only accuracy;
- the classifier plus the weights of one layer on a ratio r of its input channels, for each
  analysed layer and r in {1/8, 1/4, 1/2, 1}: `weight_gain[(position, r)]`.

Layers are indexed by position from the end (block from the end, conv role), so that the
analysis of one subnet applies to any subnet a search draws. Only the last `blocks` blocks
(and the head conv) are analysed: earlier layers cost the most memory to train and the
paper finds them worth the least. The scheme planner (planner.py) adds these gains up as the
objective of its Eq. 5.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import numpy as np
import numpy.typing as npt

from firmware.int8.quantize import QuantizedGraph
from firmware.training.engine.blas import one_blas_thread
from firmware.training.engine.trainer import Trainer
from firmware.training.errors import TrainingError
from firmware.training.positions import Position, Role, conv_layers, positions
from firmware.training.samples import Samples
from firmware.training.scheme import (
    RATIOS,
    ClassifierMode,
    SchemeTemplate,
    SparseUpdateScheme,
    WeightUpdate,
    resolve,
)

CONTRIBUTIONS_FORMAT = "tinyfleet.contributions"
CONTRIBUTIONS_VERSION = 1
ANALYSED_ROLES = (Role.EXPAND, Role.DEPTHWISE, Role.PROJECT, Role.HEAD, Role.CONV)
LEARNING_RATES = (0.005, 0.02, 0.05)
Boundary = dict[str, npt.NDArray[np.generic]]


@dataclass(frozen=True)
class AnalysisSettings:
    """How the runs train: last `blocks` blocks, `steps` SGD steps at batch 1 each."""

    blocks: int = 3
    steps: int = 300
    lrs: tuple[float, ...] = LEARNING_RATES  # tried on the bias run; the best is used
    ratios: tuple[float, ...] = RATIOS
    classifier: ClassifierMode = ClassifierMode.FP32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.blocks < 1 or self.steps < 1 or not self.ratios or not self.lrs:
            raise TrainingError(f"bad analysis settings {self}: blocks and steps >= 1, "
                                "at least one ratio and one learning rate")

    @property
    def lr(self) -> float:
        """The learning rate of the runs (after tuning: the only one left)."""
        return self.lrs[0]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"blocks": self.blocks, "steps": self.steps, "lrs": list(self.lrs),
                "ratios": list(self.ratios), "classifier": self.classifier.value,
                "seed": self.seed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnalysisSettings:
        """Parse `to_dict`'s form."""
        return cls(int(data["blocks"]), int(data["steps"]),
                   tuple(float(r) for r in data["lrs"]),
                   tuple(float(r) for r in data["ratios"]), ClassifierMode(data["classifier"]),
                   int(data["seed"]))


@dataclass(frozen=True)
class Contributions:
    """The result of an analysis (module docstring), JSON-ready with `to_dict`."""

    graph: str
    settings: AnalysisSettings
    baseline_accuracy: float  # the frozen model
    classifier_accuracy: float  # after training the classifier alone
    bias_gain: tuple[float, ...]  # [k - 1]: biases of the last k convs
    weight_gain: Mapping[tuple[Position, float], float]
    train_samples: int
    eval_samples: int
    elapsed_s: float
    family: str = ""
    family_version: str = ""
    subnet: Mapping[str, Any] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def bias_depth(self) -> int:
        """Deepest analysed bias depth."""
        return len(self.bias_gain)

    @property
    def positions(self) -> tuple[Position, ...]:
        """Analysed positions, from the end."""
        return tuple(sorted({p for p, _ in self.weight_gain}, key=Position.sort_key))

    def bias(self, depth: int) -> float:
        """Gain of the biases of the last `depth` convs (deeper than analysed: the deepest)."""
        if depth <= 0 or not self.bias_gain:
            return 0.0
        return self.bias_gain[min(depth, len(self.bias_gain)) - 1]

    def gain(self, template: SchemeTemplate) -> float:
        """The predicted gain of a scheme: the sum of its parts' gains (the paper's Eq. 5)."""
        return self.bias(template.bias_layers) + sum(
            self.weight_gain.get((pos, ratio), 0.0) for pos, ratio in template.weights)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: format, version, settings, accuracies, gains."""
        return {
            "format": CONTRIBUTIONS_FORMAT, "version": CONTRIBUTIONS_VERSION,
            "family": self.family, "family_version": self.family_version,
            "graph": self.graph, "subnet": dict(self.subnet), "data": dict(self.data),
            "settings": self.settings.to_dict(),
            "baseline_accuracy": self.baseline_accuracy,
            "classifier_accuracy": self.classifier_accuracy,
            "bias": [{"layers": k + 1, "gain": g} for k, g in enumerate(self.bias_gain)],
            "weights": [{"position": p.key, "ratio": r, "gain": g}
                        for (p, r), g in sorted(self.weight_gain.items(),
                                                key=lambda kv: (kv[0][0].sort_key(), kv[0][1]))],
            "train_samples": self.train_samples, "eval_samples": self.eval_samples,
            "elapsed_s": self.elapsed_s,
        }

    def to_json(self) -> str:
        """The JSON document."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Contributions:
        """Parse `to_dict`'s form; TrainingError names what is wrong."""
        if data.get("format") != CONTRIBUTIONS_FORMAT:
            raise TrainingError(f"format {data.get('format')!r} is not {CONTRIBUTIONS_FORMAT!r}")
        if data.get("version") != CONTRIBUTIONS_VERSION:
            raise TrainingError(f"contributions version {data.get('version')!r} is not "
                                f"{CONTRIBUTIONS_VERSION}")
        try:
            bias = sorted(data["bias"], key=lambda b: int(b["layers"]))
            if [int(b["layers"]) for b in bias] != list(range(1, len(bias) + 1)):
                raise TrainingError("bias gains must list depths 1..K")
            weights = {(Position.parse(str(w["position"])), float(w["ratio"])): float(w["gain"])
                       for w in data["weights"]}
            return cls(
                graph=str(data["graph"]), settings=AnalysisSettings.from_dict(data["settings"]),
                baseline_accuracy=float(data["baseline_accuracy"]),
                classifier_accuracy=float(data["classifier_accuracy"]),
                bias_gain=tuple(float(b["gain"]) for b in bias),
                weight_gain=MappingProxyType(weights),
                train_samples=int(data["train_samples"]), eval_samples=int(data["eval_samples"]),
                elapsed_s=float(data["elapsed_s"]), family=str(data.get("family", "")),
                family_version=str(data.get("family_version", "")),
                subnet=dict(data.get("subnet", {})), data=dict(data.get("data", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise TrainingError(f"malformed contributions: {exc!r}") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> Contributions:
        """Parse a JSON document."""
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise TrainingError(f"contributions are not JSON: {exc}") from None


Progress = Callable[[int, int, str], None]


def analysed_layers(qgraph: QuantizedGraph, blocks: int) -> dict[str, Position]:
    """Layer name -> position of the convs in the last `blocks` blocks and the head."""
    pos = positions(qgraph.graph)
    return {name: p for name, p in pos.items()
            if p.role in ANALYSED_ROLES and p.block_from_end <= blocks}


class _Runner:
    """Fine-tunes one scheme at a time from the same start on cached frozen prefixes.

    The prefix up to the analysis region is computed once per sample; each run starts at its
    own first trained layer, from prefixes extended to there (and memoized per layer).
    """

    def __init__(self, qgraph: QuantizedGraph, train: Samples, evaluation: Samples,
                 start: int, steps: int, seed: int, probe: Trainer) -> None:
        self.qgraph, self.train, self.evaluation = qgraph, train, evaluation
        self.caches: dict[int, tuple[list[Boundary], list[Boundary]]] = {
            start: (probe.prefixes(train.images, start),
                    probe.prefixes(evaluation.images, start))}
        self.probe = probe
        self.order = np.random.default_rng(seed).permutation(
            np.resize(np.arange(len(train.labels)), steps))

    def _cache(self, start: int) -> tuple[list[Boundary], list[Boundary]]:
        if start not in self.caches:
            base = max(s for s in self.caches if s <= start)
            train, ev = self.caches[base]
            self.caches[start] = (self.probe.advance(train, base, start),
                                  self.probe.advance(ev, base, start))
        return self.caches[start]

    def prepare(self, scheme: SparseUpdateScheme) -> None:
        """Compute the prefixes a run of `scheme` starts from."""
        self._cache(resolve(scheme, self.qgraph.graph).region_start)

    def accuracy(self, scheme: SparseUpdateScheme) -> float:
        """Held-out accuracy after training `scheme` for the run's steps."""
        trainer = Trainer(self.qgraph, scheme, check=False)
        start = trainer.resolved.region_start
        train, ev = self._cache(start)
        for i in self.order:
            trainer.step(None, int(self.train.labels[i]), train[i], start)
        return trainer.accuracy(ev, list(self.evaluation.labels), start)


_RUNNER: _Runner | None = None  # the forked workers' runner (inherited, never pickled)


def _run_in_worker(scheme: SparseUpdateScheme) -> float:
    assert _RUNNER is not None
    return _RUNNER.accuracy(scheme)


def _run_all(runner: _Runner, runs: list[tuple[str, SparseUpdateScheme]], workers: int,
             progress: Callable[[str], None]) -> list[float]:
    """Accuracy of every run, in order; on `workers` forked processes when more than one."""
    if workers <= 1 or len(runs) <= 1:
        out = []
        for label, scheme in runs:
            progress(label)
            out.append(runner.accuracy(scheme))
        return out
    for _, scheme in runs:  # prefixes once, in the parent, for every worker to inherit
        runner.prepare(scheme)
    global _RUNNER
    _RUNNER = runner
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = []
            for (label, _), acc in zip(runs, pool.imap(_run_in_worker,
                                                       [s for _, s in runs]), strict=True):
                progress(label)
                results.append(acc)
            return results
    finally:
        _RUNNER = None


def analyze(qgraph: QuantizedGraph, train: Samples, evaluation: Samples,
            settings: AnalysisSettings = AnalysisSettings(),
            progress: Progress | None = None, workers: int = 1) -> Contributions:
    """Run the analysis runs of the module docstring on `qgraph`.

    With several learning rates in `settings.lrs`, the biases of all analysed convs are
    trained at each first and the best rate is used for every run (recorded in the result).
    Runs are independent and deterministic: `workers` > 1 runs them in forked processes
    with the same results.
    """
    with one_blas_thread():
        return _analyze(qgraph, train, evaluation, settings, progress, workers)


def _analyze(qgraph: QuantizedGraph, train: Samples, evaluation: Samples,
             settings: AnalysisSettings, progress: Progress | None,
             workers: int) -> Contributions:
    started = time.monotonic()
    graph = qgraph.graph
    layers = analysed_layers(qgraph, settings.blocks)
    if not layers:
        raise TrainingError(f"graph {graph.name}: no conv layer in the last {settings.blocks} "
                            "blocks to analyse")
    index = {layer.name: i for i, layer in enumerate(graph.layers)}
    start = min(index[name] for name in layers)
    depth = sum(1 for layer in conv_layers(graph) if index[layer.name] >= start)
    base = SparseUpdateScheme(classifier=settings.classifier, lr=settings.lrs[0])
    probe = Trainer(qgraph, replace(base, bias_layers=depth), check=False)
    runner = _Runner(qgraph, train, evaluation, start, settings.steps, settings.seed, probe)
    baseline = probe.accuracy(runner.caches[start][1], list(evaluation.labels), start)
    by_pos = sorted(layers.items(), key=lambda item: item[1].sort_key())
    total = (len(settings.lrs) if len(settings.lrs) > 1 else 0) + 1 + depth + len(
        by_pos) * len(settings.ratios)
    done = 0

    def tick(label: str) -> None:
        nonlocal done
        if progress is not None:
            progress(done, total, label)
        done += 1

    lr = settings.lrs[0]
    if len(settings.lrs) > 1:
        tried = _run_all(runner, [(f"lr {rate:g}", replace(base, bias_layers=depth, lr=rate))
                                  for rate in settings.lrs], workers, tick)
        lr = max(zip(tried, settings.lrs, strict=True), key=lambda pair: (pair[0], -pair[1]))[1]
    base = replace(base, lr=lr)
    runs = [("classifier", base)]
    runs += [(f"bias {k}", replace(base, bias_layers=k)) for k in range(1, depth + 1)]
    runs += [(f"{p.key} {r:g}", replace(base, weights=(WeightUpdate(name, r),)))
             for name, p in by_pos for r in settings.ratios]
    accuracy = dict(zip((label for label, _ in runs), _run_all(runner, runs, workers, tick),
                        strict=True))
    ref = accuracy["classifier"]
    bias = tuple(accuracy[f"bias {k}"] - ref for k in range(1, depth + 1))
    weights = {(p, r): accuracy[f"{p.key} {r:g}"] - ref for _, p in by_pos
               for r in settings.ratios}
    if progress is not None:
        progress(total, total, "done")
    return Contributions(graph=graph.name, settings=replace(settings, lrs=(lr,)),
                         baseline_accuracy=baseline, classifier_accuracy=ref, bias_gain=bias,
                         weight_gain=MappingProxyType(weights), train_samples=len(train.labels),
                         eval_samples=len(evaluation.labels),
                         elapsed_s=time.monotonic() - started)
