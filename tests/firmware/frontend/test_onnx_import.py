"""ONNX / torch import: shapes, folding, memory equal to the built-in graph, outputs equal torch."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from firmware.arch import BlockConfig, NetConfig, mobilenet_v2
from firmware.errors import InvalidModelError, UnsupportedOpError
from firmware.frontend.builtin import build_graph
from firmware.frontend.onnx_import import import_onnx, import_torch
from firmware.ir import Activation, OpKind
from firmware.plan.memory import MemoryModel, analyze
from firmware.plan.patch import plan_patches
from firmware.plan.patch_exec import execute, execute_patched

pytestmark = pytest.mark.unit


def _conv_bn(cin: int, cout: int, k: int, s: int, groups: int = 1, act: bool = True) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class Block(nn.Module):
    """torchvision's InvertedResidual, from a BlockConfig."""

    def __init__(self, cin: int, cfg: BlockConfig) -> None:
        super().__init__()
        hidden = cin * cfg.expand_ratio
        layers = [] if cfg.expand_ratio == 1 else [_conv_bn(cin, hidden, 1, 1)]
        layers += [_conv_bn(hidden, hidden, cfg.kernel, cfg.stride, hidden),
                   _conv_bn(hidden, cfg.out_channels, 1, 1, act=False)]
        self.body = nn.Sequential(*layers)
        self.residual = cfg.stride == 1 and cin == cfg.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class TorchNet(nn.Module):
    """A torch network with the layout of `firmware.frontend.builtin.build_graph(config)`."""

    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(config.in_channels, config.stem_channels,
                                            config.stem_kernel, config.stem_stride)]
        c = config.stem_channels
        for cfg in config.blocks:
            layers.append(Block(c, cfg))
            c = cfg.out_channels
        if config.head_channels:
            layers.append(_conv_bn(c, config.head_channels, 1, 1))
            c = config.head_channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c, config.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(
            self.features(x), 1), 1))


def _randomize_bn(net: nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)


def test_torch_mobilenetv2_imports_with_builtin_memory() -> None:
    config = mobilenet_v2(0.35, 96, num_classes=10)
    graph = import_torch(TorchNet(config), (1, 3, 96, 96))
    builtin = build_graph(config, with_weights=False)
    assert [layer.op for layer in graph.layers] == [layer.op for layer in builtin.layers]
    assert [graph.tensor(layer.output).shape for layer in graph.layers] == \
        [builtin.tensor(layer.output).shape for layer in builtin.layers]
    for model in MemoryModel:
        ours, ref = analyze(graph, model), analyze(builtin, model)
        assert (ours.peak_bytes, ours.macs, ours.weights_bytes) == \
            (ref.peak_bytes, ref.macs, ref.weights_bytes)
        assert [r.live_bytes for r in ours.layers] == [r.live_bytes for r in ref.layers]
    assert sum(layer.activation is Activation.RELU6 for layer in graph.layers) == \
        sum(layer.activation is Activation.RELU6 for layer in builtin.layers)


def test_imported_graph_computes_what_torch_computes() -> None:
    config = NetConfig("t", (29, 23), 8, (BlockConfig(3, 1, 1, 8), BlockConfig(5, 4, 2, 12),
                                         BlockConfig(7, 3, 1, 12)), 24, 5)
    net = TorchNet(config)
    _randomize_bn(net)
    net.eval()
    graph = import_torch(net, (1, 3, 29, 23))
    x = np.random.default_rng(0).standard_normal((3, 29, 23)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)[None]).numpy()[0]
    got = execute(graph, x)[graph.output].reshape(-1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    split = next(layer.name for layer in graph.layers if layer.op is OpKind.ADD)
    patched = execute_patched(graph, plan_patches(graph, 3, split), x)[graph.output]
    np.testing.assert_allclose(patched.reshape(-1), want, rtol=1e-4, atol=1e-4)


class Zoo(nn.Module):
    """Pad, max/avg pools, grouped conv, ReLU, Clip(0, 6) after an add, Concat, a view-flatten
    (Shape/Gather/Unsqueeze/Concat/Reshape in ONNX), ReduceMean, Gemm and a bias Add."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, 1, 0)
        self.b = nn.Conv2d(6, 6, 3, 1, 1, groups=3)
        self.c = nn.Conv2d(6, 4, 1)
        self.fc = nn.Linear(10 * 7 * 8, 7)
        self.fc2 = nn.Linear(10, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(nn.functional.pad(x, (1, 2, 1, 0))))
        y = nn.functional.max_pool2d(y, 3, 2, 1)
        y = torch.clamp(y + torch.relu(self.b(y)), 0, 6)
        y = torch.cat([nn.functional.avg_pool2d(y, 3, 1, 1), self.c(y)], dim=1)
        y = nn.functional.avg_pool2d(y, 2, 2)
        return self.fc(y.view(y.size(0), -1)) + self.fc2(y.mean(dim=(2, 3)))


def test_op_zoo_matches_torch() -> None:
    net = Zoo().eval()
    graph = import_torch(net, (1, 3, 31, 30))
    ops = {layer.op for layer in graph.layers}
    assert {OpKind.MAX_POOL, OpKind.AVG_POOL, OpKind.CONCAT, OpKind.ADD, OpKind.RESHAPE,
            OpKind.GLOBAL_AVG_POOL, OpKind.FULLY_CONNECTED} <= ops
    # the Pad folded into the conv: (top, left, bottom, right)
    assert graph.layers[0].padding == (1, 1, 0, 2)
    x = np.random.default_rng(1).standard_normal((3, 31, 30)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)[None]).numpy()[0]
    np.testing.assert_allclose(execute(graph, x)[graph.output].reshape(-1), want,
                               rtol=1e-4, atol=1e-4)


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_unsupported_op_names_node_and_type() -> None:
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")
    model = _model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv0"),
                    helper.make_node("Sigmoid", ["c"], ["y"], name="gate")], [w])
    with pytest.raises(UnsupportedOpError, match="node gate: op type Sigmoid"):
        import_onnx(model)


def test_clip_other_than_relu6_is_rejected() -> None:
    w = numpy_helper.from_array(np.ones((2, 2, 1, 1), np.float32), "w")
    lo = numpy_helper.from_array(np.array(-1.0, np.float32), "lo")
    hi = numpy_helper.from_array(np.array(1.0, np.float32), "hi")
    model = _model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv0"),
                    helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="clip0")],
                   [w, lo, hi])
    with pytest.raises(UnsupportedOpError, match=r"node clip0: op type Clip: Clip\(-1.0, 1.0\)"):
        import_onnx(model)


def test_onnx_file_path(tmp_path: object) -> None:
    from pathlib import Path
    path = Path(str(tmp_path)) / "m.onnx"
    w = numpy_helper.from_array(np.ones((2, 2, 3, 3), np.float32), "w")
    onnx.save(_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], [w]),
              str(path))
    graph = import_onnx(path)
    assert graph.tensor(graph.output).shape == (2, 8, 8)
    with pytest.raises(InvalidModelError, match="does not exist"):
        import_onnx(path.with_name("missing.onnx"))


def test_batchnorm_nodes_are_folded() -> None:
    import io

    config = NetConfig("bn", (19, 21), 8, (BlockConfig(3, 3, 2, 8), BlockConfig(5, 3, 1, 8)),
                       None, 4)
    net = TorchNet(config)
    _randomize_bn(net)
    net.eval()
    buffer = io.BytesIO()
    torch.onnx.export(net, (torch.zeros(1, 3, 19, 21),), buffer, dynamo=False,
                      training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    model = onnx.load_from_string(buffer.getvalue())
    assert any(node.op_type == "BatchNormalization" for node in model.graph.node)
    graph = import_onnx(model)
    assert len([la for la in graph.layers if la.op is OpKind.CONV]) == 1 + 3 + 3
    x = np.random.default_rng(2).standard_normal((3, 19, 21)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)[None]).numpy()[0]
    np.testing.assert_allclose(execute(graph, x)[graph.output].reshape(-1), want,
                               rtol=1e-4, atol=1e-4)


def test_matmul_with_bias_add_and_reduce_mean() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((2, 2, 3, 3)).astype(np.float32)
    m = rng.standard_normal((2, 5)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    model = _model([
        helper.make_node("Conv", ["x", "w"], ["c"], auto_pad="SAME_UPPER", strides=[2, 2]),
        helper.make_node("ReduceMean", ["c"], ["r"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["r", "m"], ["mm"]),
        helper.make_node("Add", ["mm", "bias"], ["y"])],
        [numpy_helper.from_array(a, n) for a, n in ((w, "w"), (m, "m"), (bias, "bias"))])
    graph = import_onnx(model)
    assert [la.op for la in graph.layers] == [OpKind.CONV, OpKind.GLOBAL_AVG_POOL,
                                             OpKind.FULLY_CONNECTED]
    x = rng.standard_normal((1, 2, 8, 8)).astype(np.float32)
    import onnxruntime as ort

    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0][0]
    np.testing.assert_allclose(execute(graph, x[0])[graph.output].reshape(-1), want,
                               rtol=1e-5, atol=1e-5)
