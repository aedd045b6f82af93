"""The ONNX importer is never silently wrong: the backend node tests and Conv->op composites.

For every operator the importer supports, the ONNX backend node tests the installed `onnx`
wheel generates (the cases `onnx.backend.test.case.node.collect_testcases(op)` returns, built
by importing each operator's test module) are imported and run by `firmware.float_exec`: the
output must match the test's expected output (within 1e-5 of its scale), or the import must
raise a refusal that names an op type, an attribute or a value of the model; never wrong
numbers, never a dropped output. A node test's inputs after the first become initializers
(the importer takes weights, pads, shapes... only as constants); the first stays the
activation.

The node tests rarely have the importer's (1, C, H, W) input or a Conv for Relu, BN or a
constant Add to fuse into, so composites of our own put a Conv (or two) in front of each
fused op and compare with `onnx.reference.ReferenceEvaluator`.
"""

from __future__ import annotations

import importlib
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from firmware.errors import FirmwareError
from firmware.float_exec import run_graph
from firmware.frontend.onnx_import import import_onnx
from firmware.frontend.onnx_ops import SUPPORTED_OPS, refused_ops

pytestmark = pytest.mark.unit

# The module of onnx.backend.test.case.node that generates each supported op's node tests.
NODE_TEST_MODULES = {
    "Conv": "conv", "BatchNormalization": "batch_normalization", "Relu": "relu",
    "Clip": "clip", "Add": "add", "GlobalAveragePool": "globalaveragepool",
    "ReduceMean": "reducemean", "AveragePool": "averagepool", "MaxPool": "maxpool",
    "Gemm": "gemm", "MatMul": "matmul", "Flatten": "flatten", "Reshape": "reshape",
    "Pad": "pad", "Concat": "concat", "Identity": "identity", "Constant": "constant",
    "Shape": "shape",
}
# The expected outputs are float32 sums in the host BLAS's order (a per-CPU kernel), ours
# float64: their difference scales with the output's magnitude, so the absolute tolerance does
# too (1e-5 of the largest expected value; a real import bug is off by far more).
RTOL = 1e-5
ATOL = 1e-5


@dataclass(frozen=True)
class Outcome:
    """What importing one model did: matched the expected output, or refused (and why)."""

    matched: bool
    refusal: str | None = None
    problem: str | None = None  # set when it is neither a match nor a proper refusal


def _names(model: onnx.ModelProto) -> set[str]:
    """What a refusal may name: op types, attribute names, input/output value names."""
    graph = model.graph
    names = {n.op_type for n in graph.node}
    names |= {a.name for n in graph.node for a in n.attribute}
    names |= {v.name for v in (*graph.input, *graph.output)}
    return names


def check(model: onnx.ModelProto, x: np.ndarray, expected: list[np.ndarray]) -> Outcome:
    """Import `model` and compare float_exec's output with `expected` (or judge the refusal)."""
    try:
        graph = import_onnx(model)
    except FirmwareError as exc:
        message = str(exc)
        named = sorted(n for n in _names(model) if n and n in message)
        return Outcome(False, message, None if named else f"refusal names nothing: {message}")
    if len(expected) != 1:
        return Outcome(False, problem=f"{len(expected)} outputs accepted: all but one dropped")
    want = np.asarray(expected[0])
    got = run_graph(graph, np.asarray(x, np.float64)[None] if x.ndim == 3 else x,
                    dtype=np.float64)
    if got.size != want.size:
        return Outcome(False, problem=f"output of {got.size} values, expected {want.shape}")
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    if not np.allclose(got.reshape(want.shape), want, rtol=RTOL, atol=ATOL * scale):
        error = float(np.max(np.abs(got.reshape(want.shape) - want)))
        return Outcome(False, problem=f"wrong numbers: max error {error:.3g}")
    return Outcome(True)


def _constant_inputs(model: onnx.ModelProto, inputs: list[np.ndarray]) -> onnx.ModelProto:
    """The model with every graph input after the first turned into an initializer."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    if not graph.input:
        return model
    keep = graph.input[0]
    for value, data in zip(list(graph.input)[1:], inputs[1:], strict=False):
        graph.initializer.append(numpy_helper.from_array(np.asarray(data), value.name))
    del graph.input[:]
    graph.input.append(keep)
    return model


@pytest.fixture(scope="module")
def node_cases() -> list[Any]:
    """The installed onnx wheel's node tests of every supported operator."""
    import onnx.backend.test.case.node as node_tests

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for module in NODE_TEST_MODULES.values():
            importlib.import_module(f"onnx.backend.test.case.node.{module}")
    return [case for case in node_tests._NodeTestCases
            if {n.op_type for n in case.model.graph.node} & set(SUPPORTED_OPS)]


def test_every_supported_op_has_node_tests() -> None:
    assert set(NODE_TEST_MODULES) == set(SUPPORTED_OPS)


def test_node_tests_match_or_are_refused_by_name(node_cases: list[Any]) -> None:
    problems, matched, refused = [], Counter[str](), Counter[str]()
    for case in node_cases:
        inputs, outputs = case.data_sets[0]
        model = _constant_inputs(case.model, list(inputs))
        if not inputs:  # e.g. a lone Constant: no activation at all
            outcome = check(model, np.zeros((1, 1, 1, 1), np.float32), list(outputs))
        else:
            outcome = check(model, np.asarray(inputs[0]), list(outputs))
        op = case.model.graph.node[0].op_type if len(case.model.graph.node) == 1 else "composite"
        (matched if outcome.matched else refused)[op] += 1
        if outcome.problem:
            problems.append(f"{case.name}: {outcome.problem}")
    assert not problems, "\n".join(problems)
    # Not a test that passes by refusing everything: these ops' own node tests import.
    assert sum(matched.values()) >= 20, (matched, refused)
    for op in ("Conv", "AveragePool", "MaxPool", "GlobalAveragePool", "Identity"):
        assert matched[op] >= 1, (op, matched, refused)


# --- Conv -> op composites, against onnx.reference -------------------------------------

C, H, W = 4, 6, 5  # W != C, so that a (C,) constant cannot pass for a per-channel bias
RNG = np.random.default_rng(7)


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _conv(out: str = "c", src: str = "x", name: str = "conv", **attrs: Any) -> onnx.NodeProto:
    return helper.make_node("Conv", [src, "w", "b"], [out], name=name, pads=[1, 1, 1, 1],
                            **attrs)


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto] | None = None,
           outputs: tuple[str, ...] = ("y",), opset: int = 13,
           size: tuple[int, int] = (H, W)) -> onnx.ModelProto:
    base = [_init("w", RNG.normal(size=(C, C, 3, 3)).astype(np.float32)),
            _init("b", RNG.normal(size=C).astype(np.float32))]
    graph = helper.make_graph(
        nodes, "composite", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                           [1, C, *size])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        base + (inits or []))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=8)


def _f32(*shape: int) -> np.ndarray:
    return RNG.normal(size=shape).astype(np.float32)


def _bn(opset_training: bool = False) -> tuple[list[onnx.TensorProto], dict[str, Any]]:
    inits = [_init("gamma", RNG.uniform(0.5, 1.5, C).astype(np.float32)),
             _init("beta", _f32(C)), _init("mean", _f32(C)),
             _init("var", RNG.uniform(0.5, 1.5, C).astype(np.float32))]
    return inits, ({"training_mode": 1} if opset_training else {})


def _bn_node(src: str = "c", out: str = "y", **attrs: Any) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [src, "gamma", "beta", "mean", "var"], [out],
                            name="bn", epsilon=1e-3, **attrs)


def _add_const(shape: tuple[int, ...], value: np.ndarray | None = None,
               size: tuple[int, int] = (H, W)) -> onnx.ModelProto:
    const = _f32(*shape) if value is None else value
    return _model([_conv(), helper.make_node("Add", ["c", "k"], ["y"], name="add")],
                  [_init("k", const)], size=size)


def _per_channel_full() -> np.ndarray:
    return np.broadcast_to(_f32(1, C, 1, 1), (1, C, H, W)).copy()


def _dense(nodes: list[onnx.NodeProto], features: int = C, out: int = 3, opset: int = 13,
           **inits: np.ndarray) -> onnx.ModelProto:
    extra = {"m": _f32(features, out), "bias": _f32(out), **inits}
    return _model(nodes, [_init(k, v) for k, v in extra.items()], opset=opset)


def _gemm(src: str, **attrs: Any) -> onnx.NodeProto:
    return helper.make_node("Gemm", [src, "m", "bias"], ["y"], name="gemm", **attrs)


BN_INITS, _ = _bn()

COMPOSITES: dict[str, tuple[onnx.ModelProto, str | None]] = {
    # Conv -> BatchNormalization: folded in inference mode; training mode refused. (opset 15:
    # onnx.reference's BatchNormalization-9 applies batch statistics whenever `momentum` is
    # set, and fills its default, so it cannot check opsets 9-13; onnxruntime agrees with us.)
    "conv-bn": (_model([_conv(), _bn_node()], BN_INITS, opset=15), None),
    "conv-bn-training-mode-0": (_model([_conv(), _bn_node(training_mode=0)], BN_INITS,
                                       opset=15), None),
    "conv-bn-training": (_model([_conv(), _bn_node(training_mode=1)], BN_INITS, opset=15),
                         "training_mode"),
    "conv-bn-shared": (_model([_conv(), _bn_node(out="n"),
                               helper.make_node("Add", ["c", "n"], ["y"], name="add")],
                              BN_INITS), "BatchNormalization"),
    # Activations.
    "conv-relu": (_model([_conv(), helper.make_node("Relu", ["c"], ["y"])]), None),
    "conv-clip06": (_model([_conv(), helper.make_node("Clip", ["c", "lo", "hi"], ["y"])],
                           [_init("lo", np.float32(0)), _init("hi", np.float32(6))]), None),
    "conv-clip-min-only": (_model([_conv(), helper.make_node("Clip", ["c", "lo"], ["y"])],
                                  [_init("lo", np.float32(0))]), None),
    "conv-clip-attributes-opset6": (_model([_conv(), helper.make_node(
        "Clip", ["c"], ["y"], min=0.0, max=6.0)], opset=6), None),
    "conv-clip-other": (_model([_conv(), helper.make_node("Clip", ["c", "lo", "hi"], ["y"])],
                               [_init("lo", np.float32(-1)), _init("hi", np.float32(1))]),
                        "Clip"),
    "conv-dilated": (_model([_conv(out="y", dilations=[2, 2])]), "dilations"),
    # Constant Add: folded only where it is one value per channel. At 1 x C pixels, a (C,)
    # constant broadcasts over W and a (1, 1, H, W) one has C values: neither is a bias.
    "add-(C,)-at-W=C": (_add_const((C,), size=(1, C)), "Add"),
    "add-(1,1,H,W)-at-HW=C": (_add_const((1, 1, 1, C), size=(1, C)), "Add"),
    "add-(1,C,1,1)-at-HW=C": (_add_const((1, C, 1, 1), size=(1, C)), None),
    "add-(C,)-does-not-broadcast": (_add_const((C,)), "Add"),
    "add-(W,)-varies-over-W": (_add_const((W,)), "Add"),
    "add-(1,1,H,W)": (_add_const((1, 1, H, W)), "Add"),
    "add-(1,C,1,1)": (_add_const((1, C, 1, 1)), None),
    "add-(C,1,1)": (_add_const((C, 1, 1)), None),
    "add-scalar": (_add_const(()), None),
    "add-(1,)": (_add_const((1,)), None),
    "add-(1,C,H,W)-per-channel": (_add_const((1, C, H, W), _per_channel_full()), None),
    "add-(1,C,H,W)-varying": (_add_const((1, C, H, W)), "Add"),
    "add-(2,C,1,1)-grows-batch": (_add_const((2, C, 1, 1)), "Add"),
    # Add of two activations: same shape only.
    "add-residual": (_model([_conv(), helper.make_node("Add", ["x", "c"], ["y"])]), None),
    "add-broadcast-activations": (_model([
        _conv(), helper.make_node("GlobalAveragePool", ["c"], ["g"]),
        helper.make_node("Add", ["c", "g"], ["y"], name="add")]), "Add"),
    # Outputs: a second one (or MaxPool's Indices) would be dropped.
    "two-graph-outputs": (_model([_conv(), helper.make_node("Relu", ["c"], ["y"])],
                                 outputs=("y", "c")), "y"),
    "maxpool-indices-output": (_model([_conv(), helper.make_node(
        "MaxPool", ["c"], ["y", "idx"], kernel_shape=[2, 2])], outputs=("y", "idx")), "idx"),
    "maxpool-indices-read": (_model([_conv(), helper.make_node(
        "MaxPool", ["c"], ["p", "idx"], name="mp", kernel_shape=[2, 2]),
        helper.make_node("Cast", ["idx"], ["y"], to=TensorProto.FLOAT)]), "MaxPool"),
    # Pooling.
    "maxpool-pads": (_model([_conv(), helper.make_node(
        "MaxPool", ["c"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])]),
        None),
    "avgpool-count-include-pad": (_model([_conv(), helper.make_node(
        "AveragePool", ["c"], ["y"], kernel_shape=[3, 3], pads=[1, 0, 1, 1],
        count_include_pad=1)]), None),
    "avgpool-pad-excluded": (_model([_conv(), helper.make_node(
        "AveragePool", ["c"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]),
        "count_include_pad"),
    "avgpool-ceil-grows": (_model([_conv(), helper.make_node(
        "AveragePool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)]),
        "ceil_mode"),
    "gap-relu": (_model([_conv(), helper.make_node("GlobalAveragePool", ["c"], ["g"]),
                         helper.make_node("Relu", ["g"], ["y"])]), None),
    # Dense layers: 2-D input only (a Gemm on the 4-D pooled tensor is invalid ONNX).
    "gap-gemm-without-flatten": (_dense([
        _conv(), helper.make_node("GlobalAveragePool", ["c"], ["g"]), _gemm("g")]), "Gemm"),
    "gap-flatten-gemm": (_dense([
        _conv(), helper.make_node("GlobalAveragePool", ["c"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]), _gemm("f", alpha=0.5, beta=2.0)]), None),
    "flatten-gemm-transB-bias(1,N)": (_dense([
        _conv(), helper.make_node("Flatten", ["c"], ["f"]),
        _gemm("f", transB=1)], m=_f32(3, C * H * W), bias=_f32(1, 3)), None),
    "gemm-bias-(N,1)-grows": (_dense([
        _conv(), helper.make_node("GlobalAveragePool", ["c"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]), _gemm("f")], bias=_f32(3, 1)), "Gemm"),
    "reducemean-matmul-add": (_dense([
        _conv(), helper.make_node("ReduceMean", ["c"], ["r"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["r", "m"], ["mm"]),
        helper.make_node("Add", ["mm", "bias"], ["y"])]), None),
    "reducemean-keepdims-matmul": (_dense([
        _conv(), helper.make_node("ReduceMean", ["c"], ["r"], axes=[2, 3]),
        helper.make_node("MatMul", ["r", "m"], ["y"], name="mm")], features=1), "MatMul"),
    "reshape-gemm": (_dense([
        _conv(), helper.make_node("Reshape", ["c", "shape"], ["f"]), _gemm("f")],
        m=_f32(C * H * W, 3), shape=np.array([1, -1], np.int64)), None),
    "reshape-3d": (_dense([
        _conv(), helper.make_node("Reshape", ["c", "shape"], ["y"], name="rs")],
        shape=np.array([1, C, -1], np.int64)), "Reshape"),
    "shape-start-end-reshape": (_dense([
        _conv(), helper.make_node("Shape", ["c"], ["s"], end=1),
        helper.make_node("Concat", ["s", "minus1"], ["shape"], axis=0),
        helper.make_node("Reshape", ["c", "shape"], ["f"]), _gemm("f")],
        m=_f32(C * H * W, 3), minus1=np.array([-1], np.int64), opset=15), None),
    "flatten-axis2": (_model([_conv(), helper.make_node("Flatten", ["c"], ["y"], axis=2)]),
                      "Flatten"),
    # Pad absorbed by the next Conv: zero padding of H and W only.
    "pad-conv": (_model([helper.make_node("Pad", ["x", "pads"], ["p"]), _conv(src="p", out="y")],
                        [_init("pads", np.array([0, 0, 1, 2, 0, 0, 2, 0], np.int64))]), None),
    "pad-axes-conv-opset18": (_model([
        helper.make_node("Pad", ["x", "pads", "", "axes"], ["p"]), _conv(src="p", out="y")],
        [_init("pads", np.array([2, 1, 0, 3], np.int64)),
         _init("axes", np.array([2, 3], np.int64))], opset=18), None),
    "pad-value-1": (_model([helper.make_node("Pad", ["x", "pads", "v"], ["p"], name="pad"),
                            _conv(src="p", out="y")],
                           [_init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
                            _init("v", np.float32(1))]), "Pad"),
    "pad-reflect": (_model([helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
                            _conv(src="p", out="y")],
                           [_init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))]),
                    "Pad"),
    "pad-channels": (_model([helper.make_node("Pad", ["x", "pads"], ["p"]),
                             _conv(src="p", out="y")],
                            [_init("pads", np.array([0, 1, 0, 0, 0, 0, 0, 0], np.int64))]),
                     "Pad"),
    "pad-as-output": (_model([_conv(), helper.make_node("Pad", ["c", "pads"], ["y"])],
                             [_init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))]),
                      "Pad"),
    # Concat along channels only.
    "concat-channels": (_model([_conv(), helper.make_node("Concat", ["x", "c"], ["y"], axis=1)]),
                        None),
    "concat-width": (_model([_conv(), helper.make_node("Concat", ["x", "c"], ["y"], axis=3)]),
                     "Concat"),
}


@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_composite_matches_onnx_reference_or_is_refused(name: str) -> None:
    model, refusal = COMPOSITES[name]
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(11).normal(size=dims).astype(np.float32)
    if refusal is None:
        expected = ReferenceEvaluator(model).run(None, {"x": x})
        outcome = check(model, x, list(expected))
        assert outcome.matched, outcome
    else:
        outcome = check(model, x, [np.zeros(1)])
        assert outcome.refusal is not None and outcome.problem is None, outcome
        assert refusal in outcome.refusal, outcome.refusal


def test_refused_ops_are_listed() -> None:
    refused = refused_ops()
    assert "Sigmoid" in refused and "Mul" in refused and "ConvTranspose" in refused
    assert not set(refused) & set(SUPPORTED_OPS)
    assert len(refused) > 150


@pytest.mark.parametrize("op, attrs, opset", [
    ("Clip", {"min": 0.0, "max": 6.0}, 13),  # opset >= 11 takes min/max as inputs
    ("ReduceMean", {"axes": [2, 3]}, 18),  # opset >= 18 takes axes as an input
])
def test_an_attribute_outside_its_opset_is_refused_not_ignored(op: str, attrs: dict[str, Any],
                                                               opset: int) -> None:
    model = _model([_conv(), helper.make_node(op, ["c"], ["y"], name="n", **attrs)],
                   opset=opset)
    names = "|".join(attrs)
    with pytest.raises(FirmwareError, match=f"attribute ({names}) is not part of {op} at opset"):
        import_onnx(model)
