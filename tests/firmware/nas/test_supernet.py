"""The search space, the elastic supernet, and extraction of subnets (torch, graph, ONNX)."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from firmware.float_exec import run_graph
from firmware.frontend.builtin import build_graph
from firmware.ir import OpKind
from firmware.nas.space import Arch, SearchSpace, SpaceError, compact_space, mcunet_space
from firmware.nas.supernet import Supernet, export_onnx, extract, recalibrate_bn
from tests.firmware.tiny_family import tiny_space

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("space", [mcunet_space(), compact_space(10, 1, (32, 48)), tiny_space()],
                         ids=lambda s: s.name)
def test_config_round_trips_to_the_same_arch(space: SearchSpace) -> None:
    rng = random.Random(0)
    for _ in range(100):
        arch = space.canonical(space.sample(rng))
        config = space.to_config(arch)
        assert space.arch_of(config) == arch
        assert config.input_size == (arch.resolution, arch.resolution)
        assert len(config.blocks) == 1 + sum(arch.depths) + (1 if space.last_block_channels
                                                             else 0)


def test_mcunet_space_has_the_papers_choices() -> None:
    space = mcunet_space()
    assert space.kernels == (3, 5, 7) and space.expand_ratios == (3, 4, 6)
    assert space.depths == (2, 3, 4) and space.widths == (0.5, 0.75, 1.0)
    assert space.resolutions[-1] == 256
    largest = space.to_config(space.largest())
    assert {b.kernel for b in largest.blocks[1:]} == {7}
    assert len(largest.blocks) == 1 + 5 * 4 + 1


def test_space_rejects_foreign_genes_and_configs() -> None:
    space = tiny_space()
    bad = dataclasses.replace(space.largest(), resolution=20)
    with pytest.raises(SpaceError, match="resolution 20"):
        space.to_config(bad)
    other = mcunet_space().to_config(mcunet_space().smallest())
    with pytest.raises(SpaceError, match="not a subnet"):
        space.arch_of(other)
    with pytest.raises(SpaceError, match="sorted"):
        dataclasses.replace(space, kernels=(5, 3))


def test_space_serializes() -> None:
    space = compact_space(5, 3, (96, 128))
    assert SearchSpace.from_dict(space.to_dict()) == space
    arch = space.sample(random.Random(1))
    assert Arch.from_dict(arch.to_dict()) == arch


def test_kernel_shrinks_by_centre_crop_then_transform() -> None:
    torch.manual_seed(0)
    net = Supernet(tiny_space())
    dw = net.slots[0].dw
    full = dw.weight[:5]
    assert torch.equal(dw.sliced(5, 7), full)
    # Identity transforms at start: the 5x5 kernel is the 7x7's centre.
    assert torch.equal(dw.sliced(5, 5), full[:, :, 1:6, 1:6])
    with torch.no_grad():
        dw.transforms[1].mul_(2.0)  # the 7 -> 5 step
    assert torch.allclose(dw.sliced(5, 5), 2 * full[:, :, 1:6, 1:6])
    assert torch.allclose(dw.sliced(5, 3), 2 * full[:, :, 2:5, 2:5])


def _randomize_bn(net: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)


@pytest.mark.parametrize("seed", range(4))
def test_extracted_subnet_computes_what_the_supernet_does(seed: int) -> None:
    torch.manual_seed(seed)
    space = tiny_space()
    net = Supernet(space)
    _randomize_bn(net)
    net.eval()
    arch = space.sample(random.Random(seed))
    module = extract(net, space.to_config(arch))
    x = torch.randn(3, 1, arch.resolution, arch.resolution)
    with torch.no_grad():
        assert torch.allclose(net(x, arch), module(x), atol=1e-5)


def test_extracted_layers_match_build_graph_and_run_the_same() -> None:
    torch.manual_seed(0)
    space = compact_space(10, 3, (32,))
    net = Supernet(space)
    _randomize_bn(net)
    net.eval()
    arch = space.sample(random.Random(3))
    module = extract(net, arch)
    graph = build_graph(module.config, params=module.folded_params())
    convs = [layer for layer in graph.layers if layer.op is OpKind.CONV]
    units = list(module.conv_layers())
    assert [name for name, _ in units] == [layer.name for layer in convs]
    for (_, unit), layer in zip(units, convs, strict=True):
        assert unit.conv.kernel_size == layer.kernel
        assert unit.conv.stride == layer.stride
        assert unit.conv.groups == layer.groups
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = module(x).numpy()
    got = run_graph(graph, x.numpy()).reshape(2, -1)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)


def test_onnx_export_runs_in_onnxruntime_and_imports_as_the_same_graph(tmp_path: Path) -> None:
    from firmware.frontend.onnx_import import import_onnx

    torch.manual_seed(0)
    space = tiny_space()
    net = Supernet(space)
    _randomize_bn(net)
    net.eval()
    arch = space.sample(random.Random(5))
    module = extract(net, arch)
    path = export_onnx(module, tmp_path / "subnet.onnx")
    x = torch.randn(1, 1, arch.resolution, arch.resolution)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, module(x).numpy(), rtol=1e-4, atol=1e-4)
    imported = import_onnx(path)
    built = build_graph(module.config, with_weights=False)
    assert ([(lay.op, lay.kernel, lay.stride, lay.groups) for lay in imported.layers]
            == [(lay.op, lay.kernel, lay.stride, lay.groups) for lay in built.layers])
    assert ([imported.tensor(lay.output).shape for lay in imported.layers]
            == [built.tensor(lay.output).shape for lay in built.layers])


def test_recalibrated_bn_holds_the_exact_batch_statistics() -> None:
    torch.manual_seed(0)
    space = tiny_space()
    net = Supernet(space)
    module = extract(net, space.smallest())
    data = [torch.randn(8, 1, 12, 12) * 3 + 1 for _ in range(3)]
    assert recalibrate_bn(module, data) == 24
    with torch.no_grad():
        stem_out = module.stem.conv(torch.cat(data))
    mean = stem_out.mean(dim=(0, 2, 3))
    assert module.stem.bn.running_mean is not None
    assert torch.allclose(module.stem.bn.running_mean, mean, atol=1e-4)
    assert not module.training
    with pytest.raises(ValueError, match="at least one batch"):
        recalibrate_bn(module, [])
