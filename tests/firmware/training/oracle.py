"""torch autograd on the dequantized graph: the oracle for the training engine's gradients.

Every tensor takes the int8 reference's value (dequantized), so that the oracle and the engine
see the same activations; each layer's real-valued function (conv, linear, add, pooling) is
attached to it by a straight-through estimator, and the gradient passes a clamp only where the
int8 output lies strictly inside it, the engine's rule (a rounding-free float graph would
clamp at slightly different places). Max pooling routes each window's gradient to its first
maximum in row-major order (torch.argmax's tie rule, made explicit so that ties in int8 data
cannot decide the comparison). Computed in float64.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from firmware.int8.quantize import QuantizedGraph
from firmware.int8.reference import run_image
from firmware.ir import OpKind
from firmware.training.positions import is_depthwise


@dataclass(frozen=True)
class OracleResult:
    """Loss, d loss / d tensor (HWC, real units) and d loss / d parameter (IR layout)."""

    loss: float
    tensor_grads: Mapping[str, npt.NDArray[np.float64]]
    param_grads: Mapping[str, npt.NDArray[np.float64]]
    int8_param_grads: Mapping[str, npt.NDArray[np.float64]]  # w.r.t. the int8 tensors


def _ste(linear: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    out = linear + (value - linear).detach()
    if mask is not None:
        out = torch.where(mask, out, out.detach())
    return out


def _max_pool_first(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                    padding: tuple[int, int, int, int]) -> torch.Tensor:
    t, left, b, r = padding
    xp = F.pad(x, (left, r, t, b), value=-torch.inf)
    n, c = xp.shape[:2]
    cols = F.unfold(xp, kernel, stride=stride)  # (N, C*kh*kw, L)
    cols = cols.reshape(n, c, kernel[0] * kernel[1], -1)
    idx = cols.argmax(dim=2, keepdim=True)
    picked = cols.gather(2, idx).squeeze(2)
    ho = (xp.shape[2] - kernel[0]) // stride[0] + 1
    return picked.reshape(n, c, ho, -1)


def oracle(qgraph: QuantizedGraph, x_hwc: npt.NDArray[np.int8], label: int,
           fp32_head: bool, head_weight: npt.NDArray[np.float32] | None = None,
           head_bias: npt.NDArray[np.float32] | None = None) -> OracleResult:
    """Loss and gradients of one image, as described in the module docstring."""
    graph = qgraph.graph
    ref = run_image(qgraph, x_hwc)
    env: dict[str, torch.Tensor] = {}
    leaves: dict[str, torch.Tensor] = {}
    wbar: dict[str, torch.Tensor] = {}

    def real(name: str) -> torch.Tensor:
        value = qgraph.tensors[name].dequantize(ref[name]).astype(np.float64)
        return torch.from_numpy(np.ascontiguousarray(value.transpose(2, 0, 1)))[None]

    env[graph.input] = real(graph.input)
    classifier = graph.producer(graph.output)
    assert classifier is not None
    for layer in graph.layers:
        ql = qgraph.layers[layer.name]
        xs = [env[t] for t in layer.inputs]
        value = real(layer.output)
        mask = None
        if layer.op in (OpKind.CONV, OpKind.FULLY_CONNECTED, OpKind.ADD):
            q = torch.from_numpy(ref[layer.output].astype(np.int64).transpose(2, 0, 1))[None]
            mask = (q > ql.act_min) & (q < ql.act_max)
        if layer.op in (OpKind.CONV, OpKind.FULLY_CONNECTED):
            assert ql.weight_q is not None and ql.weight_scale is not None
            assert ql.bias_q is not None
            w_int = torch.tensor(ql.weight_q.astype(np.float64), requires_grad=True)
            b_int = torch.tensor(ql.bias_q.astype(np.float64), requires_grad=True)
            s_w = torch.from_numpy(np.asarray(ql.weight_scale, dtype=np.float64))
            s_b = s_w * ql.inputs[0].scale
            weight = w_int * s_w.reshape((-1,) + (1,) * (w_int.ndim - 1))
            bias = b_int * s_b
            if layer.name == classifier.name and fp32_head:
                assert head_weight is not None and head_bias is not None
                weight = torch.tensor(head_weight.astype(np.float64), requires_grad=True)
                bias = torch.tensor(head_bias.astype(np.float64), requires_grad=True)
            else:
                wbar[f"{layer.name}.weight"], wbar[f"{layer.name}.bias"] = w_int, b_int
                weight.retain_grad()
                bias.retain_grad()
            leaves[f"{layer.name}.weight"], leaves[f"{layer.name}.bias"] = weight, bias
        if layer.op is OpKind.CONV:
            t, left, b, r = layer.padding
            xp = F.pad(xs[0], (left, r, t, b))
            groups = xs[0].shape[1] if is_depthwise(graph, layer) else 1
            linear = F.conv2d(xp, weight, bias, stride=layer.stride, groups=groups)
        elif layer.op is OpKind.FULLY_CONNECTED:
            linear = F.linear(xs[0].reshape(1, -1), weight, bias).reshape(1, -1, 1, 1)
            if layer.name == classifier.name and fp32_head:
                env[layer.output] = linear
                continue
        elif layer.op is OpKind.ADD:
            linear = xs[0] + xs[1]
        elif layer.op is OpKind.AVG_POOL:
            t, left, b, r = layer.padding
            linear = F.avg_pool2d(F.pad(xs[0], (left, r, t, b)), layer.kernel, layer.stride)
        elif layer.op is OpKind.MAX_POOL:
            linear = _max_pool_first(xs[0], layer.kernel, layer.stride, layer.padding)
        elif layer.op is OpKind.GLOBAL_AVG_POOL:
            linear = xs[0].mean(dim=(2, 3), keepdim=True)
        elif layer.op is OpKind.RESHAPE:
            # Exact, and in the IR's (C, H, W) order (the runtime's bytes are HWC).
            env[layer.output] = xs[0].reshape(1, -1, 1, 1)
            continue
        else:
            raise AssertionError(layer.op)
        env[layer.output] = _ste(linear, value, mask)
    for tensor in env.values():
        if tensor.requires_grad:
            tensor.retain_grad()
    logits = env[graph.output].reshape(1, -1)
    loss = F.cross_entropy(logits, torch.tensor([label]))
    loss.backward()  # type: ignore[no-untyped-call]
    grads = {}
    for name, tensor in env.items():
        if tensor.grad is not None:
            g = tensor.grad[0].numpy()
            shape = graph.tensor(name).shape
            grads[name] = g.reshape(shape).transpose(1, 2, 0)
    params = {name: leaf.grad.numpy() for name, leaf in leaves.items() if leaf.grad is not None}
    ints = {name: leaf.grad.numpy() for name, leaf in wbar.items() if leaf.grad is not None}
    return OracleResult(float(loss.detach()), grads, params, ints)
