"""ONNX (and torch, through ONNX) to the IR.

The importer walks the nodes once, in order, and keeps three kinds of values: activations
(IR tensors), constants (initializers, `Constant` nodes and anything computed only from them)
and zero-padded activations waiting for the conv that absorbs the `Pad`. BatchNormalization is
folded into the conv before it, Relu/Clip become the fused activation of their producer, a
constant Add after a conv or MatMul becomes its bias. A node whose inputs are all constants
(the shape arithmetic torch emits for `F.pad` or `x.view(x.size(0), -1)`) is evaluated at
import with onnx's reference implementation. Any other op raises `UnsupportedOpError` naming
the node and its op type. Activations are per image: the batch axis must be 1.
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
from firmware.ir import Activation, Graph, Layer, OpKind, Tensor

if TYPE_CHECKING:
    import torch

FloatArray = npt.NDArray[np.float32]
Pads = tuple[int, int, int, int]  # (top, left, bottom, right)


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
            "Reshape": self._flatten, "Pad": self._pad, "Concat": self._concat,
            "Identity": self._identity, "Constant": self._constant, "Shape": self._shape}

    # ---- driving -------------------------------------------------------------------------
    def run(self) -> Graph:
        """Import every node and return the checked IR graph."""
        inputs = [v for v in self.graph.input if v.name not in self.const]
        if len(inputs) != 1:
            raise InvalidModelError(f"model must have one activation input, has {len(inputs)}")
        self._declare_input(inputs[0])
        for node in self.graph.node:
            self.node = node
            if node.input and all(not n or n in self.const for n in node.input):
                self._fold_constant()
                continue
            handler = self.handlers.get(node.op_type)
            if handler is None or node.domain not in ("", "ai.onnx"):
                raise UnsupportedOpError(f"node {node.name or '(unnamed)'}: op type "
                                         f"{node.op_type} is not supported")
            handler()
        out = self.graph.output[0].name
        if out not in self.act:
            raise InvalidModelError(f"graph output {out!r} is not an activation")
        return Graph(name=_safe_name(self.graph.name) or "onnx", input="input",
                     output=self.act[out], tensors=MappingProxyType(self.tensors),
                     layers=tuple(self.layers), params=MappingProxyType(self.params))

    def _declare_input(self, value: onnx.ValueInfoProto) -> None:
        dims = [d.dim_value if d.HasField("dim_value") else -1
                for d in value.type.tensor_type.shape.dim]
        if len(dims) != 4 or dims[0] not in (1, -1) or min(dims[1:]) < 1:
            raise UnsupportedOpError(f"input {value.name}: shape {dims} is not (1, C, H, W)")
        self.tensors["input"] = Tensor("input", dims[1], dims[2], dims[3])
        self.act[value.name] = "input"

    def _fail(self, why: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"node {self.node.name or '(unnamed)'}: op type "
                                  f"{self.node.op_type}: {why}")

    def _layer_name(self) -> str:
        base = _safe_name(self.node.name) or f"{self.node.op_type.lower()}{len(self.layers)}"
        name, k = base, 1
        while name in self.tensors:
            k += 1
            name = f"{base}_{k}"
        return name

    def _emit(self, op: OpKind, inputs: tuple[str, ...], shape: tuple[int, int, int],
              **fields: Any) -> Layer:
        name = self._layer_name()
        if min(shape) < 1:
            raise InvalidModelError(f"node {self.node.name}: output shape {shape} is empty")
        layer = Layer(name=name, op=op, inputs=inputs, output=name, **fields)
        self.tensors[name] = Tensor(name, *shape)
        self.layers.append(layer)
        self.act[self.node.output[0]] = name
        return layer

    def _activation_in(self, index: int = 0) -> str:
        name = self.node.input[index]
        if name in self.padded:
            raise self._fail("reads a Pad output; only Conv can absorb a Pad")
        if name not in self.act:
            raise self._fail(f"input {name!r} is not an activation")
        return self.act[name]

    def _is_const(self, index: int) -> bool:
        return len(self.node.input) > index and self.node.input[index] in self.const

    def _const_in(self, index: int) -> npt.NDArray[Any]:
        if not self._is_const(index):
            raise self._fail(f"input {index} must be a constant")
        return self.const[self.node.input[index]]

    def _set_const(self, value: npt.NDArray[Any]) -> None:
        self.const[self.node.output[0]] = np.asarray(value)

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
            x_name = self._activation_in(0)
        x = self.tensors[x_name]
        w = np.asarray(self._const_in(1), np.float32)
        if w.ndim != 4:
            raise self._fail(f"weight of rank {w.ndim}; only 2-D convolution is supported")
        if any(d != 1 for d in a.get("dilations", [1, 1])):
            raise self._fail(f"dilations {a['dilations']} (only 1)")
        groups = int(a.get("group", 1))
        if w.shape[1] * groups != x.channels or w.shape[0] % groups:
            raise InvalidModelError(f"node {self.node.name}: weight {w.shape} does not match "
                                    f"{x.channels} input channels in {groups} groups")
        kernel = (int(w.shape[2]), int(w.shape[3]))
        stride = tuple(int(s) for s in a.get("strides", [1, 1]))
        pads = self._pads(a, (x.height, x.width), kernel, (stride[0], stride[1]))
        pads = (pads[0] + extra[0], pads[1] + extra[1], pads[2] + extra[2], pads[3] + extra[3])
        ho = (x.height + pads[0] + pads[2] - kernel[0]) // stride[0] + 1
        wo = (x.width + pads[1] + pads[3] - kernel[1]) // stride[1] + 1
        bias = (np.asarray(self._const_in(2), np.float32) if len(self.node.input) > 2
                and self.node.input[2] else np.zeros(w.shape[0], np.float32))
        name = self._layer_name()
        self.params[f"{name}.weight"], self.params[f"{name}.bias"] = w, bias
        self._emit(OpKind.CONV, (x_name,), (int(w.shape[0]), ho, wo), kernel=kernel,
                   stride=(stride[0], stride[1]), padding=pads, groups=groups,
                   weight=f"{name}.weight", bias=f"{name}.bias")

    def _pads(self, a: dict[str, Any], size: tuple[int, int], kernel: tuple[int, int],
              stride: tuple[int, int]) -> Pads:
        """ONNX pads [top, left, bottom, right] or the auto_pad equivalent."""
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        if auto in ("NOTSET", ""):
            p = [int(v) for v in a.get("pads", [0, 0, 0, 0])]
            return (p[0], p[1], p[2], p[3])
        if auto == "VALID":
            return (0, 0, 0, 0)
        total = [max((-(-n // s) - 1) * s + k - n, 0) for n, k, s in zip(size, kernel, stride,
                                                                          strict=True)]
        small = [t // 2 for t in total]
        big = [t - t // 2 for t in total]
        if auto == "SAME_UPPER":
            return (small[0], small[1], big[0], big[1])
        return (big[0], big[1], small[0], small[1])

    def _batchnorm(self) -> None:
        idx = self._fusable_producer(self.node.input[0])
        if idx is None or self.layers[idx].op is not OpKind.CONV \
                or self.layers[idx].activation is not Activation.NONE:
            raise self._fail("only a BatchNormalization right after a Conv is supported")
        gamma, beta, mean, var = (np.asarray(self._const_in(i), np.float64) for i in (1, 2, 3, 4))
        scale = gamma / np.sqrt(var + float(_attrs(self.node).get("epsilon", 1e-5)))
        layer = self.layers[idx]
        assert layer.weight is not None and layer.bias is not None
        w, b = self.params[layer.weight], self.params[layer.bias]
        self.params[layer.weight] = (w * scale[:, None, None, None]).astype(np.float32)
        self.params[layer.bias] = ((b - mean) * scale + beta).astype(np.float32)
        self.act[self.node.output[0]] = layer.output

    def _fuse_activation(self, activation: Activation) -> None:
        idx = self._fusable_producer(self.node.input[0])
        if idx is None or self.layers[idx].activation is not Activation.NONE \
                or self.layers[idx].op is OpKind.RESHAPE:
            raise self._fail("the activation must follow a layer that is its only reader")
        self.layers[idx] = replace(self.layers[idx], activation=activation)
        self.act[self.node.output[0]] = self.layers[idx].output

    def _relu(self) -> None:
        self._fuse_activation(Activation.RELU)

    def _clip(self) -> None:
        a = _attrs(self.node)
        lo = float(self._const_in(1)) if self._is_const(1) else float(a.get("min", -np.inf))
        hi = float(self._const_in(2)) if self._is_const(2) else float(a.get("max", np.inf))
        if lo == 0.0 and hi == 6.0:
            self._fuse_activation(Activation.RELU6)
        elif lo == 0.0 and hi == np.inf:
            self._fuse_activation(Activation.RELU)
        else:
            raise self._fail(f"Clip({lo}, {hi}); only ReLU6 (0, 6) and ReLU (0, inf)")

    def _add(self) -> None:
        if self._is_const(0) or self._is_const(1):
            self._add_bias()
            return
        a, b = self._activation_in(0), self._activation_in(1)
        if self.tensors[a].shape != self.tensors[b].shape:
            raise self._fail(f"shapes {self.tensors[a].shape} and {self.tensors[b].shape} "
                             "differ (no broadcasting)")
        self._emit(OpKind.ADD, (a, b), self.tensors[a].shape)

    def _add_bias(self) -> None:
        k = 1 if self._is_const(1) else 0
        const = np.asarray(self._const_in(k), np.float32)
        idx = self._fusable_producer(self.node.input[1 - k])
        if idx is None or self.layers[idx].op not in (OpKind.CONV, OpKind.FULLY_CONNECTED) \
                or self.layers[idx].activation is not Activation.NONE:
            raise self._fail("a constant Add must follow a Conv, Gemm or MatMul")
        layer = self.layers[idx]
        assert layer.bias is not None
        channels = self.tensors[layer.output].channels
        if const.size not in (1, channels):
            raise self._fail(f"constant of shape {const.shape} is not a per-channel bias")
        self.params[layer.bias] = self.params[layer.bias] + const.reshape(-1)
        self.act[self.node.output[0]] = layer.output

    # ---- pooling, dense, shape ops -------------------------------------------------------
    def _global_pool(self) -> None:
        x = self.tensors[self._activation_in(0)]
        self._emit(OpKind.GLOBAL_AVG_POOL, (x.name,), (x.channels, 1, 1))

    def _reduce_mean(self) -> None:
        a = _attrs(self.node)
        axes = a.get("axes")
        if axes is None and self._is_const(1):
            axes = self._const_in(1).tolist()
        if axes is None or sorted(int(v) % 4 for v in axes) != [2, 3]:
            raise self._fail(f"ReduceMean over axes {axes}; only the spatial axes [2, 3]")
        self._global_pool()

    def _pool(self) -> None:
        a = _attrs(self.node)
        x = self.tensors[self._activation_in(0)]
        kernel = (int(a["kernel_shape"][0]), int(a["kernel_shape"][1]))
        stride = (int(a.get("strides", [1, 1])[0]), int(a.get("strides", [1, 1])[1]))
        pads = self._pads(a, (x.height, x.width), kernel, stride)
        if any(d != 1 for d in a.get("dilations", [1, 1])):
            raise self._fail("dilated pooling")
        is_max = self.node.op_type == "MaxPool"
        if not is_max and any(pads) and not a.get("count_include_pad", 0):
            raise self._fail("AveragePool with padding excluded from the divisor")
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
        x = self.tensors[self._activation_in(0)]
        if weight.shape[1] != x.numel:
            raise InvalidModelError(f"node {self.node.name}: weight {weight.shape} does not "
                                    f"match {x.numel} input features")
        name = self._layer_name()
        self.params[f"{name}.weight"] = weight.astype(np.float32)
        self.params[f"{name}.bias"] = (np.zeros(weight.shape[0], np.float32) if bias is None
                                       else np.broadcast_to(bias, (weight.shape[0],))
                                       .astype(np.float32))
        self._emit(OpKind.FULLY_CONNECTED, (x.name,), (int(weight.shape[0]), 1, 1),
                   weight=f"{name}.weight", bias=f"{name}.bias")

    def _gemm(self) -> None:
        a = _attrs(self.node)
        if a.get("transA", 0):
            raise self._fail("transA=1")
        w = np.asarray(self._const_in(1), np.float32) * float(a.get("alpha", 1.0))
        w = w if a.get("transB", 0) else w.T
        bias = (np.asarray(self._const_in(2), np.float32).reshape(-1) * float(a.get("beta", 1.0))
                if len(self.node.input) > 2 and self.node.input[2] else None)
        self._dense(np.ascontiguousarray(w), bias)

    def _matmul(self) -> None:
        w = np.asarray(self._const_in(1), np.float32)
        if w.ndim != 2:
            raise self._fail(f"MatMul by a rank-{w.ndim} constant")
        self._dense(np.ascontiguousarray(w.T), None)

    def _flatten(self) -> None:
        x = self.tensors[self._activation_in(0)]
        if self.node.op_type == "Reshape":
            shape = [int(v) for v in self._const_in(1)]
            if len(shape) != 2 or shape[0] not in (1, -1, 0) or shape[1] not in (-1, x.numel):
                raise self._fail(f"Reshape to {shape} is not a flatten to (1, {x.numel})")
        elif int(_attrs(self.node).get("axis", 1)) != 1:
            raise self._fail("Flatten with axis != 1")
        self._emit(OpKind.RESHAPE, (x.name,), (x.numel, 1, 1))

    def _pad(self) -> None:
        a = _attrs(self.node)
        mode = a.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        pads = [int(v) for v in (self._const_in(1) if self._is_const(1) else a.get("pads", []))]
        value = float(self._const_in(2)) if self._is_const(2) else float(a.get("value", 0.0))
        if mode != "constant" or value != 0.0 or len(pads) != 8 or any(pads[i] for i in
                                                                         (0, 1, 4, 5)):
            raise self._fail(f"only zero padding of H and W is supported (mode {mode}, "
                             f"value {value}, pads {pads})")
        self.padded[self.node.output[0]] = (self._activation_in(0),
                                            (pads[2], pads[3], pads[6], pads[7]))

    def _concat(self) -> None:
        if int(_attrs(self.node)["axis"]) % 4 != 1:
            raise self._fail("Concat of activations must be along channels (axis 1)")
        xs = [self.tensors[self._activation_in(i)] for i in range(len(self.node.input))]
        if len({x.shape[1:] for x in xs}) != 1:
            raise self._fail(f"spatial shapes {[x.shape for x in xs]} differ")
        self._emit(OpKind.CONCAT, tuple(x.name for x in xs),
                   (sum(x.channels for x in xs), xs[0].height, xs[0].width))

    def _identity(self) -> None:
        self.act[self.node.output[0]] = self._activation_in(0)

    # ---- constants (folded at import; torch emits them for static shapes) ----------------
    def _fold_constant(self) -> None:
        """Evaluate a node whose inputs are all constants (onnx's reference implementation)."""
        from onnx.reference import ReferenceEvaluator

        feeds = {n: self.const[n] for n in self.node.input if n}
        try:
            outputs = ReferenceEvaluator(self.node).run(None, feeds)
        except Exception as exc:  # the reference raises many types; name the node
            raise self._fail(f"cannot fold constant inputs: {exc}") from exc
        for name, value in zip(self.node.output, outputs, strict=False):
            self.const[name] = np.asarray(value)

    def _constant(self) -> None:
        a = _attrs(self.node)
        if "value" not in a:
            raise self._fail(f"Constant with attributes {sorted(a)}; only 'value'")
        self._set_const(numpy_helper.to_array(a["value"]))

    def _shape(self) -> None:
        x = self.tensors[self._activation_in(0)]
        self._set_const(np.array([1, *x.shape], np.int64))


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
