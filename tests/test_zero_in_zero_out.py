"""No silent inexactness (issue 10): every op of the registry that can sit element-wise between two convs,
conv -> OP -> conv on a (1, C, H, W) tensor, either prunes exactly (the pruned model equals the original with the
removed channels zeroed) or has every pruned group through it marked inexact, with a reason that names the op."""
from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from builders import GraphBuilder
from exactness import planned, prune_exact
from onnxprune.rules.registry import REGISTRY

C, H, W = 8, 6, 6
F, B, I64 = TensorProto.FLOAT, TensorProto.BOOL, TensorProto.INT64


def scalar(b: GraphBuilder, value: float, dtype=np.float32) -> str:
    return b.const(np.array(value, dtype))


def per_channel(b: GraphBuilder, low: float = 0.5, high: float = 1.5) -> str:
    return b.const(b.rng.uniform(low, high, (C, 1, 1)).astype(np.float32))


def cast(b: GraphBuilder, x: str, to: int) -> str:
    return b.op("Cast", [x], to=to)


def via_bool(op: str) -> Callable[[GraphBuilder, str], str]:
    """A boolean op: the channel goes to bool and back to float around it."""
    def build(b: GraphBuilder, x: str) -> str:
        y = cast(b, x, B)
        args = [y] if op == "Not" else [y, b.const(np.array(True))]
        return b.op(op, args)
    return build


def quantize_dequantize(b: GraphBuilder, x: str) -> str:
    """A QDQ pair with a non-zero zero point, as QDQ models put one around every activation."""
    scale, zero_point = scalar(b, 0.05), b.const(np.array(-3, np.int8))
    return b.op("DequantizeLinear", [b.op("QuantizeLinear", [x, scale, zero_point]), scale, zero_point])


def compare(op: str) -> Callable[[GraphBuilder, str], str]:
    return lambda b, x: b.op(op, [x, scalar(b, 0.0)])


# op -> how to put it between the convs: (builder, x) -> the op's output (any dtype: cast to float after).
BETWEEN: dict[str, Callable[[GraphBuilder, str], str]] = {
    **{op: (lambda op: lambda b, x: b.op(op, [x]))(op) for op in (
        "Abs", "Ceil", "Cos", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish", "Identity", "IsInf",
        "IsNaN", "LeakyRelu", "Mish", "Neg", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Sin",
        "Softplus", "Softsign", "Tanh", "ThresholdedRelu", "Celu", "Dropout")},
    "Log": lambda b, x: b.op("Log", [b.op("Abs", [x])]),
    "Sqrt": lambda b, x: b.op("Sqrt", [b.op("Abs", [x])]),
    "Cast": lambda b, x: cast(b, x, TensorProto.DOUBLE),
    "Not": via_bool("Not"), "And": via_bool("And"), "Or": via_bool("Or"), "Xor": via_bool("Xor"),
    **{op: compare(op) for op in ("Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual")},
    "BitShift": lambda b, x: b.op("BitShift", [cast(b, b.op("Relu", [x]), TensorProto.UINT8),
                                                 b.const(np.array(1, np.uint8))], direction="RIGHT"),
    "Clip": lambda b, x: b.op("Clip", [x, scalar(b, 0.5), scalar(b, 6.0)]),
    "Add": lambda b, x: b.op("Add", [x, scalar(b, 0.25)]),
    "Sub": lambda b, x: b.op("Sub", [x, per_channel(b)]),
    "Mul": lambda b, x: b.op("Mul", [x, scalar(b, 1.5)]),
    "Div": lambda b, x: b.op("Div", [x, per_channel(b)]),
    "Max": lambda b, x: b.op("Max", [x, scalar(b, 0.5)]),
    "Min": lambda b, x: b.op("Min", [x, scalar(b, 6.0)]),
    "Sum": lambda b, x: b.op("Sum", [x, per_channel(b)]),
    "Mean": lambda b, x: b.op("Mean", [x, scalar(b, 1.0)]),
    "Pow": lambda b, x: b.op("Pow", [x, scalar(b, 2.0)]),
    "Mod": lambda b, x: b.op("Mod", [x, scalar(b, 1.5)], fmod=1),
    "PRelu": lambda b, x: b.op("PRelu", [x, per_channel(b, 0.1, 0.3)]),
    "Where": lambda b, x: b.op("Where", [b.const(b.rng.uniform(size=(1, 1, H, W)) > 0.5), x, scalar(b, 0.5)]),
    "BatchNormalization": lambda b, x: b.bn(x, C),
    "InstanceNormalization": lambda b, x: b.op("InstanceNormalization", [x, b.const(np.ones(C, np.float32)),
                                                                          b.const(np.full(C, 0.1, np.float32))]),
    "LayerNormalization": lambda b, x: b.op("LayerNormalization", [x, b.const(np.ones(W, np.float32)),
                                                                    b.const(np.full(W, 0.1, np.float32))], axis=-1),
    "MaxPool": lambda b, x: b.op("MaxPool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    "AveragePool": lambda b, x: b.op("AveragePool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    "LpPool": lambda b, x: b.op("LpPool", [x], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    "GlobalAveragePool": lambda b, x: b.op("GlobalAveragePool", [x]),
    "GlobalMaxPool": lambda b, x: b.op("GlobalMaxPool", [x]),
    "GlobalLpPool": lambda b, x: b.op("GlobalLpPool", [x]),
    **{op: (lambda op: lambda b, x: b.op(op, [x], axis=3))(op) for op in ("Softmax", "LogSoftmax", "Hardmax")},
    **{op: (lambda op: lambda b, x: b.op(op, [x], axis=3, keepdims=1))(op) for op in ("ArgMax", "ArgMin")},
    **{op: (lambda op: lambda b, x: b.op(op, [x, b.const(np.array([3], np.int64))], keepdims=1))(op) for op in (
        "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
        "ReduceLogSumExp", "ReduceSumSquare")},
    "Pad": lambda b, x: b.op("Pad", [x, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)), scalar(b, 0.5)]),
    "Resize": lambda b, x: b.op("Resize", [x, "", b.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest"),
    "Transpose": lambda b, x: b.op("Transpose", [x], perm=[0, 1, 3, 2]),
    "Slice": lambda b, x: b.op("Slice", [x, b.const(np.array([1], np.int64)), b.const(np.array([5], np.int64)),
                                         b.const(np.array([3], np.int64))]),
    "Concat": lambda b, x: b.op("Concat", [x, x], axis=3),
    "Split": lambda b, x: b.op("Split", [x, b.const(np.array([2, 4], np.int64))], n_out=2, axis=3)[1],
    "Gather": lambda b, x: b.op("Gather", [x, b.const(np.array([0, 2, 4], np.int64))], axis=3),
    "Unsqueeze": lambda b, x: b.op("Squeeze", [b.op("Unsqueeze", [x, b.const(np.array([4], np.int64))]),
                                              b.const(np.array([4], np.int64))]),
}
BETWEEN["Squeeze"] = BETWEEN["Unsqueeze"]
BETWEEN["Expand"] = lambda b, x: b.op("Expand", [x, b.const(np.array([1, C, H, W], np.int64))])
BETWEEN["Tile"] = lambda b, x: b.op("Tile", [x, b.const(np.array([1, 1, 2, 1], np.int64))])
BETWEEN["QuantizeLinear"] = BETWEEN["DequantizeLinear"] = quantize_dequantize  # alone: tests/test_quantized.py
BETWEEN["Reshape"] = lambda b, x: b.op("Reshape", [x, b.const(np.array([1, C, W, H], np.int64))])

# Ops that cannot sit element-wise between two convs, and why.
NOT_BETWEEN = {
    "Conv": "a layer: it produces and consumes channels (the two convs of every case)",
    "ConvTranspose": "a layer: it produces and consumes channels (tests/test_rules.py)",
    "Gemm": "a layer on (N, K) rows, not (N, C, H, W); consumes the channel like a conv (tests/test_rules.py)",
    "MatMul": "a layer (a weight on the last axis); consumes the channel like a conv (tests/test_rules.py)",
    "Einsum": "a layer with its own roles (tests/test_rules.py)",
    "Flatten": "changes rank, so the second conv cannot read it: a Flatten -> Gemm head (tests/test_patterns.py)",
    "Shape": "returns the sizes, not the values: nothing of a channel's value passes through",
    "OneHot": "takes integer indices, and its depth axis is data: frozen (tests/test_targets_reach.py)",
    **{op: "control flow: between two convs in tests/test_every_op.py, more in tests/test_subgraphs.py"
       for op in ("If", "Loop", "Scan")},
    **{op: "a quantized layer that freezes with the reason (tests/test_quantized.py)"
       for op in ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger")},
}

OPSET = {"Gelu": 20}  # new in opset 20; 18: Mish, and `axes` as an input of every reduction


def between_convs(op: str, k: int = 1) -> tuple[onnx.ModelProto, str]:
    """conv (3 -> C) -> OP -> cast to float -> conv k x k (C -> 4, padded to keep the size); the model and the name
    of the op's node."""
    b = GraphBuilder(seed=0, opset=OPSET.get(op, 18))
    x = b.conv(b.input([1, 3, H, W]), 3, C)
    y = BETWEEN[op](b, x)
    node = next(n for n in b.nodes if y in n.output)
    node = next((n for n in b.nodes if n.op_type == op), node)
    z = cast(b, y, F)
    return b.model(b.conv(z, C, 4, k=k)), node.name


def test_every_registered_op_is_covered():
    assert set(BETWEEN) | set(NOT_BETWEEN) == set(REGISTRY)
    assert not set(BETWEEN) & set(NOT_BETWEEN)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("op", sorted(BETWEEN))
def test_op_between_convs_is_exact_or_marked_inexact(op: str, k: int):
    """k = 1: a constant a removed channel carries is folded into the reader's bias; k = 3: the reader pads, so it
    cannot be, and the group must be marked (tests/test_bias_folding.py)."""
    model, node = between_convs(op, k)
    prepared, plan = planned(model, 0.5)
    through = [prepared.analysis.groups[g] for g in plan.keep
               if any(m.space[0] in _outputs(prepared.model, node) for m in prepared.analysis.groups[g].members)]
    assert through, f"no pruned group passes through {op}"
    if any(g.inexact for g in through):
        for g in through:
            assert any(f"'{node}'" in r for r in g.inexact), g.inexact
        return
    prune_exact(model, 0.5, atol=1e-4)


def _outputs(model: onnx.ModelProto, node: str) -> set[str]:
    return {o for n in model.graph.node if n.name == node for o in n.output}
