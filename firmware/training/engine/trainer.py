"""The training engine: one sparse-update step at a time on the real int8 graph.

Forward: every layer runs through `firmware.int8.reference.run_layer` with the current int8
weights, so activations are bit for bit what the C runtime computes. Loss: softmax
cross-entropy on the logits (the int8 logits dequantized, or the fp32 head's). Backward, in
fp32 on the dequantized graph: the gradient passes a clamp only where the int8 output lay
strictly inside it (a straight-through estimator of rounding; ReLU, ReLU6 and saturation
masks come from the stored 1-bit mask). Parameters are trained as int8 tensors with fp32
master copies (the int8 value is round(master)): the gradient with respect to the int8
tensor is G_W = s_W * dL/dW_real (bias: G_b = s_W * s_x * dL/db_real), and quantization-aware
scaling (QAS, the paper's Eq. 3) divides it by s_W^2 (bias: (s_W * s_x)^2) per output
channel, so that an int8 step moves the real weights as an fp32 step would. SGD (optional
momentum) updates the masters; masters are clipped to the int8 range [-127, 127].

The fp32 classifier head keeps real-valued master weights and trains without QAS; on export
(firmware.training.engine.export) it is quantized again, the only layer whose scales change.

Every buffer comes from an `Arena` checked against the memory model (firmware.training.memory),
so the bytes the engine holds are the model's. `Precision.FP32` runs the same steps on the
float graph (no rounding anywhere): the fp32 baseline of the QAS experiments.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

from firmware.int8.quantize import (
    QuantizedGraph,
    QuantLayer,
)
from firmware.ir import Layer, OpKind
from firmware.plan.memory import MemoryModel, lifetimes
from firmware.training.engine import kernels as K
from firmware.training.engine.arena import Arena
from firmware.training.engine.int8_forward import forward_batch, forward_layer
from firmware.training.engine.layout import (
    activation_bounds,
    fc_from_hwc,
    fc_to_hwc,
    hwc_shape,
)
from firmware.training.errors import TrainingError
from firmware.training.memory import (
    BufferKind,
    Phase,
    StepNeeds,
    TrainingMemoryReport,
    activation_groups,
    buffer_name,
    param_sizes,
    step_needs,
    training_memory,
)
from firmware.training.positions import is_depthwise
from firmware.training.scheme import ClassifierMode, SparseUpdateScheme, resolve

F32 = npt.NDArray[np.float32]
I8 = npt.NDArray[np.int8]
Probe = Callable[[str, npt.NDArray[np.generic]], None]
INT32_LIMIT = 2**31 - 1


class Precision(enum.Enum):
    """int8: the real quantized graph; fp32: the float graph (the baseline)."""

    INT8 = "int8"
    FP32 = "fp32"


@dataclass(frozen=True)
class StepResult:
    """Loss and whether the prediction (before the update) was right."""

    loss: float
    correct: bool


def _act(kind: BufferKind, what: str) -> str:
    return buffer_name(kind, what)


class Trainer:
    """Trains `qgraph` with `scheme`, one sample per `step` (see the module docstring).

    `check` makes the arena refuse buffers the memory model did not plan; `probe(name,
    value)`, when given, sees every activation gradient before it is freed ("grad:T") and
    every parameter's real-valued gradient ("real:P").
    """

    def __init__(self, qgraph: QuantizedGraph, scheme: SparseUpdateScheme, *,
                 memory_model: MemoryModel = MemoryModel.INPLACE, reorder: bool = True,
                 precision: Precision = Precision.INT8, check: bool = True,
                 probe: Probe | None = None) -> None:
        self.qgraph = qgraph
        self.graph = qgraph.graph
        self.scheme = scheme
        self.precision = precision
        self.resolved = resolve(scheme, self.graph)
        self.needs: StepNeeds = step_needs(self.resolved)
        self.reorder = reorder and scheme.accumulate_steps == 1
        self.memory: TrainingMemoryReport = training_memory(self.graph, self.resolved,
                                                            memory_model, reorder)
        self.groups = activation_groups(self.graph, memory_model)
        self.span = lifetimes(self.graph)
        self.index = {layer.name: i for i, layer in enumerate(self.graph.layers)}
        self.producer = {layer.output: layer for layer in self.graph.layers}
        self.probe = probe
        checked = check and precision is Precision.INT8
        self.arena = Arena(self.memory.buffers if checked else None)
        self.current: dict[str, QuantLayer] = dict(qgraph.layers)
        self._weights: dict[str, F32] = {}
        self.float_params = dict(self.graph.params)
        self.steps = 0
        self.logit_low = math.inf
        self.logit_high = -math.inf
        self._params = param_sizes(self.resolved)
        self._setup()

    # -- parameters --------------------------------------------------------------------------
    @property
    def fp32_head(self) -> bool:
        """True when the classifier trains in real units (fp32 head or fp32 baseline)."""
        return (self.precision is Precision.FP32
                or self.scheme.classifier is ClassifierMode.FP32)

    def _real_units(self, layer: str) -> bool:
        return self.precision is Precision.FP32 or (
            layer == self.resolved.classifier and self.fp32_head)

    def _slice(self, layer: Layer, full: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
        t = self.resolved.trainable[layer.name]
        if layer.op is OpKind.FULLY_CONNECTED:
            return full
        if is_depthwise(self.graph, layer):
            return full[:t.weight_channels]
        return full[:, :t.weight_channels]

    def _scales(self, layer: str) -> tuple[npt.NDArray[np.float64], float]:
        ql = self.qgraph.layers[layer]
        assert ql.weight_scale is not None
        return np.asarray(ql.weight_scale, dtype=np.float64), ql.inputs[0].scale

    def _real_weight(self, layer: Layer) -> F32:
        """The full weight tensor (IR layout) as the forward pass uses it, in real units."""
        cached = self._weights.get(layer.name)
        if cached is not None:
            return cached
        weight = self._compute_real_weight(layer)
        if not (self._real_units(layer.name) or self.precision is Precision.FP32):
            self._weights[layer.name] = weight  # int8 weights change only in _refresh
        return weight

    def _compute_real_weight(self, layer: Layer) -> F32:
        if self.precision is Precision.FP32:
            full = np.array(self.float_params[str(layer.weight)], dtype=np.float32)
            if layer.name in self.resolved.trainable and self._has_weight(layer.name):
                self._slice(layer, full)[...] = self.arena[self._master(layer.name,
                                                                          "weight")]
            return full
        if layer.name == self.resolved.classifier and self.fp32_head:
            return np.asarray(self.arena[self._master(layer.name, "weight")], dtype=np.float32)
        ql = self.current[layer.name]
        assert ql.weight_q is not None and ql.weight_scale is not None
        scale = np.asarray(ql.weight_scale).reshape((-1,) + (1,) * (ql.weight_q.ndim - 1))
        out: F32 = (ql.weight_q.astype(np.float64) * scale).astype(np.float32)
        return out

    def _real_bias(self, layer: Layer) -> F32:
        if self.precision is Precision.FP32:
            full = np.array(self.float_params[str(layer.bias)], dtype=np.float32)
            if self._has_bias(layer.name):
                full[...] = self.arena[self._master(layer.name, "bias")]
            return full
        if layer.name == self.resolved.classifier and self.fp32_head:
            return np.asarray(self.arena[self._master(layer.name, "bias")], dtype=np.float32)
        ql = self.current[layer.name]
        assert ql.bias_q is not None and ql.weight_scale is not None
        out: F32 = (ql.bias_q.astype(np.float64) * ql.weight_scale
                    * ql.inputs[0].scale).astype(np.float32)
        return out

    def _has_bias(self, layer: str) -> bool:
        t = self.resolved.trainable.get(layer)
        return t is not None and t.bias

    def _has_weight(self, layer: str) -> bool:
        t = self.resolved.trainable.get(layer)
        return t is not None and t.weight_channels > 0

    @staticmethod
    def _master(layer: str, which: str) -> str:
        return buffer_name(BufferKind.MASTER, f"{layer}.{which}")

    def _setup(self) -> None:
        self.arena.mark(Phase.SETUP)
        for param, numel in self._params:
            layer_name, which = param.rsplit(".", 1)
            layer = self.graph.layers[self.index[layer_name]]
            master = self.arena.alloc(self._master(layer_name, which), BufferKind.MASTER,
                                      self._param_shape(layer, which), np.float32)
            assert master.size == numel
            master[...] = self._initial(layer, which)
            if self.scheme.momentum > 0:
                self.arena.alloc(buffer_name(BufferKind.MOMENTUM, param), BufferKind.MOMENTUM,
                                 master.shape, np.float32)
            if self.scheme.accumulate_steps > 1:
                self.arena.alloc(buffer_name(BufferKind.WEIGHT_GRAD, param),
                                 BufferKind.WEIGHT_GRAD, master.shape, np.float32)

    def _param_shape(self, layer: Layer, which: str) -> tuple[int, ...]:
        if which == "bias":
            return (self.graph.tensor(layer.output).channels,)
        return self.resolved.weight_shape(layer.name)

    def _initial(self, layer: Layer, which: str) -> F32:
        if self.precision is Precision.FP32:
            full = np.asarray(self.float_params[str(getattr(layer, which))], dtype=np.float32)
            return np.asarray(full if which == "bias" else self._slice(layer, full), np.float32)
        ql = self.qgraph.layers[layer.name]
        assert ql.weight_q is not None and ql.bias_q is not None
        assert ql.weight_scale is not None
        if self._real_units(layer.name):  # the fp32 head starts from the dequantized int8 one
            if which == "bias":
                return (ql.bias_q * ql.weight_scale * ql.inputs[0].scale).astype(np.float32)
            return (ql.weight_q * ql.weight_scale[:, None]).astype(np.float32)
        if which == "bias":
            return ql.bias_q.astype(np.float32)
        return np.asarray(self._slice(layer, ql.weight_q), dtype=np.float32)

    def _refresh(self, layer: Layer) -> None:
        """Rebuild the current int8 QuantLayer of a trained layer from its masters."""
        if self.precision is Precision.FP32 or self._real_units(layer.name):
            return
        ql = self.current[layer.name]
        weight, bias = ql.weight_q, ql.bias_q
        if self._has_weight(layer.name):
            assert ql.weight_q is not None
            weight = np.array(ql.weight_q, dtype=np.int8)
            master = self.arena[self._master(layer.name, "weight")]
            self._slice(layer, weight)[...] = np.clip(np.rint(master), -127, 127)
        if self._has_bias(layer.name):
            master = self.arena[self._master(layer.name, "bias")]
            bias = np.clip(np.rint(master), -INT32_LIMIT, INT32_LIMIT).astype(np.int32)
        self.current[layer.name] = replace(ql, weight_q=weight, bias_q=bias)
        self._weights.pop(layer.name, None)

    # -- forward -----------------------------------------------------------------------------
    def _layer_forward(self, layer: Layer, inputs: list[npt.NDArray[np.generic]]
                       ) -> npt.NDArray[np.generic]:
        if self.precision is Precision.INT8:
            return forward_layer(self.qgraph, self.current[layer.name], inputs)  # type: ignore[arg-type]
        x = np.asarray(inputs[0], dtype=np.float32)
        op = layer.op
        if op is OpKind.CONV:
            y = K.conv_forward(x, self._real_weight(layer), self._real_bias(layer),
                               layer.stride, layer.padding, is_depthwise(self.graph, layer))
        elif op is OpKind.FULLY_CONNECTED:
            w = fc_to_hwc(self.graph, layer, self._real_weight(layer))
            y = K.fc_forward(x, np.asarray(w, np.float32), self._real_bias(layer)).reshape(
                1, 1, -1)
        elif op is OpKind.ADD:
            y = x + np.asarray(inputs[1], dtype=np.float32)
        elif op is OpKind.AVG_POOL:
            y = K.avg_pool_forward(x, layer.kernel, layer.stride, layer.padding)
        elif op is OpKind.MAX_POOL:
            y = K.max_pool_forward(x, layer.kernel, layer.stride, layer.padding)
        elif op is OpKind.GLOBAL_AVG_POOL:
            y = x.mean(axis=(0, 1), keepdims=True, dtype=np.float32)
        elif op is OpKind.RESHAPE:
            y = x.reshape(1, 1, -1)
        else:
            raise TrainingError(f"layer {layer.name}: op {op.value} cannot train")
        low, high = activation_bounds(layer.activation)
        return np.clip(y, low, high).astype(np.float32)

    def _inside(self, tensor: str, value: npt.NDArray[np.generic]) -> npt.NDArray[np.bool_]:
        producer = self.producer[tensor]
        if self.precision is Precision.FP32:
            low, high = activation_bounds(producer.activation)
            v = np.asarray(value, dtype=np.float32)
            inside: npt.NDArray[np.bool_] = (v > low) & (v < high)
            return inside
        ql = self.current[producer.name]
        v64 = np.asarray(value, dtype=np.int64)
        result: npt.NDArray[np.bool_] = (v64 > ql.act_min) & (v64 < ql.act_max)
        return result

    def _keep(self, tensor: str, value: npt.NDArray[np.generic]) -> None:
        """Store what the backward pass will need of `tensor`: its mask, a saved copy."""
        if tensor in self.needs.masked:
            packed = np.packbits(self._inside(tensor, value).reshape(-1))
            mask = self.arena.alloc(_act(BufferKind.MASK, tensor), BufferKind.MASK,
                                    packed.shape, np.uint8)
            mask[...] = packed
        if tensor in self.needs.saved_channels:
            k = self.needs.saved_channels[tensor]
            dtype = np.int8 if self.precision is Precision.INT8 else np.float32
            h, w, _ = value.shape
            saved = self.arena.alloc(_act(BufferKind.SAVED, tensor), BufferKind.SAVED,
                                     (h, w, k), dtype)
            saved[...] = value[:, :, :k]

    def _forward(self, x: npt.NDArray[np.generic] | None, start: int = 0,
                 boundary: Mapping[str, npt.NDArray[np.generic]] | None = None
                 ) -> npt.NDArray[np.generic]:
        graph, arena = self.graph, self.arena
        dtype = np.int8 if self.precision is Precision.INT8 else np.float32
        env: dict[str, npt.NDArray[np.generic]] = {}
        first = graph.layers[start].name
        arena.mark(Phase.FORWARD, first)
        if boundary is None:
            if x is None:
                raise TrainingError("a step needs an input image or a prefix boundary")
            sources = {graph.input: x}
        else:
            sources = dict(boundary)
        for name, value in sources.items():
            buf = arena.alloc(_act(BufferKind.ACTIVATION, name), BufferKind.ACTIVATION,
                              value.shape, dtype, self.groups[name])
            buf[...] = value
            env[name] = buf
            self._keep(name, buf)
        for i in range(start, len(graph.layers)):
            layer = graph.layers[i]
            if i != start:
                arena.mark(Phase.FORWARD, layer.name)
            y = self._layer_forward(layer, [env[t] for t in layer.inputs])
            out = arena.alloc(_act(BufferKind.ACTIVATION, layer.output), BufferKind.ACTIVATION,
                              y.shape, dtype, self.groups[layer.output])
            out[...] = y
            env[layer.output] = out
            self._keep(layer.output, out)
            for name in dict.fromkeys(layer.inputs):
                if self.span[name][1] == i and name != graph.output:
                    arena.free(_act(BufferKind.ACTIVATION, name))
                    del env[name]
        return env[graph.output]

    def _head_logits(self, output: npt.NDArray[np.generic], features: npt.NDArray[np.generic]
                     ) -> F32:
        """fp32 logits: from the fp32 head on the features, or the int8 logits dequantized."""
        if self.precision is Precision.FP32:
            return np.asarray(output, dtype=np.float32).reshape(-1)
        if self.fp32_head:
            classifier = self.graph.layers[self.index[self.resolved.classifier]]
            src = classifier.inputs[0]
            real = self.qgraph.tensors[src].dequantize(features)
            w = fc_to_hwc(self.graph, classifier, self._real_weight(classifier))
            return K.fc_forward(real, np.asarray(w, np.float32), self._real_bias(classifier))
        return self.qgraph.output.dequantize(output).reshape(-1)

    # -- one step ----------------------------------------------------------------------------
    def step(self, x: npt.NDArray[np.generic] | None, label: int,
             boundary: Mapping[str, npt.NDArray[np.generic]] | None = None,
             start: int | None = None) -> StepResult:
        """Forward, loss, backward and update on one sample.

        `x` is the input image in HWC (int8 for the int8 graph, float for FP32). `boundary`,
        from `prefix(x, start)`, replaces the frozen layers before layer `start` (default: the
        training region's first layer): a host-side shortcut, their outputs do not change
        while they are frozen. Only a step from the input is the memory model's.
        """
        graph, arena = self.graph, self.arena
        begin = 0 if boundary is None else self._start(start)
        output = self._forward(x, begin, boundary)
        arena.mark(Phase.LOSS)
        grad = arena.alloc(_act(BufferKind.GRADIENT, graph.output), BufferKind.GRADIENT,
                           hwc_shape(graph, graph.output), np.float32)
        classifier = graph.layers[self.index[self.resolved.classifier]]
        features = arena[_act(BufferKind.SAVED, classifier.inputs[0])]
        logits = self._head_logits(output, features)
        self.logit_low = min(self.logit_low, float(logits.min()))
        self.logit_high = max(self.logit_high, float(logits.max()))
        loss, dlogits = K.softmax_cross_entropy(logits, label)
        grad[...] = dlogits.reshape(grad.shape)
        correct = int(np.argmax(logits)) == label
        arena.free(_act(BufferKind.ACTIVATION, graph.output))
        self._backward()
        self.steps += 1
        if self.scheme.accumulate_steps > 1 and self.steps % self.scheme.accumulate_steps == 0:
            arena.mark(Phase.UPDATE)
            for param, _ in self._params:
                wgrad = arena[buffer_name(BufferKind.WEIGHT_GRAD, param)]
                wgrad /= np.float32(self.scheme.accumulate_steps)
                self._update(param, wgrad)
                wgrad[...] = 0
        elif not self.reorder and self.scheme.accumulate_steps == 1:
            arena.mark(Phase.UPDATE)
            for param, _ in self._params:
                name = buffer_name(BufferKind.WEIGHT_GRAD, param)
                self._update(param, arena[name])
                arena.free(name)
        return StepResult(loss, correct)

    def _backward(self) -> None:
        graph, arena, needs = self.graph, self.arena, self.needs
        for i in range(len(graph.layers) - 1, self.resolved.region_start - 1, -1):
            layer = graph.layers[i]
            out_name = _act(BufferKind.GRADIENT, layer.output)
            if layer.name not in needs.in_region or out_name not in arena:
                continue
            arena.mark(Phase.BACKWARD, layer.name)
            dy = np.asarray(arena[out_name], dtype=np.float32)
            if self.probe is not None:
                self.probe(out_name, np.array(dy))
            if layer.output in needs.masked:
                bits = np.unpackbits(np.asarray(arena[_act(BufferKind.MASK, layer.output)]),
                                     count=dy.size)
                dy *= bits.reshape(dy.shape).astype(np.float32)
            renamed = self._input_grads(layer, dy, out_name)
            if layer.name in self.resolved.trainable:
                self._param_grads(layer, dy)
            if not renamed:
                arena.free(out_name)
            if layer.output in needs.masked:
                arena.free(_act(BufferKind.MASK, layer.output))
            for src in dict.fromkeys(layer.inputs):
                if needs.saved_last_user.get(src) == layer.name:
                    arena.free(_act(BufferKind.SAVED, src))

    def _input_grads(self, layer: Layer, dy: F32, out_name: str) -> bool:
        """Add this layer's input gradients into grad:<input>; True if dy was renamed."""
        graph, arena = self.graph, self.arena
        renamed = False
        for src in dict.fromkeys(layer.inputs):
            if src not in self.needs.grad_tensors:
                continue
            name = _act(BufferKind.GRADIENT, src)
            shape = hwc_shape(graph, src)
            if layer.op is OpKind.RESHAPE and name not in arena:
                arena.rename(out_name, name)
                arena.arrays[name] = arena.arrays[name].reshape(shape)
                renamed = True
                continue
            contribution = self._input_grad(layer, src, dy)
            if name not in arena:
                arena.alloc(name, BufferKind.GRADIENT, shape, np.float32)
            buf = arena[name]
            buf += contribution
        return renamed

    def _input_grad(self, layer: Layer, src: str, dy: F32) -> F32:
        graph = self.graph
        shape = hwc_shape(graph, src)
        op = layer.op
        if op is OpKind.CONV:
            return K.conv_backward_input(dy, self._real_weight(layer), shape, layer.stride,
                                         layer.padding, is_depthwise(graph, layer))
        if op is OpKind.FULLY_CONNECTED:
            w = np.asarray(fc_to_hwc(graph, layer, self._real_weight(layer)), np.float32)
            out: F32 = (w.T @ dy.reshape(-1)).reshape(shape).astype(np.float32)
            return out
        if op is OpKind.ADD:
            count = sum(1 for t in layer.inputs if t == src)
            return (dy * np.float32(count)).astype(np.float32)
        if op is OpKind.AVG_POOL:
            return K.avg_pool_backward(dy, shape, layer.kernel, layer.stride, layer.padding)
        if op is OpKind.MAX_POOL:
            x = self.arena[_act(BufferKind.SAVED, src)]
            return K.max_pool_backward(dy, x, layer.kernel, layer.stride, layer.padding)
        if op is OpKind.GLOBAL_AVG_POOL:
            return K.global_avg_pool_backward(dy, shape)
        if op is OpKind.RESHAPE:
            return dy.reshape(shape)
        raise TrainingError(f"layer {layer.name}: op {op.value} cannot train")

    def _saved_real(self, tensor: str) -> F32:
        saved = self.arena[_act(BufferKind.SAVED, tensor)]
        if self.precision is Precision.FP32:
            return np.asarray(saved, dtype=np.float32)
        return self.qgraph.tensors[tensor].dequantize(saved)

    def _param_grads(self, layer: Layer, dy: F32) -> None:
        """Bias, then weight gradients of a trained layer; updated at once when reordering."""
        graph, arena = self.graph, self.arena
        t = self.resolved.trainable[layer.name]
        grads: list[tuple[str, F32]] = []
        if t.bias:
            grads.append(("bias", dy.sum(axis=(0, 1), dtype=np.float32)))
        if t.weight_channels:
            x = self._saved_real(layer.inputs[0])
            if layer.op is OpKind.FULLY_CONNECTED:
                g_hwc = np.outer(dy.reshape(-1), x.reshape(-1)).astype(np.float32)
                g = fc_from_hwc(graph, layer, g_hwc)
            else:
                g = K.conv_backward_weight(x, dy, layer.kernel, layer.stride, layer.padding,
                                           is_depthwise(graph, layer), t.weight_channels)
            grads.append(("weight", g))
        for which, real in grads:
            param = f"{layer.name}.{which}"
            if self.probe is not None:
                self.probe(f"real:{param}", np.array(real))
            tensor_grad = self._tensor_grad(layer, which, real)
            name = buffer_name(BufferKind.WEIGHT_GRAD, param)
            if self.scheme.accumulate_steps > 1:
                buf = arena[name]
                buf += tensor_grad
                continue
            buf = arena.alloc(name, BufferKind.WEIGHT_GRAD, tensor_grad.shape, np.float32)
            buf[...] = tensor_grad
            if self.reorder:
                self._update(param, buf)
                arena.free(name)

    def _tensor_grad(self, layer: Layer, which: str, real: F32) -> F32:
        """The gradient with respect to the trained tensor, QAS-scaled for int8 tensors."""
        if self._real_units(layer.name):
            return real
        w_scale, x_scale = self._scales(layer.name)
        scale = w_scale if which == "weight" else w_scale * x_scale
        if which == "weight" and is_depthwise(self.graph, layer):
            scale = scale[:real.shape[0]]
        scale = scale.reshape((-1,) + (1,) * (real.ndim - 1))
        g = real.astype(np.float64) * scale  # d loss / d (int8 tensor)
        if self.scheme.qas:
            g = g / (scale * scale)
        out: F32 = g.astype(np.float32)
        return out

    def _update(self, param: str, grad: npt.NDArray[np.generic]) -> None:
        layer_name, which = param.rsplit(".", 1)
        arena = self.arena
        master = arena[self._master(layer_name, which)]
        step = np.asarray(grad, dtype=np.float32)
        if self.scheme.momentum > 0:
            velocity = arena[buffer_name(BufferKind.MOMENTUM, param)]
            velocity *= np.float32(self.scheme.momentum)
            velocity += step
            step = velocity
        master -= np.float32(self.scheme.lr) * step
        if which == "weight" and not self._real_units(layer_name):
            np.clip(master, -127, 127, out=master)
        self._refresh(self.graph.layers[self.index[layer_name]])

    # -- inference, caching and export -------------------------------------------------------
    def _start(self, start: int | None) -> int:
        if start is None:
            return self.resolved.region_start
        if not 0 <= start <= self.resolved.region_start:
            raise TrainingError(f"a boundary at layer {start} lies inside the training region "
                                f"(it starts at layer {self.resolved.region_start})")
        return start

    def prefix(self, x: npt.NDArray[np.generic], start: int | None = None
               ) -> dict[str, npt.NDArray[np.generic]]:
        """The tensors entering layer `start` (default: the training region), computed once
        by the frozen layers before it."""
        return self.prefixes(x[None], start)[0]

    def prefixes(self, images: npt.NDArray[np.generic], start: int | None = None,
                 chunk: int = 64) -> list[dict[str, npt.NDArray[np.generic]]]:
        """`prefix` of every image of a batch (N, H, W, C), run batched."""
        start = self._start(start)
        needed = {t for layer in self.graph.layers[start:] for t in layer.inputs}
        out: list[dict[str, npt.NDArray[np.generic]]] = []
        for first in range(0, len(images), chunk):
            env = self._run_batch({self.graph.input: images[first:first + chunk]}, 0, start)
            kept = {name: value for name, value in env.items() if name in needed}
            out.extend({name: value[i] for name, value in kept.items()}
                       for i in range(len(images[first:first + chunk])))
        return out

    def _run_batch(self, env: dict[str, npt.NDArray[np.generic]], start: int, stop: int
                   ) -> dict[str, npt.NDArray[np.generic]]:
        """Layers [start, stop) on batched tensors (N, H, W, C); nothing kept or trained."""
        for layer in self.graph.layers[start:stop]:
            inputs = [env[t] for t in layer.inputs]
            if self.precision is Precision.INT8:
                env[layer.output] = forward_batch(self.qgraph, self.current[layer.name],
                                                  inputs)  # type: ignore[arg-type]
            else:
                env[layer.output] = np.stack([self._layer_forward(layer, list(one))
                                              for one in zip(*inputs, strict=True)])
        return env

    def advance(self, boundaries: Sequence[Mapping[str, npt.NDArray[np.generic]]], start: int,
                stop: int, chunk: int = 64) -> list[dict[str, npt.NDArray[np.generic]]]:
        """`prefix` boundaries at layer `start` carried forward to layer `stop` through the
        current (frozen) weights, batched."""
        needed = {t for layer in self.graph.layers[stop:] for t in layer.inputs}
        out: list[dict[str, npt.NDArray[np.generic]]] = []
        for first in range(0, len(boundaries), chunk):
            part = boundaries[first:first + chunk]
            env = self._run_batch({name: np.stack([b[name] for b in part]) for name in part[0]},
                                  start, stop)
            kept = {name: value for name, value in env.items() if name in needed}
            out.extend({name: value[i] for name, value in kept.items()}
                       for i in range(len(part)))
        return out

    def logits(self, x: npt.NDArray[np.generic] | None = None,
               boundary: Mapping[str, npt.NDArray[np.generic]] | None = None,
               start: int | None = None) -> F32:
        """fp32 logits of one image, or of a `prefix` boundary (nothing kept or trained)."""
        start = 0 if boundary is None else self._start(start)
        env: dict[str, npt.NDArray[np.generic]] = (
            {self.graph.input: x} if boundary is None else dict(boundary))  # type: ignore[dict-item]
        for layer in self.graph.layers[start:]:
            env[layer.output] = self._layer_forward(layer, [env[t] for t in layer.inputs])
        classifier = self.graph.layers[self.index[self.resolved.classifier]]
        return self._head_logits(env[self.graph.output], env[classifier.inputs[0]])

    def accuracy(self, samples: Sequence[Mapping[str, npt.NDArray[np.generic]]],
                 labels: Sequence[int], start: int | None = None, chunk: int = 64) -> float:
        """Top-1 accuracy on prefix-cached samples (see `prefix`), run batched."""
        if not samples:
            raise TrainingError("accuracy of an empty sample set")
        begin = self._start(start)
        classifier = self.graph.layers[self.index[self.resolved.classifier]]
        hits = 0
        for first in range(0, len(samples), chunk):
            part = samples[first:first + chunk]
            env = self._run_batch({name: np.stack([s[name] for s in part]) for name in part[0]},
                                  begin, len(self.graph.layers))
            for i, y in enumerate(labels[first:first + chunk]):
                logits = self._head_logits(env[self.graph.output][i],
                                           env[classifier.inputs[0]][i])
                hits += int(np.argmax(logits) == int(y))
        return hits / len(samples)

    def export(self) -> QuantizedGraph:
        """The trained int8 graph (see the module docstring for the classifier's scales)."""
        from firmware.training.engine.export import export_trained

        return export_trained(self)
