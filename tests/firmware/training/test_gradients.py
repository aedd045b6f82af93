"""The engine's fp32 gradients equal torch autograd's on the dequantized graph (every layer
kind, Hypothesis-drawn shapes); QAS scales them as its formula says."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from firmware.errors import InvalidModelError
from firmware.int8.quantize import QuantizedGraph
from firmware.ir import Activation, OpKind
from firmware.training.engine.trainer import Trainer
from firmware.training.scheme import ClassifierMode, SparseUpdateScheme, WeightUpdate
from tests.firmware.training.graphs import KINDS, Case, image, quantized
from tests.firmware.training.oracle import oracle

pytestmark = pytest.mark.unit


@st.composite
def cases(draw: st.DrawFn, kinds: tuple[str, ...] = KINDS) -> Case:
    kind = draw(st.sampled_from(kinds))
    kernel = draw(st.sampled_from((1, 3, 5) if kind in ("conv", "depthwise") else (2, 3)))
    if kind == "residual":
        kernel = 1
    pad = tuple(draw(st.integers(0, kernel // 2)) for _ in range(4))
    return Case(kind=kind, channels=draw(st.integers(1, 6)),
                out_channels=draw(st.integers(1, 6)), size=draw(st.integers(kernel, 9)),
                kernel=kernel, stride=draw(st.sampled_from((1, 2))),
                padding=pad if kind != "residual" else (0, 0, 0, 0),  # type: ignore[arg-type]
                activation=draw(st.sampled_from(list(Activation))),
                classes=draw(st.integers(2, 5)), seed=draw(st.integers(0, 10_000)))


def quantized_or_skip(case: Case) -> QuantizedGraph:
    """The case quantized; cases the quantizer refuses (a constant tensor whose range is
    empty, so a bias exceeds int32) are not cases for the engine."""
    try:
        return quantized(case)
    except InvalidModelError:
        assume(False)
        raise


def _everything(qgraph: object, fp32_head: bool, ratio: float = 1.0) -> SparseUpdateScheme:
    graph = qgraph.graph  # type: ignore[attr-defined]
    convs = [layer.name for layer in graph.layers if layer.op is OpKind.CONV]
    return SparseUpdateScheme(
        bias_layers=len(convs), weights=tuple(WeightUpdate(n, ratio) for n in convs),
        classifier=ClassifierMode.FP32 if fp32_head else ClassifierMode.INT8, lr=1e-3)


def _close(got: npt.NDArray[np.generic], want: npt.NDArray[np.generic], what: str) -> None:
    scale = max(1e-6, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-4, atol=2e-5 * scale,
                               err_msg=what)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), fp32_head=st.booleans(), label=st.integers(0, 1),
       ratio=st.sampled_from((0.25, 0.5, 1.0)))
def test_gradients_equal_torch_autograd(case: Case, fp32_head: bool, label: int,
                                        ratio: float) -> None:
    qgraph = quantized_or_skip(case)
    x = image(qgraph, case.seed)
    seen: dict[str, npt.NDArray[np.generic]] = {}
    trainer = Trainer(qgraph, _everything(qgraph, fp32_head, ratio),
                      probe=lambda name, value: seen.setdefault(name, value))
    head = qgraph.layers["classifier"]
    assert head.weight_q is not None and head.weight_scale is not None
    assert head.bias_q is not None
    want = oracle(qgraph, x, label, fp32_head,
                  (head.weight_q * head.weight_scale[:, None]).astype(np.float32),
                  (head.bias_q * head.weight_scale * head.inputs[0].scale).astype(np.float32))
    result = trainer.step(x, label)
    assert result.loss == pytest.approx(want.loss, rel=1e-5, abs=1e-6)
    spatial_flatten = case.kind == "fc-spatial"
    for tensor, grad in want.tensor_grads.items():
        if tensor == "input" or (tensor == "flatten" and spatial_flatten):
            continue  # the input trains nothing; a spatial flatten's order is the IR's (CHW)
        _close(seen[f"grad:{tensor}"], grad, f"d loss / d {tensor} ({case})")
    for layer in qgraph.graph.layers:
        if layer.weight is None:
            continue
        for which in ("weight", "bias"):
            name = f"{layer.name}.{which}"
            got = seen[f"real:{name}"]
            full = want.param_grads[name]
            expected = full if which == "bias" or layer.name == "classifier" else (
                full[:got.shape[0]] if layer.groups > 1 else full[:, :got.shape[1]])
            _close(got, expected, f"d loss / d {name} ({case})")


@pytest.mark.parametrize("qas", [True, False])
def test_quantization_aware_scaling_follows_its_formula(qas: bool) -> None:
    """One step moves each int8 master by -lr * G * s^-2 (QAS) or -lr * G, where G is the
    gradient with respect to the int8 tensor (weights: s = s_W; biases: s = s_W * s_x)."""
    case = Case("conv", 4, 5, 8, 3, 1, (1, 1, 1, 1), Activation.RELU6, 3, seed=7)
    qgraph = quantized(case)
    x = image(qgraph, 3)
    scheme = SparseUpdateScheme(bias_layers=2, weights=(WeightUpdate("mid", 0.5),),
                                classifier=ClassifierMode.INT8, lr=1e-2, qas=qas)
    trainer = Trainer(qgraph, scheme)
    before = {name: np.array(trainer.arena[f"master:{name}"])
              for name in ("mid.weight", "mid.bias", "classifier.weight", "stem.bias")}
    want = oracle(qgraph, x, 1, fp32_head=False)
    trainer.step(x, 1)
    for name, old in before.items():
        layer, which = name.rsplit(".", 1)
        ql = qgraph.layers[layer]
        assert ql.weight_scale is not None
        s = ql.weight_scale if which == "weight" else ql.weight_scale * ql.inputs[0].scale
        s = s.reshape((-1,) + (1,) * (old.ndim - 1))
        g = want.int8_param_grads[name]
        g = g[:, :old.shape[1]] if old.ndim == 4 else g
        expected = -scheme.lr * (g / s**2 if qas else g)
        # Weight masters are clipped to the int8 range: compare where no clip happened, to
        # float32 resolution (a master near 127 has an ulp of 7.6e-6).
        free = np.abs(old + expected) < 127 if which == "weight" else np.ones(old.shape, bool)
        step = np.array(trainer.arena[f"master:{name}"], np.float64) - old
        ulp = 2 * np.spacing(np.abs(old).astype(np.float32)).astype(np.float64)
        np.testing.assert_allclose(step[free], expected[free], rtol=1e-4, atol=ulp.max(),
                                   err_msg=name)
        assert free.mean() > 0.9
        # QAS makes the real-valued step what an fp32 step would be: -lr * dL/dW_real.
        real = want.param_grads[name]
        real = real[:, :old.shape[1]] if old.ndim == 4 else real
        if qas:
            np.testing.assert_allclose((step * s)[free], (-scheme.lr * real)[free], rtol=1e-4,
                                       atol=(ulp * s).max(), err_msg=f"{name} real step")
