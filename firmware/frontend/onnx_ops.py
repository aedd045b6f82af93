"""Which ONNX operators the importer takes, on what conditions, and which it refuses.

The importer (firmware.frontend.onnx_import) represents a node only where the IR computes
exactly what ONNX specifies; everything else is refused with `UnsupportedOpError` naming the
node, its op type and the attribute or shape at fault. `SUPPORTED_OPS` is that contract in
words (the README and `tinyfleet onnx-ops` print it); `ATTRIBUTES` lists the attributes each
op may carry (any other attribute is refused, so a new attribute in a later opset can never
be ignored silently); `refused_ops()` lists every other standard operator.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import onnx

# op type -> the conditions under which the importer represents it exactly.
SUPPORTED_OPS: Mapping[str, str] = MappingProxyType({
    "Conv": "2-D, constant weights (and bias), dilations 1, any group count, pads or auto_pad",
    "BatchNormalization": "inference only (training_mode 0), directly after a Conv that "
                          "nothing else reads: folded into it",
    "Relu": "after a Conv, Gemm/MatMul, Add or pooling that nothing else reads: fused (after "
            "global average pooling `compile` refuses it: that int8 kernel has no clamp)",
    "Clip": "constant (0, 6) = ReLU6 or (0, inf) = ReLU, fused as Relu is",
    "Add": "two activations of the same shape (no broadcasting); or a constant after a Conv, "
           "Gemm or MatMul that is the same for every pixel: folded into its bias",
    "GlobalAveragePool": "4-D input",
    "ReduceMean": "over the spatial axes [2, 3] only (keepdims 0 or 1)",
    "AveragePool": "2-D, dilations 1, padding only with count_include_pad 1, ceil_mode only "
                   "where it does not change the output size",
    "MaxPool": "2-D, dilations 1, ceil_mode only where it does not change the output size; "
               "no Indices output",
    "Gemm": "2-D input (after Flatten/Reshape/ReduceMean), transA 0, constant B and C; C "
            "broadcast over the features only",
    "MatMul": "2-D input by a constant 2-D matrix",
    "Flatten": "to (1, C*H*W) (axis 0 or 1 at batch 1)",
    "Reshape": "a flatten to (1, C*H*W), or to the same shape",
    "Pad": "constant zero padding of H and W, read only by Conv (absorbed into its padding)",
    "Concat": "activations along channels (axis 1); `plan` takes it, `compile` refuses it (no "
              "int8 kernel yet)",
    "Identity": "any activation",
    "Constant": "any value (folded at import)",
    "Shape": "of an activation (start/end honoured), folded to a constant",
})

# op type -> the attributes the importer understands (every other one is refused).
ATTRIBUTES: Mapping[str, frozenset[str]] = MappingProxyType({
    "Conv": frozenset({"auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"}),
    "BatchNormalization": frozenset({"epsilon", "momentum", "training_mode", "spatial",
                                     "is_test"}),
    "Relu": frozenset(),
    "Clip": frozenset({"min", "max"}),
    "Add": frozenset(),
    "GlobalAveragePool": frozenset(),
    "ReduceMean": frozenset({"axes", "keepdims", "noop_with_empty_axes"}),
    "AveragePool": frozenset({"auto_pad", "ceil_mode", "count_include_pad", "dilations",
                              "kernel_shape", "pads", "strides"}),
    "MaxPool": frozenset({"auto_pad", "ceil_mode", "dilations", "kernel_shape", "pads",
                          "storage_order", "strides"}),
    "Gemm": frozenset({"alpha", "beta", "transA", "transB"}),
    "MatMul": frozenset(),
    "Flatten": frozenset({"axis"}),
    "Reshape": frozenset({"allowzero"}),
    "Pad": frozenset({"mode", "pads", "value"}),
    "Concat": frozenset({"axis"}),
    "Identity": frozenset(),
    "Constant": frozenset({"value", "value_float", "value_floats", "value_int", "value_ints",
                           "value_string", "value_strings", "sparse_value"}),
    "Shape": frozenset({"start", "end"}),
})

# (op, attribute) -> the opsets [first, end) that define it. Outside them the importer reads
# the value elsewhere (an input), so a stray attribute would be ignored: it is refused instead.
ATTRIBUTE_OPSETS: Mapping[tuple[str, str], tuple[int, int]] = MappingProxyType({
    ("Clip", "min"): (1, 11), ("Clip", "max"): (1, 11),
    ("Pad", "pads"): (1, 11), ("Pad", "value"): (1, 11),
    ("ReduceMean", "axes"): (1, 18),
    ("BatchNormalization", "is_test"): (1, 7), ("BatchNormalization", "spatial"): (1, 9),
    ("BatchNormalization", "training_mode"): (14, 10**6),
    ("Shape", "start"): (15, 10**6), ("Shape", "end"): (15, 10**6),
    ("Reshape", "allowzero"): (14, 10**6),
})

# Folding these at import would freeze one random draw into the model.
NONDETERMINISTIC_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform",
                                  "RandomUniformLike", "Bernoulli", "Multinomial"})


def refused_ops() -> list[str]:
    """Standard (ai.onnx) operators the importer refuses on activations, sorted.

    A node of any of them whose inputs are all constants is still evaluated at import (by
    onnx's reference implementation), except the random ones.
    """
    names = {schema.name for schema in onnx.defs.get_all_schemas()
             if schema.domain in ("", "ai.onnx") and not schema.deprecated}
    return sorted(names - set(SUPPORTED_OPS))
