"""The training memory model: hand-checked figures, the inference part equal to the planner's,
and the engine's tracked allocations equal to the model, buffer by buffer."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware.frontend.builtin import build_graph, builtin_config
from firmware.ir import OpKind
from firmware.plan.memory import MemoryModel, analyze
from firmware.training.engine.arena import Arena
from firmware.training.engine.trainer import Trainer
from firmware.training.errors import TrainingError
from firmware.training.memory import BufferKind, Mark, training_memory
from firmware.training.scheme import ClassifierMode, SparseUpdateScheme, WeightUpdate
from tests.firmware.small_models import tiny_inputs, tiny_quantized

pytestmark = pytest.mark.unit


def _image(seed: int = 1) -> np.ndarray:
    q = tiny_quantized()
    return np.ascontiguousarray(tiny_inputs(q, 1, seed)[0].transpose(1, 2, 0))


def test_forward_part_equals_the_inference_planner() -> None:
    graph = build_graph(builtin_config("mobilenetv2", 0.35, 128, 10), with_weights=False)
    for mm in MemoryModel:
        inference = analyze(graph, mm)
        report = training_memory(graph, SparseUpdateScheme(bias_layers=4), mm)
        assert report.inference_peak_bytes == inference.peak_bytes
        for row, layer in zip(report.layers, inference.layers, strict=True):
            assert row.forward_bytes - row.forward_training_bytes == layer.live_bytes, row.name


def test_classifier_only_by_hand() -> None:
    """tiny: head 24 channels at 4x4 -> pool -> 10 classes, fp32 head, batch 1."""
    graph = tiny_quantized().graph
    report = training_memory(graph, SparseUpdateScheme())
    master = 4 * (10 * 24 + 10)  # fp32 weights and bias of the classifier
    saved = 24  # the int8 features the weight gradient needs
    logits = 4 * 10  # fp32 logits, then their gradient
    grads = 4 * 10 * 24  # the weight gradient (the bias gradient is freed before it)
    assert report.persistent_bytes == master
    assert report.training_bytes == master + saved + logits + grads
    assert report.training_peak_at == "backward classifier"
    assert report.by_kind[BufferKind.WEIGHT_GRAD] == grads


def test_reordering_frees_gradients_and_ratios_cut_memory() -> None:
    graph = build_graph(builtin_config("mcunet-5fps", resolution=128, num_classes=10),
                        with_weights=False)
    sparse = SparseUpdateScheme(bias_layers=12, weights=(WeightUpdate("b13.project", 0.5),
                                                         WeightUpdate("b12.expand", 0.25)))
    reordered = training_memory(graph, sparse, reorder=True)
    plain = training_memory(graph, sparse, reorder=False)
    assert reordered.training_bytes < plain.training_bytes
    assert reordered.persistent_bytes == plain.persistent_bytes
    half = training_memory(graph, SparseUpdateScheme(weights=(WeightUpdate("b13.project", 0.5),)))
    full = training_memory(graph, SparseUpdateScheme(weights=(WeightUpdate("b13.project", 1.0),)))
    # b13.project is 576 -> 160: its master copy and gradient halve with r = 1/2.
    assert full.persistent_bytes - half.persistent_bytes == 4 * 160 * 288
    momentum = training_memory(graph, SparseUpdateScheme(bias_layers=3, momentum=0.9))
    assert momentum.persistent_bytes == 2 * training_memory(
        graph, SparseUpdateScheme(bias_layers=3)).persistent_bytes


SCHEMES = [
    SparseUpdateScheme(),
    SparseUpdateScheme(bias_layers=5, weights=(WeightUpdate("b3.project", 0.5),
                                               WeightUpdate("b3.dw", 0.25),
                                               WeightUpdate("b2.expand", 1.0))),
    SparseUpdateScheme(bias_layers=13, classifier=ClassifierMode.INT8, momentum=0.9,
                       weights=tuple(WeightUpdate(n, 1.0) for n in (
                           "stem", "b0.dw", "b1.expand", "b2.project", "head"))),
    SparseUpdateScheme(bias_layers=2, accumulate_steps=2,
                       weights=(WeightUpdate("head", 0.125),)),
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe()[:40])
@pytest.mark.parametrize("reorder", [True, False])
@pytest.mark.parametrize("memory_model", list(MemoryModel))
def test_tracked_allocations_equal_the_model(scheme: SparseUpdateScheme, reorder: bool,
                                             memory_model: MemoryModel) -> None:
    trainer = Trainer(tiny_quantized(), scheme, reorder=reorder, memory_model=memory_model)
    for step in range(2):
        trainer.step(_image(step + 1), label=3)
        if step == 0:
            # the engine's own allocations, in order, are the model's program, buffer by buffer
            assert trainer.arena.log == list(trainer.memory.program)
    assert trainer.arena.peak_bytes == trainer.memory.step_peak_bytes
    assert trainer.arena.training_peak_bytes == trainer.memory.training_bytes
    live = trainer.arena.live_bytes
    assert live == trainer.memory.persistent_bytes  # after a step only persistent buffers live


@settings(max_examples=15, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(bias=st.integers(0, 13), picks=st.lists(st.tuples(st.integers(0, 12),
                                                         st.sampled_from((0.125, 0.5, 1.0))),
                                               max_size=4),
       reorder=st.booleans(), head=st.sampled_from(list(ClassifierMode)))
def test_tracked_peak_equals_the_model_for_drawn_schemes(bias: int, picks: list[tuple[int, float]],
                                                         reorder: bool,
                                                         head: ClassifierMode) -> None:
    q = tiny_quantized()
    convs = [layer.name for layer in q.graph.layers if layer.op is OpKind.CONV]
    weights = tuple({convs[i]: WeightUpdate(convs[i], r) for i, r in picks}.values())
    trainer = Trainer(q, SparseUpdateScheme(bias_layers=bias, weights=weights, classifier=head),
                      reorder=reorder)
    trainer.step(_image(), label=1)
    assert trainer.arena.peak_bytes == trainer.memory.step_peak_bytes
    assert trainer.arena.training_peak_bytes == trainer.memory.training_bytes
    per_layer = {row.name: row.backward_bytes for row in trainer.memory.layers}
    assert max(per_layer.values()) <= trainer.memory.step_peak_bytes


def test_arena_refuses_what_the_model_did_not_plan() -> None:
    arena = Arena({"grad:x": 40})
    arena.alloc("grad:x", BufferKind.GRADIENT, (10,), np.float32)
    with pytest.raises(TrainingError, match="did not plan"):
        arena.alloc("grad:y", BufferKind.GRADIENT, (10,), np.float32)
    arena.free("grad:x")
    with pytest.raises(TrainingError, match="planned 40 B"):
        arena.alloc("grad:x", BufferKind.GRADIENT, (11,), np.float32)


def test_program_marks_every_layer_of_the_region() -> None:
    graph = tiny_quantized().graph
    report = training_memory(graph, SparseUpdateScheme(bias_layers=3))
    backward = [op.layer for op in report.program if isinstance(op, Mark)
                and op.phase.value == "backward"]
    assert backward == ["classifier", "flatten", "pool", "head", "b3.add", "b3.project",
                        "b3.dw"]
    assert math.isclose(sum(1 for op in report.program if isinstance(op, Mark)
                            and op.phase.value == "forward"), len(graph.layers))
