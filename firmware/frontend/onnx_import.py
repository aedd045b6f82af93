"""ONNX (and torch, through ONNX) to the IR: exactly the function the model computes, or a refusal.

The importer walks the nodes once, in order, and keeps three kinds of values: activations
(IR tensors, with their ONNX shape: (1, C, H, W), or (1, N) after a flatten or a dense layer),
constants (initializers, `Constant` nodes and anything computed only from them) and
zero-padded activations waiting for the conv that absorbs the `Pad`. BatchNormalization is
folded into the conv before it, Relu/Clip become the fused activation of their producer, a
constant Add after a conv or dense layer becomes its bias. A node whose inputs are all
constants (the shape arithmetic torch emits for `F.pad` or `x.view(x.size(0), -1)`) is
evaluated at import with onnx's reference implementation.

Never silently wrong: an op, an attribute, a shape or a broadcast the IR cannot represent
exactly raises `UnsupportedOpError` naming the node, its op type and what is at fault
(firmware.frontend.onnx_ops lists the conditions and the refused operators); so does a second
graph output, which would otherwise be dropped. Activations are per image: the batch axis
must be 1, the input float32.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper

from firmware.errors import InvalidModelError, UnsupportedOpError
from firmware.frontend.onnx_ops import ATTRIBUTE_OPSETS, ATTRIBUTES, NONDETERMINISTIC_OPS
from firmware.ir import Activation, Graph, Layer, OpKind, Tensor

if TYPE_CHECKING:
    import torch

FloatArray = npt.NDArray[np.float32]
Pads = tuple[int, int, int, int]  # (top, left, bottom, right)
Shape = tuple[int, ...]  # an ONNX value's shape, batch (1) first


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _safe_name(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_.]+", "_", text.strip("/").replace("/", ".")).strip("_.")


class _Importer:
    """One pass over an ONNX graph, building IR layers and parameters."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                          13)
        self.const: dict[str, npt.NDArray[Any]] = {
            init.name: numpy_helper.to_array(init) for init in self.graph.initializer}
        self.act: dict[str, str] = {}  # ONNX value -> IR tensor
        self.shapes: dict[str, Shape] = {}  # ONNX value (activation) -> its ONNX shape
        self.padded: dict[str, tuple[str, Pads]] = {}  # ONNX value -> (IR tensor, pads)
        self.tensors: dict[str, Tensor] = {}
        self.layers: list[Layer] = []
        self.params: dict[str, FloatArray] = {}
        self.readers = Counter(name for node in self.graph.node for name in node.input if name)
        self.readers.update(o.name for o in self.graph.output)
        self.node: onnx.NodeProto = onnx.NodeProto()
        self.handlers: dict[str, Callable[[], None]] = {
            "Conv": self._conv, "BatchNormalization": self._batchnorm, "Relu": self._relu,
            "Clip": self._clip, "Add": self._add, "GlobalAveragePool": self._global_pool,
            "ReduceMean": self._reduce_mean, "AveragePool": self._pool, "MaxPool": self._pool,
            "Gemm": self._gemm, "MatMul": self._matmul, "Flatten": self._flatten,
            "Reshape": self._reshape, "Pad": self._pad, "Concat": self._concat,
            "Identity": self._identity, "Shape": self._shape}

    # ---- driving -------------------------------------------------------------------------
    def run(self) -> Graph:
        """Import every node and return the checked IR graph."""
        inputs = [v for v in self.graph.input if v.name not in self.const]
        if not inputs:
            outputs = ", ".join(o.name for o in self.graph.output)
            raise InvalidModelError(f"model has no activation input: its outputs ({outputs}) "
                                    "are constants")
        if len(inputs) != 1:
            names = ", ".join(v.name for v in inputs) or "none"
            raise InvalidModelError(f"model must have one activation input (1, C, H, W), has "
                                    f"{len(inputs)}: {names} (weights must be initializers)")
        self._declare_input(inputs[0])
        for node in self.graph.node:
            self.node = node
            if node.domain not in ("", "ai.onnx"):
                raise self._fail(f"domain {node.domain!r} is not supported")
            if node.op_type == "Constant" or (node.input and all(
                    not n or n in self.const for n in node.input)):
                self._fold_constant()
                continue
            handler = self.handlers.get(node.op_type)
            if handler is None:
                raise UnsupportedOpError(f"node {node.name or '(unnamed)'}: op type "
                                         f"{node.op_type} is not supported")
            self._check_attributes()
            self._check_extra_outputs()
            handler()
        return self._finish()

    def _finish(self) -> Graph:
        outputs = [o.name for o in self.graph.output]
        if len(outputs) != 1:
            raise UnsupportedOpError(f"graph outputs {outputs}: only one output is supported "
                                     "(the others would be dropped)")
        out = outputs[0]
        if out in self.padded:
            raise UnsupportedOpError(f"graph output {out!r} is a Pad output; only a Conv can "
                                     "absorb a Pad")
        if out not in self.act:
            raise InvalidModelError(f"graph output {out!r} is not an activation")
        return Graph(name=_safe_name(self.graph.name) or "onnx", input="input",
                     output=self.act[out], tensors=MappingProxyType(self.tensors),
                     layers=tuple(self.layers), params=MappingProxyType(self.params))

    def _declare_input(self, value: onnx.ValueInfoProto) -> None:
        tensor_type = value.type.tensor_type
        readers = sorted({n.op_type for n in self.graph.node if value.name in n.input})
        read_by = f" (read by {', '.join(readers)})" if readers else ""
        if tensor_type.elem_type != onnx.TensorProto.FLOAT:
            dtype = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
            raise UnsupportedOpError(f"input {value.name}: element type {dtype} is not "
                                     f"float32{read_by}")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
        if len(dims) != 4 or dims[0] not in (1, -1) or min(dims[1:]) < 1:
            raise UnsupportedOpError(f"input {value.name}: shape {dims} is not (1, C, H, W)"
                                     f"{read_by}")
        self.tensors["input"] = Tensor("input", dims[1], dims[2], dims[3])
        self.act[value.name] = "input"
        self.shapes[value.name] = (1, dims[1], dims[2], dims[3])

    def _fail(self, why: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"node {self.node.name or '(unnamed)'}: op type "
                                  f"{self.node.op_type}: {why}")

    def _check_attributes(self) -> None:
        known = ATTRIBUTES.get(self.node.op_type, frozenset())
        unknown = sorted(a.name for a in self.node.attribute if a.name not in known)
        if unknown:
            raise self._fail(f"attribute {', '.join(unknown)} is not supported")
        for attribute in self.node.attribute:
            first, end = ATTRIBUTE_OPSETS.get((self.node.op_type, attribute.name), (1, 10**6))
            if not first <= self.opset < end:
                raise self._fail(f"attribute {attribute.name} is not part of "
                                 f"{self.node.op_type} at opset {self.opset}")

    def _check_extra_outputs(self) -> None:
        """A node's optional outputs (MaxPool's Indices, ...) must not be used: not computed."""
        used = [name for name in self.node.output[1:] if name and self.readers[name]]
        if used:
            raise self._fail(f"output {', '.join(used)} (output 2 and later) is not supported")

    def _layer_name(self) -> str:
        base = _safe_name(self.node.name) or f"{self.node.op_type.lower()}{len(self.layers)}"
        name, k = base, 1
        while name in self.tensors:
            k += 1
            name = f"{base}_{k}"
        return name

    def _emit(self, op: OpKind, inputs: tuple[str, ...], shape: tuple[int, int, int],
              onnx_shape: Shape | None = None, **fields: Any) -> Layer:
        name = self._layer_name()
        if min(shape) < 1:
            raise InvalidModelError(f"node {self.node.name}: output shape {shape} is empty")
        layer = Layer(name=name, op=op, inputs=inputs, output=name, **fields)
        self.tensors[name] = Tensor(name, *shape)
        self.layers.append(layer)
        self._alias(name, onnx_shape or (1, *shape))
        return layer

    def _alias(self, tensor: str, shape: Shape) -> None:
        """This node's (first) output is the IR tensor `tensor` with ONNX shape `shape`."""
        self.act[self.node.output[0]] = tensor
        self.shapes[self.node.output[0]] = shape

    def _activation_in(self, index: int = 0, rank: int | None = None) -> str:
        name = self.node.input[index] if len(self.node.input) > index else ""
        if name in self.padded:
            raise self._fail("reads a Pad output; only Conv can absorb a Pad")
        if name not in self.act:
            raise self._fail(f"input {name!r} is not an activation")
        if rank is not None and len(self.shapes[name]) != rank:
            raise self._fail(f"input {name!r} has shape {self.shapes[name]}; a {rank}-D "
                             "input is needed")
        return self.act[name]

    def _shape_in(self, index: int = 0) -> Shape:
        return self.shapes[self.node.input[index]]

    def _is_const(self, index: int) -> bool:
        return len(self.node.input) > index and self.node.input[index] in self.const

    def _has_input(self, index: int) -> bool:
        return len(self.node.input) > index and bool(self.node.input[index])

    def _const_in(self, index: int) -> npt.NDArray[Any]:
        if not self._is_const(index):
            raise self._fail(f"input {index} must be a constant")
        return self.const[self.node.input[index]]

    def _scalar_in(self, index: int) -> float:
        value = self._const_in(index)
        if value.size != 1:
            raise self._fail(f"input {index} of shape {value.shape} must be a scalar")
        return float(value.reshape(-1)[0])

    def _float_in(self, index: int) -> FloatArray:
        value = self._const_in(index)
        if not np.issubdtype(value.dtype, np.floating):
            raise self._fail(f"input {index} has element type {value.dtype}, not float")
        return np.asarray(value, np.float32)

    def _fusable_producer(self, value: str) -> int | None:
        """Index of the layer writing ONNX value `value` if this node is its only reader."""
        tensor = self.act.get(value)
        if tensor is None or self.readers[value] != 1:
            return None
        idx = next((i for i, layer in enumerate(self.layers) if layer.output == tensor), None)
        return idx

    # ---- convolution and its fusions -----------------------------------------------------
    def _conv(self) -> None:
        a = _attrs(self.node)
        src = self.node.input[0]
        extra: Pads = (0, 0, 0, 0)
        if src in self.padded:
            x_name, extra = self.padded[src]
        else:
            x_name = self._activation_in(0, rank=4)
        x = self.tensors[x_name]
        w = self._float_in(1)
        if w.ndim != 4:
            raise self._fail(f"weight of rank {w.ndim}; only 2-D convolution is supported")
        if any(d != 1 for d in a.get("dilations", [1, 1])):
            raise self._fail(f"dilations {a['dilations']} (only 1)")
        if "kernel_shape" in a and list(a["kernel_shape"]) != list(w.shape[2:]):
            raise self._fail(f"kernel_shape {a['kernel_shape']} != weight {w.shape[2:]}")
        groups = int(a.get("group", 1))
        if groups < 1 or w.shape[1] * groups != x.channels or w.shape[0] % groups:
            raise InvalidModelError(f"node {self.node.name}: weight {w.shape} does not match "
                                    f"{x.channels} input channels in {groups} groups")
        kernel = (int(w.shape[2]), int(w.shape[3]))
        stride = self._pair(a, "strides")
        pads = self._pads(a, (x.height, x.width), kernel, stride)
        pads = (pads[0] + extra[0], pads[1] + extra[1], pads[2] + extra[2], pads[3] + extra[3])
        ho = (x.height + pads[0] + pads[2] - kernel[0]) // stride[0] + 1
        wo = (x.width + pads[1] + pads[3] - kernel[1]) // stride[1] + 1
        bias = (self._float_in(2) if self._has_input(2)
                else np.zeros(w.shape[0], np.float32))
        if bias.shape != (w.shape[0],):
            raise InvalidModelError(f"node {self.node.name}: bias {bias.shape} does not match "
                                    f"{w.shape[0]} output channels")
        name = self._layer_name()
        self.params[f"{name}.weight"], self.params[f"{name}.bias"] = w, bias
        self._emit(OpKind.CONV, (x_name,), (int(w.shape[0]), ho, wo), kernel=kernel,
                   stride=stride, padding=pads, groups=groups,
                   weight=f"{name}.weight", bias=f"{name}.bias")

    def _pair(self, a: dict[str, Any], key: str) -> tuple[int, int]:
        value = [int(v) for v in a.get(key, [1, 1])]
        if len(value) != 2 or min(value) < 1:
            raise self._fail(f"{key} {value}: two positive values needed (2-D)")
        return (value[0], value[1])

    def _pads(self, a: dict[str, Any], size: tuple[int, int], kernel: tuple[int, int],
              stride: tuple[int, int]) -> Pads:
        """ONNX pads [top, left, bottom, right] or the auto_pad equivalent."""
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        if auto in ("NOTSET", ""):
            p = [int(v) for v in a.get("pads", [0, 0, 0, 0])]
            if len(p) != 4 or min(p) < 0:
                raise self._fail(f"pads {p}: four non-negative values needed (2-D)")
            return (p[0], p[1], p[2], p[3])
        if auto == "VALID":
            return (0, 0, 0, 0)
        if auto not in ("SAME_UPPER", "SAME_LOWER"):
            raise self._fail(f"auto_pad {auto!r}")
        total = [max((-(-n // s) - 1) * s + k - n, 0) for n, k, s in zip(size, kernel, stride,
                                                                          strict=True)]
        small = [t // 2 for t in total]
        big = [t - t // 2 for t in total]
        if auto == "SAME_UPPER":
            return (small[0], small[1], big[0], big[1])
        return (big[0], big[1], small[0], small[1])

    def _batchnorm(self) -> None:
        a = _attrs(self.node)
        if int(a.get("training_mode", 0)) != 0:
            raise self._fail("attribute training_mode=1 (batch statistics) is not supported; "
                             "export the model in eval mode")
        if self.opset < 7 and int(a.get("is_test", 0)) != 1:
            raise self._fail("is_test=0 (training mode, opset < 7) is not supported")
        if int(a.get("spatial", 1)) != 1:
            raise self._fail("attribute spatial=0 (per-element statistics) is not supported")
        idx = self._fusable_producer(self.node.input[0])
        if idx is None or self.layers[idx].op is not OpKind.CONV \
                or self.layers[idx].activation is not Activation.NONE:
            raise self._fail("only a BatchNormalization right after a Conv is supported")
        gamma, beta, mean, var = (np.asarray(self._float_in(i), np.float64) for i in (1, 2, 3, 4))
        layer = self.layers[idx]
        assert layer.weight is not None and layer.bias is not None
        channels = self.tensors[layer.output].channels
        if any(v.shape != (channels,) for v in (gamma, beta, mean, var)):
            raise InvalidModelError(f"node {self.node.name}: statistics of shape {gamma.shape} "
                                    f"for {channels} channels")
        scale = gamma / np.sqrt(var + float(a.get("epsilon", 1e-5)))
        w, b = self.params[layer.weight], self.params[layer.bias]
        self.params[layer.weight] = (w * scale[:, None, None, None]).astype(np.float32)
        self.params[layer.bias] = ((b - mean) * scale + beta).astype(np.float32)
        self._alias(layer.output, self._shape_in(0))

    def _fuse_activation(self, activation: Activation) -> None:
        idx = self._fusable_producer(self.node.input[0])
        if idx is None or self.layers[idx].activation is not Activation.NONE \
                or self.layers[idx].op is OpKind.RESHAPE:
            raise self._fail("the activation must follow a layer that is its only reader")
        self.layers[idx] = replace(self.layers[idx], activation=activation)
        self._alias(self.layers[idx].output, self._shape_in(0))

    def _relu(self) -> None:
        self._fuse_activation(Activation.RELU)

    def _clip(self) -> None:
        a = _attrs(self.node)
        if self.opset >= 11:
            lo = self._scalar_in(1) if self._has_input(1) else -np.inf
            hi = self._scalar_in(2) if self._has_input(2) else np.inf
        else:
            lo, hi = float(a.get("min", -np.inf)), float(a.get("max", np.inf))
        if lo == 0.0 and hi == 6.0:
            self._fuse_activation(Activation.RELU6)
        elif lo == 0.0 and hi == np.inf:
            self._fuse_activation(Activation.RELU)
        elif lo == -np.inf and hi == np.inf:
            self._identity()
        else:
            raise self._fail(f"Clip({lo}, {hi}); only ReLU6 (0, 6) and ReLU (0, inf)")

    def _add(self) -> None:
        if self._is_const(0) or self._is_const(1):
            self._add_bias()
            return
        a, b = self._activation_in(0), self._activation_in(1)
        if self._shape_in(0) != self._shape_in(1):
            raise self._fail(f"shapes {self._shape_in(0)} and {self._shape_in(1)} differ "
                             "(no broadcasting)")
        self._emit(OpKind.ADD, (a, b), self.tensors[a].shape, self._shape_in(0))

    def _add_bias(self) -> None:
        """A constant Add folded into the bias of the Conv / dense layer before it.

        Exact only when the constant broadcasts to the activation's shape without changing it
        and is the same for every pixel (a (C,) constant, say, broadcasts over W, not C).
        """
        k = 1 if self._is_const(1) else 0
        const = np.asarray(self._float_in(k), np.float64)
        self._activation_in(1 - k)
        shape = self._shape_in(1 - k)
        try:
            broadcast = np.broadcast_shapes(shape, const.shape)
        except ValueError:
            broadcast = None
        if broadcast != shape:
            raise self._fail(f"constant of shape {const.shape} does not broadcast to the "
                             f"activation's {shape} without changing it")
        full = np.broadcast_to(const, shape)
        per_channel = full.reshape(shape[1], -1) if len(shape) == 4 else full.reshape(1, -1)
        if len(shape) == 4 and not np.all(per_channel == per_channel[:, :1]):
            raise self._fail(f"constant of shape {const.shape} varies over H and W; only a "
                             "per-channel bias can be folded")
        bias = per_channel[:, 0] if len(shape) == 4 else per_channel[0]
        idx = self._fusable_producer(self.node.input[1 - k])
        if idx is None or self.layers[idx].op not in (OpKind.CONV, OpKind.FULLY_CONNECTED) \
                or self.layers[idx].activation is not Activation.NONE:
            raise self._fail("a constant Add must follow a Conv, Gemm or MatMul")
        layer = self.layers[idx]
        assert layer.bias is not None
        self.params[layer.bias] = (self.params[layer.bias] + bias).astype(np.float32)
        self._alias(layer.output, shape)

    # ---- pooling, dense, shape ops -------------------------------------------------------
    def _global_pool(self, keepdims: bool = True) -> None:
        x = self.tensors[self._activation_in(0, rank=4)]
        self._emit(OpKind.GLOBAL_AVG_POOL, (x.name,), (x.channels, 1, 1),
                   (1, x.channels, 1, 1) if keepdims else (1, x.channels))

    def _reduce_mean(self) -> None:
        a = _attrs(self.node)
        if self.opset >= 18:
            axes = self._const_in(1).tolist() if self._has_input(1) else None
        else:
            axes = a.get("axes")
        self._activation_in(0, rank=4)
        if not axes or sorted(int(v) % 4 for v in axes) != [2, 3]:
            raise self._fail(f"ReduceMean over axes {axes}; only the spatial axes [2, 3]")
        self._global_pool(keepdims=bool(a.get("keepdims", 1)))

    def _pool(self) -> None:
        a = _attrs(self.node)
        x = self.tensors[self._activation_in(0, rank=4)]
        if len(a.get("kernel_shape", [])) != 2:
            raise self._fail(f"kernel_shape {a.get('kernel_shape')}: only 2-D pooling")
        kernel = (int(a["kernel_shape"][0]), int(a["kernel_shape"][1]))
        stride = self._pair(a, "strides")
        pads = self._pads(a, (x.height, x.width), kernel, stride)
        if any(d != 1 for d in a.get("dilations", [1, 1])):
            raise self._fail(f"dilations {a['dilations']} (only 1)")
        if max(pads[0], pads[2]) >= kernel[0] or max(pads[1], pads[3]) >= kernel[1]:
            raise self._fail(f"pads {pads} as large as the kernel {kernel}")
        is_max = self.node.op_type == "MaxPool"
        if not is_max and any(pads) and not a.get("count_include_pad", 0):
            raise self._fail("AveragePool with padding excluded from the divisor "
                             "(count_include_pad=0)")
        out = [(n + p0 + p1 - k) // s + 1 for n, p0, p1, k, s in
               zip((x.height, x.width), pads[:2], pads[2:], kernel, stride, strict=True)]
        if a.get("ceil_mode", 0):
            ceil = [-(-(n + p0 + p1 - k) // s) + 1 for n, p0, p1, k, s in
                    zip((x.height, x.width), pads[:2], pads[2:], kernel, stride, strict=True)]
            if ceil != out:
                raise self._fail("ceil_mode changes the output size")
        self._emit(OpKind.MAX_POOL if is_max else OpKind.AVG_POOL, (x.name,),
                   (x.channels, out[0], out[1]), kernel=kernel, stride=stride, padding=pads)

    def _dense(self, weight: FloatArray, bias: FloatArray | None) -> None:
        x = self.tensors[self._activation_in(0, rank=2)]
        if weight.shape[1] != x.numel:
            raise InvalidModelError(f"node {self.node.name}: weight {weight.shape} does not "
                                    f"match {x.numel} input features")
        outputs = int(weight.shape[0])
        if bias is not None:
            try:
                broadcast = np.broadcast_shapes(bias.shape, (1, outputs))
            except ValueError:
                broadcast = None
            if broadcast != (1, outputs):
                raise self._fail(f"bias C of shape {bias.shape} does not broadcast to the "
                                 f"output's (1, {outputs}) without changing it")
        name = self._layer_name()
        self.params[f"{name}.weight"] = weight.astype(np.float32)
        self.params[f"{name}.bias"] = (np.zeros(outputs, np.float32) if bias is None
                                       else np.broadcast_to(bias, (1, outputs))[0]
                                       .astype(np.float32))
        self._emit(OpKind.FULLY_CONNECTED, (x.name,), (outputs, 1, 1), (1, outputs),
                   weight=f"{name}.weight", bias=f"{name}.bias")

    def _gemm(self) -> None:
        a = _attrs(self.node)
        if a.get("transA", 0):
            raise self._fail("attribute transA=1 is not supported")
        self._activation_in(0, rank=2)
        w = self._float_in(1)
        if w.ndim != 2:
            raise self._fail(f"B of rank {w.ndim}; a 2-D constant is needed")
        w = w * np.float32(a.get("alpha", 1.0))
        w = w if a.get("transB", 0) else w.T
        bias = (self._float_in(2) * np.float32(a.get("beta", 1.0))
                if self._has_input(2) else None)
        self._dense(np.ascontiguousarray(w), bias)

    def _matmul(self) -> None:
        self._activation_in(0, rank=2)
        w = self._float_in(1)
        if w.ndim != 2:
            raise self._fail(f"MatMul by a rank-{w.ndim} constant")
        self._dense(np.ascontiguousarray(w.T), None)

    def _flatten_to(self, x_name: str, shape: Shape) -> None:
        """The activation `x_name` (ONNX shape `shape`) as (1, numel)."""
        if len(shape) == 2:
            self._alias(x_name, shape)
        else:
            x = self.tensors[x_name]
            self._emit(OpKind.RESHAPE, (x_name,), (x.numel, 1, 1), (1, x.numel))

    def _flatten(self) -> None:
        x_name = self._activation_in(0)
        shape = self._shape_in(0)
        axis = int(_attrs(self.node).get("axis", 1))
        axis = axis + len(shape) if axis < 0 else axis
        if axis not in (0, 1):  # at batch 1 both give (1, numel)
            raise self._fail(f"Flatten with axis {axis} of a {len(shape)}-D input; only a "
                             "flatten to (1, numel)")
        self._flatten_to(x_name, shape)

    def _reshape(self) -> None:
        x_name = self._activation_in(0)
        shape = self._shape_in(0)
        allow_zero = bool(_attrs(self.node).get("allowzero", 0))
        target = _reshape_target(shape, [int(v) for v in self._const_in(1)], allow_zero)
        numel = int(np.prod(shape))
        if target == shape:
            self._alias(x_name, shape)
        elif target == (1, numel):
            self._flatten_to(x_name, shape)
        else:
            raise self._fail(f"Reshape of {shape} to {target}; only a flatten to (1, {numel})")

    def _pad(self) -> None:
        a = _attrs(self.node)
        mode = a.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        x_name = self._activation_in(0, rank=4)
        if self.opset >= 11:
            pads = [int(v) for v in self._const_in(1)]
            value = self._scalar_in(2) if self._has_input(2) else 0.0
            if self._has_input(3):
                axes = [int(v) % 4 for v in self._const_in(3)]
                full = [0] * 8
                for i, axis in enumerate(axes):
                    full[axis], full[axis + 4] = pads[i], pads[i + len(axes)]
                pads = full
        else:
            pads = [int(v) for v in a.get("pads", [])]
            value = float(a.get("value", 0.0))
        if mode != "constant" or value != 0.0 or len(pads) != 8 or min(pads) < 0 \
                or any(pads[i] for i in (0, 1, 4, 5)):
            raise self._fail(f"only zero padding of H and W is supported (mode {mode}, "
                             f"value {value}, pads {pads})")
        self.padded[self.node.output[0]] = (x_name, (pads[2], pads[3], pads[6], pads[7]))

    def _concat(self) -> None:
        xs = [self.tensors[self._activation_in(i)] for i in range(len(self.node.input))]
        shapes = [self._shape_in(i) for i in range(len(self.node.input))]
        axis = int(_attrs(self.node)["axis"])
        axis = axis + len(shapes[0]) if axis < 0 else axis
        if axis != 1:
            raise self._fail(f"Concat along axis {axis}; only along channels (axis 1)")
        if len({len(s) for s in shapes}) != 1 or len({s[2:] for s in shapes}) != 1:
            raise self._fail(f"shapes {shapes} differ beyond the channels")
        shape = (1, sum(s[1] for s in shapes), *shapes[0][2:])
        self._emit(OpKind.CONCAT, tuple(x.name for x in xs),
                   (sum(x.channels for x in xs), xs[0].height, xs[0].width), shape)

    def _identity(self) -> None:
        self._alias(self._activation_in(0), self._shape_in(0))

    # ---- constants (folded at import; torch emits them for static shapes) ----------------
    def _fold_constant(self) -> None:
        """Evaluate a node whose inputs are all constants (onnx's reference implementation)."""
        from onnx.reference import ReferenceEvaluator

        if self.node.op_type in NONDETERMINISTIC_OPS:
            raise self._fail("random values cannot be folded into a deployed model")
        feeds = {n: self.const[n] for n in self.node.input if n}
        try:
            outputs = ReferenceEvaluator(self.node).run(None, feeds)
        except Exception as exc:  # the reference raises many types; name the node
            raise self._fail(f"cannot fold constant inputs: {exc}") from exc
        for name, value in zip(self.node.output, outputs, strict=False):
            self.const[name] = np.asarray(value)

    def _shape(self) -> None:
        self._activation_in(0)
        shape = self._shape_in(0)
        a = _attrs(self.node)
        start, end = int(a.get("start", 0)), a.get("end")
        self.const[self.node.output[0]] = np.array(
            shape[start:None if end is None else int(end)], np.int64)


def _reshape_target(shape: Shape, spec: list[int], allow_zero: bool) -> Shape:
    """ONNX Reshape's output shape: 0 copies the input's dim (unless allowzero), -1 infers."""
    numel = int(np.prod(shape))
    dims = [shape[i] if v == 0 and not allow_zero and i < len(shape) else v
            for i, v in enumerate(spec)]
    if dims.count(-1) == 1:
        known = int(np.prod([d for d in dims if d != -1]))
        dims[dims.index(-1)] = numel // known if known and numel % known == 0 else -2
    return tuple(dims)


def import_onnx(model: onnx.ModelProto | str | Path) -> Graph:
    """The IR graph of an ONNX model (a ModelProto or a path to a .onnx file)."""
    if not isinstance(model, onnx.ModelProto):
        path = Path(model)
        if not path.is_file():
            raise InvalidModelError(f"ONNX model {path} does not exist")
        try:
            model = onnx.load(str(path))
        except Exception as exc:  # onnx raises DecodeError and friends; name the file
            raise InvalidModelError(f"{path} is not an ONNX model: {exc}") from exc
    return _Importer(model).run()


def import_torch(module: torch.nn.Module, input_shape: tuple[int, int, int, int]) -> Graph:
    """The IR graph of a torch module, exported to ONNX in memory (eval mode, batch 1)."""
    import torch

    if input_shape[0] != 1:
        raise InvalidModelError(f"input shape {input_shape}: the batch must be 1")
    buffer = io.BytesIO()
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            # the TorchScript exporter (dynamo=False) writes to file-like objects too;
            # torch's annotation only names paths
            torch.onnx.export(module, (torch.zeros(input_shape),), buffer,  # type: ignore[arg-type]
                              dynamo=False, input_names=["input"], output_names=["output"])
    finally:
        module.train(was_training)
    model = onnx.load_from_string(buffer.getvalue())
    if not model.graph.name or model.graph.name == "main_graph":
        model.graph.name = type(module).__name__
    return import_onnx(model)
