"""No silent inexactness (issue 10), over the whole rule registry: every op with a rule, built in a small graph
(conv -> OP -> a layer reading the channels, or the op in its natural place), does what its recipe says it does:

- EXACT: the pruned model equals the original with the removed channels zeroed, and no group through it is marked;
- INEXACT: every pruned group through it is marked inexact with a reason naming the node, and pruning those groups
  still gives a valid model that onnxruntime runs;
- FROZEN: the channels it touches freeze, with a reason naming the node.

The test is driven by the registry: an op registered without a recipe fails, naming the op. Adding one is one line
in RECIPES: `"Op": Recipe(lambda b, x: b.op("Op", [x, ...]), EXACT)`, where x is the stem conv's (1, C, H, W) output
and the lambda returns the op's output (a tensor with C channels on axis 1, read by a 1x1 conv after a Cast to
float); `tail=` names another reader (a Gemm for (1, C), a MatMul for channels on the last axis), `opset=` another
opset. Einsum layers get more cases at the end."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from builders import GraphBuilder
from exactness import feeds_at, planned, prune_exact

import onnxprune
from onnxprune import CalibrationSource, Options
from onnxprune.rules.registry import REGISTRY
from onnxprune.roles import Role
from onnxprune.surgery import apply_plan
from onnxprune.verify import check_valid, layer_macs, run

C, H, W = 8, 6, 6
EXACT, INEXACT, FROZEN = "exact", "inexact", "frozen"
F, B = TensorProto.FLOAT, TensorProto.BOOL

Build = Callable[[GraphBuilder, str], str]


# ------------------------------------------------------------------------------------------------ readers (tails)
def conv_tail(b: GraphBuilder, y: str) -> str:
    """A 1x1 conv reading the C channels on axis 1 of any element type."""
    return b.conv(b.op("Cast", [y], to=F), C, 4, k=1)


def gemm_tail(b: GraphBuilder, y: str) -> str:
    return b.gemm(y, C, 4)


def matmul_tail(b: GraphBuilder, y: str) -> str:
    return b.matmul(y, C, 4)


@dataclass(frozen=True)
class Recipe:
    build: Build  # (builder, the stem conv's (1, C, H, W) output) -> the op's output
    expect: str = EXACT
    tail: Callable[[GraphBuilder, str], str] = conv_tail
    opset: int = 18
    output_shape: list[int] | None = None  # the model's output, where inference does not see through the op


# ------------------------------------------------------------------------------------------------ helpers for recipes
def ints(b: GraphBuilder, *values: int) -> str:
    return b.const(np.array(values, np.int64))


def scalar(b: GraphBuilder, value: float, dtype=np.float32) -> str:
    return b.const(np.array(value, dtype))


def per_channel(b: GraphBuilder, low: float = 0.5, high: float = 1.5) -> str:
    return b.const(b.rng.uniform(low, high, (C, 1, 1)).astype(np.float32))


def unary(op: str, **attrs) -> Build:
    return lambda b, x: b.op(op, [x], **attrs)


def on_positive(op: str) -> Build:
    return lambda b, x: b.op(op, [b.op("Abs", [x])])


def with_operand(op: str, operand: Callable[[GraphBuilder], str], **attrs) -> Build:
    return lambda b, x: b.op(op, [x, operand(b)], **attrs)


def on_bool(op: str) -> Build:
    """The channel cast to bool, through OP (with a constant True for a binary one)."""
    def build(b: GraphBuilder, x: str) -> str:
        y = b.op("Cast", [x], to=B)
        return b.op(op, [y] if op == "Not" else [y, b.const(np.array(True))])
    return build


def reduce_over_width(op: str) -> Build:
    return lambda b, x: b.op(op, [b.op("Abs", [x]) if op == "ReduceLogSum" else x, ints(b, 3)], keepdims=1)


def pooled(b: GraphBuilder, x: str) -> str:
    """(1, C): global average pool, flattened."""
    return b.op("Flatten", [b.op("GlobalAveragePool", [x])])


def channels_last(b: GraphBuilder, x: str) -> str:
    return b.op("Transpose", [x], perm=[0, 2, 3, 1])


def conv_transpose(b: GraphBuilder, x: str) -> str:
    return b.op("ConvTranspose", [x, b.weight(C, C, 2, 2), b.const(np.zeros(C, np.float32))], kernel_shape=[2, 2],
                strides=[2, 2])


def same_shape_from_shape(b: GraphBuilder, x: str) -> str:
    """x.view(x.size(0), C, H, W): a Reshape target whose batch entry Shape reads at run time."""
    batch = b.op("Gather", [b.op("Shape", [x]), b.const(np.array(0, np.int64))], axis=0)
    target = b.op("Concat", [b.op("Unsqueeze", [batch, ints(b, 0)]), ints(b, C, H, W)], axis=0)
    return b.op("Reshape", [x, target])


def quantized(b: GraphBuilder, x: str) -> str:
    """QuantizeLinear -> DequantizeLinear with a per-tensor scale: 0 quantizes to the zero point, back to 0."""
    s, zp = scalar(b, 0.05), b.const(np.array(-3, np.int8))
    return b.op("DequantizeLinear", [b.op("QuantizeLinear", [x, s, zp]), s, zp])


def qlinear_conv(b: GraphBuilder, x: str) -> str:
    s, zp = scalar(b, 0.05), b.const(np.array(0, np.int8))
    w = b.const(b.rng.integers(-50, 50, (C, C, 1, 1)).astype(np.int8))
    y = b.op("QLinearConv", [b.op("QuantizeLinear", [x, s, zp]), s, zp, w, scalar(b, 0.01), zp, s, zp])
    return b.op("DequantizeLinear", [y, s, zp])


def conv_integer(b: GraphBuilder, x: str) -> str:
    w = b.const(b.rng.integers(-50, 50, (C, C, 1, 1)).astype(np.int8))
    xq = b.op("QuantizeLinear", [x, scalar(b, 0.05), b.const(np.array(0, np.int8))])
    return b.op("ConvInteger", [xq, w])


def matmul_integer(b: GraphBuilder, x: str) -> str:
    w = b.const(b.rng.integers(-50, 50, (C, C)).astype(np.int8))
    xq = b.op("QuantizeLinear", [channels_last(b, x), scalar(b, 0.05), b.const(np.array(0, np.int8))])
    return b.op("MatMulInteger", [xq, w])


def qlinear_matmul(b: GraphBuilder, x: str) -> str:
    s, zp = scalar(b, 0.05), b.const(np.array(0, np.int8))
    w = b.const(b.rng.integers(-50, 50, (C, C)).astype(np.int8))
    xq = b.op("QuantizeLinear", [channels_last(b, x), s, zp])
    return b.op("DequantizeLinear", [b.op("QLinearMatMul", [xq, s, zp, w, scalar(b, 0.01), zp, s, zp]), s, zp])


def body(b: GraphBuilder, name: str, inputs: list[tuple[str, int, list]], outputs: Callable[[], list[tuple]]):
    """A subgraph of the nodes `outputs()` adds to b, with these (name, type, shape) inputs and the (name, type,
    shape) outputs it returns; the nodes are taken out of the main graph."""
    start = len(b.nodes)
    declared = outputs()
    graph = helper.make_graph(b.nodes[start:], name, [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in declared])
    del b.nodes[start:]
    return graph


def if_branches(b: GraphBuilder, x: str) -> str:
    """If(flag: relu(x) | -x), x read from the main graph."""
    flag = b.input([], name="flag", elem_type=B)
    then = body(b, "then", [], lambda: [(b.op("Relu", [x]), F, [1, C, H, W])])
    other = body(b, "else", [], lambda: [(b.op("Neg", [x]), F, [1, C, H, W])])
    return b.op("If", [flag], then_branch=then, else_branch=other)


def loop_carrying(b: GraphBuilder, x: str) -> str:
    """Two iterations of h = relu(h), h carried from x."""
    inputs = [("i", TensorProto.INT64, []), ("cond", B, []), ("h", F, [1, C, H, W])]
    loop = body(b, "body", inputs,
                lambda: [(b.op("Identity", ["cond"]), B, []), (b.op("Relu", ["h"]), F, [1, C, H, W])])
    return b.op("Loop", [b.const(np.array(2, np.int64)), "", x], body=loop)


def scan_over_batch(b: GraphBuilder, x: str) -> str:
    """relu of each sample, scanned along the batch axis and stacked back."""
    scan = body(b, "body", [("e", F, [C, H, W])], lambda: [(b.op("Relu", ["e"]), F, [C, H, W])])
    return b.op("Scan", [x], body=scan, num_scan_inputs=1)


# ------------------------------------------------------------------------------------------------ the recipes
RECIPES: dict[str, Recipe] = {
    # element-wise, f(0) = 0
    **{op: Recipe(unary(op)) for op in (
        "Abs", "Ceil", "Celu", "Elu", "Erf", "Floor", "HardSwish", "Identity", "IsInf", "IsNaN", "LeakyRelu", "Mish",
        "Neg", "Relu", "Round", "Selu", "Sign", "Sin", "Softsign", "Tanh", "ThresholdedRelu")},
    "Gelu": Recipe(unary("Gelu"), opset=20),
    "Dropout": Recipe(unary("Dropout")),
    "Sqrt": Recipe(on_positive("Sqrt")),
    "Cast": Recipe(unary("Cast", to=TensorProto.DOUBLE)),
    # element-wise, f(0) != 0: the constant a removed channel becomes is folded into the unpadded 1x1 conv's bias
    # (where a padded conv reads it instead, the group is inexact: tests/test_bias_folding.py); inf is not folded
    **{op: Recipe(unary(op)) for op in ("Cos", "Exp", "HardSigmoid", "Sigmoid", "Softplus")},
    "Reciprocal": Recipe(unary("Reciprocal"), INEXACT),
    "Log": Recipe(on_positive("Log"), INEXACT),
    "Clip": Recipe(lambda b, x: b.op("Clip", [x, scalar(b, 0.5), scalar(b, 6.0)])),
    # boolean and comparisons
    "And": Recipe(on_bool("And")),
    **{op: Recipe(on_bool(op)) for op in ("Not", "Or", "Xor")},
    **{op: Recipe(with_operand(op, lambda b: scalar(b, 0.0))) for op in ("Greater", "Less")},
    **{op: Recipe(with_operand(op, lambda b: scalar(b, 0.0))) for op in ("Equal", "GreaterOrEqual", "LessOrEqual")},
    "BitShift": Recipe(lambda b, x: b.op("BitShift", [b.op("Cast", [b.op("Relu", [x])], to=TensorProto.UINT8),
                                                       b.const(np.array(1, np.uint8))], direction="RIGHT")),
    # binary with a constant: zeroed with the channel where it is per channel, kept where it is broadcast
    "Add": Recipe(with_operand("Add", lambda b: scalar(b, 0.25))),
    "Sub": Recipe(with_operand("Sub", per_channel)),
    "Mul": Recipe(with_operand("Mul", lambda b: scalar(b, 1.5))),
    "Div": Recipe(with_operand("Div", per_channel)),
    "Max": Recipe(with_operand("Max", lambda b: scalar(b, 0.5))),
    "Min": Recipe(with_operand("Min", lambda b: scalar(b, 6.0))),
    "Sum": Recipe(with_operand("Sum", per_channel)),
    "Mean": Recipe(with_operand("Mean", lambda b: scalar(b, 1.0))),
    "Pow": Recipe(with_operand("Pow", lambda b: scalar(b, 2.0))),
    "Mod": Recipe(with_operand("Mod", lambda b: scalar(b, 1.5), fmod=1)),
    "PRelu": Recipe(with_operand("PRelu", lambda b: per_channel(b, 0.1, 0.3))),
    "Where": Recipe(lambda b, x: b.op("Where", [b.const(b.rng.uniform(size=(1, 1, H, W)) > 0.5), x, scalar(b, 0.5)]),
                    INEXACT),
    # norms
    "BatchNormalization": Recipe(lambda b, x: b.bn(x, C)),
    "InstanceNormalization": Recipe(lambda b, x: b.op("InstanceNormalization", [
        x, b.const(np.ones(C, np.float32)), b.const(np.full(C, 0.1, np.float32))])),
    "LayerNormalization": Recipe(lambda b, x: b.op("LayerNormalization", [
        x, b.const(np.ones(W, np.float32)), b.const(np.full(W, 0.1, np.float32))], axis=-1), INEXACT),
    # pooling and reductions over space (over the channels: tests/test_norm_rules.py)
    **{op: Recipe(unary(op, kernel_shape=[3, 3], pads=[1, 1, 1, 1])) for op in ("MaxPool", "AveragePool", "LpPool")},
    **{op: Recipe(unary(op)) for op in ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")},
    **{op: Recipe(unary(op, axis=3), INEXACT) for op in ("Softmax", "LogSoftmax", "Hardmax")},
    **{op: Recipe(unary(op, axis=3, keepdims=1)) for op in ("ArgMax", "ArgMin")},
    **{op: Recipe(reduce_over_width(op)) for op in (
        "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare")},
    **{op: Recipe(reduce_over_width(op), INEXACT) for op in ("ReduceLogSum", "ReduceLogSumExp")},
    # moving and cutting axes
    "Pad": Recipe(lambda b, x: b.op("Pad", [x, ints(b, 0, 0, 1, 1, 0, 0, 1, 1), scalar(b, 0.5)]), INEXACT),
    "Resize": Recipe(lambda b, x: b.op("Resize", [x, "", b.const(np.array([1, 1, 2, 2], np.float32))],
                                       mode="nearest")),
    "Transpose": Recipe(unary("Transpose", perm=[0, 1, 3, 2])),
    "Slice": Recipe(lambda b, x: b.op("Slice", [x, ints(b, 1), ints(b, 5), ints(b, 3)])),
    "Concat": Recipe(lambda b, x: b.op("Concat", [x, x], axis=3)),
    "Split": Recipe(lambda b, x: b.op("Split", [x, ints(b, 2, 4)], n_out=2, axis=3)[1]),
    "Gather": Recipe(lambda b, x: b.op("Gather", [x, ints(b, 0, 2, 4)], axis=3)),
    "Unsqueeze": Recipe(lambda b, x: b.op("Unsqueeze", [x, ints(b, 4)]),
                        tail=lambda b, y: conv_tail(b, b.op("Squeeze", [y, ints(b, 4)]))),
    "Squeeze": Recipe(lambda b, x: b.op("Squeeze", [b.op("Unsqueeze", [x, ints(b, 4)]), ints(b, 4)])),
    "Reshape": Recipe(lambda b, x: b.op("Reshape", [x, ints(b, 1, C, W, H)])),
    "Expand": Recipe(lambda b, x: b.op("Expand", [x, ints(b, 2, 1, 1, 1)])),
    "Tile": Recipe(lambda b, x: b.op("Tile", [x, ints(b, 1, 1, 2, 1)])),
    "Flatten": Recipe(pooled, tail=gemm_tail),
    "Shape": Recipe(same_shape_from_shape),
    # layers
    "Conv": Recipe(lambda b, x: b.conv(x, C, C)),
    "ConvTranspose": Recipe(conv_transpose),
    "Gemm": Recipe(lambda b, x: b.gemm(pooled(b, x), C, C), tail=gemm_tail),
    "MatMul": Recipe(lambda b, x: b.op("MatMul", [channels_last(b, x), b.weight(C, C)]), tail=matmul_tail),
    "Einsum": Recipe(lambda b, x: b.op("Einsum", [channels_last(b, x), b.weight(C, C)], equation="nhwc,cd->nhwd"),
                     tail=matmul_tail),
    "OneHot": Recipe(lambda b, x: b.op("OneHot", [b.op("Cast", [b.op("Relu", [x])], to=TensorProto.INT64),
                                                   ints(b, 3), b.const(np.array([0, 1], np.float32))]), FROZEN,
                     tail=lambda b, y: conv_tail(b, b.op("ReduceSum", [y, ints(b, -1)], keepdims=0))),
    # control flow (more in tests/test_subgraphs.py)
    "If": Recipe(if_branches),
    "Loop": Recipe(loop_carrying, output_shape=[1, 4, H, W]),
    "Scan": Recipe(scan_over_batch, output_shape=[1, 4, H, W]),
    # quantization: QDQ prunes; QOperator and integer layers freeze with the reason
    "QuantizeLinear": Recipe(quantized),
    "DequantizeLinear": Recipe(quantized),
    "QLinearConv": Recipe(qlinear_conv, FROZEN),
    "ConvInteger": Recipe(conv_integer, FROZEN),
    "MatMulInteger": Recipe(matmul_integer, FROZEN, tail=lambda b, y: matmul_tail(b, b.op("Cast", [y], to=F))),
    "QLinearMatMul": Recipe(qlinear_matmul, FROZEN, tail=matmul_tail),
}


def build(op: str) -> tuple[onnx.ModelProto, onnx.NodeProto]:
    """The recipe's model, and its OP node (the last one the recipe made: the stem and the readers come around it)."""
    recipe = RECIPES[op]
    b = GraphBuilder(seed=0, opset=recipe.opset)
    x = b.conv(b.input([1, 3, H, W]), 3, C)
    y = recipe.build(b, x)
    node = next(n for n in reversed(b.nodes) if n.op_type == op)
    model = b.model(recipe.tail(b, y))
    if recipe.output_shape:
        declared = model.graph.output.pop()
        model.graph.output.append(helper.make_tensor_value_info(declared.name, F, recipe.output_shape))
    return model, node


def test_every_registered_op_has_a_recipe():
    """Both ways: a recipe for an op without a rule is stale."""
    assert not set(RECIPES) - set(REGISTRY), f"recipes for ops without a rule: {sorted(set(RECIPES) - set(REGISTRY))}"


@pytest.mark.parametrize("op", sorted(REGISTRY))
def test_op_is_exact_or_says_why_not(op: str):
    if op not in RECIPES:
        pytest.fail(f"op {op} has a rule but no recipe in tests/test_every_op.py: add one line to RECIPES saying how "
                    f"to build it and whether it prunes exactly, is marked inexact or freezes")
    expect = RECIPES[op].expect
    model, node = build(op)
    prepared, plan = planned(model, 0.5)
    touching = [g for g in prepared.analysis.groups if _touches(g, node)]
    through = [g for g in touching if g.id in plan.keep]
    if expect == FROZEN:
        named = [g for g in touching if g.size == C and any(f"'{node.name}'" in r for r in g.frozen)]
        assert named and not through, f"{op}: {[(g.size, g.frozen) for g in touching]}"
        return
    assert through, f"no pruned group touches {op}: {[(g.size, g.frozen) for g in touching]}"
    marked = [g for g in through if g.inexact]
    if expect == INEXACT:
        assert marked == through and all(any(f"'{node.name}'" in r for r in g.inexact) for g in through), \
            [g.inexact for g in through]
        _prunes_to_a_valid_model(prepared, plan, model)
    else:
        assert not marked, [g.inexact for g in marked]
        prune_exact(model, 0.5, atol=1e-4)


def _touches(group, node: onnx.NodeProto) -> bool:
    tensors = set(node.input) | set(node.output)
    return any(m.space[0] in tensors and not m.constant for m in group.members)


def _prunes_to_a_valid_model(prepared, plan, model: onnx.ModelProto) -> None:
    """Inexact groups pruned too: the model is still valid, keeps its inputs and outputs, and runs."""
    pruned = apply_plan(onnx.ModelProto.FromString(prepared.model.SerializeToString()), prepared.analysis, plan)
    check_valid(pruned)
    outputs = run(pruned, feeds_at(model, seed=1, batch=1, length=1))
    assert [o.shape for o in outputs] == [tuple(d.dim_value for d in o.type.tensor_type.shape.dim)
                                          for o in model.graph.output]


# ------------------------------------------------------------------------------------------------ Einsum layers
TOKENS, HIDDEN = 16, 24


def einsum_mlp(equation: str, weight_shape: tuple[int, ...]) -> onnx.ModelProto:
    """tokens (N, 6, 16) -> linear 16 -> 24 -> Einsum(equation, a constant weight) -> linear reading the last axis."""
    b = GraphBuilder(seed=9)
    h = b.op("Relu", [b.matmul(b.input(["N", 6, TOKENS]), TOKENS, HIDDEN)])
    y = b.op("Einsum", [h, b.weight(*weight_shape)], equation=equation)
    return b.model(b.matmul(b.op("Relu", [y]), weight_shape[-1 if "kj" not in equation else 0], TOKENS))


EINSUM_LINEAR = {  # equation -> weight shape: the forms exporters write for a linear layer
    "bij,jk->bik": (HIDDEN, 32),
    "bij,kj->bik": (32, HIDDEN),
    "...j,jk->...k": (HIDDEN, 32),
    "bij,jk": (HIDDEN, 32),  # implicit output: "bik"
    "...j,jk": (HIDDEN, 32),  # implicit output: "...k"
}


@pytest.mark.parametrize("equation", sorted(EINSUM_LINEAR))
def test_einsum_linear_layer_is_a_layer(equation):
    """Its weight has roles (criteria score it), its MACs count, surgery slices both of its axes, exactly."""
    model = einsum_mlp(equation, EINSUM_LINEAR[equation])
    einsum = next(n for n in model.graph.node if n.op_type == "Einsum")
    assert layer_macs(model)[einsum.name] == 6 * HIDDEN * 32
    pruned, analysis, plan = prune_exact(model)
    roles = {m.role for g in analysis.groups for m in g.members if m.space[0] == einsum.input[1]}
    assert roles == {Role.W_IN, Role.W_OUT}
    weight = next(i for i in pruned.graph.initializer if i.name == einsum.input[1])
    assert sorted(weight.dims) == sorted(d // 2 for d in EINSUM_LINEAR[equation])


def test_einsum_linear_layer_is_refitted():
    model = einsum_mlp("bij,jk->bik", EINSUM_LINEAR["bij,jk->bik"])
    feeds = [{"x": np.random.default_rng(k).standard_normal((4, 6, TOKENS)).astype(np.float32)} for k in range(4)]
    _, report = onnxprune.prune(model, 0.5, Options(recover="lsq", round_to=1, calib=CalibrationSource(feeds)))
    assert report.to_dict()["recovered_layers"] >= 2  # the Einsum and the MatMul after it lost input channels


def test_einsum_per_head_weights():
    """'bhid,hdk->bhik': a weight per head; heads are a letter of the weight that is no channel of it."""
    b = GraphBuilder(seed=10)
    heads = b.op("Reshape", [b.matmul(b.input(["N", 6, TOKENS]), TOKENS, 32), ints(b, 0, 0, 4, 8)])
    heads = b.op("Transpose", [heads], perm=[0, 2, 1, 3])  # (N, 4, 6, 8)
    y = b.op("Einsum", [heads, b.weight(4, 8, 12)], equation="bhid,hdk->bhik")
    y = b.op("Reshape", [b.op("Transpose", [b.op("Relu", [y])], perm=[0, 2, 1, 3]), ints(b, 0, 0, 48)])
    model = b.model(b.matmul(y, 48, TOKENS))
    einsum = next(n for n in model.graph.node if n.op_type == "Einsum")
    assert layer_macs(model)[einsum.name] == 4 * 6 * 8 * 12
    pruned, analysis, plan = prune_exact(model)
    roles = {m.space[1]: m.role for g in analysis.groups for m in g.members if m.space[0] == einsum.input[1]}
    assert roles == {0: None, 1: Role.W_IN, 2: Role.W_OUT}
    weight = next(i for i in pruned.graph.initializer if i.name == einsum.input[1])
    assert list(weight.dims) == [2, 8, 12]  # whole heads go (the merge after it keeps each head's 12 outputs whole)


def test_keras_multi_head_projections():
    """Keras EinsumDense in MultiHeadAttention: 'abc,cde->abde' makes (heads, head size) out of the hidden size and
    'abcd,cde->abe' sums them back; both are layers and prune exactly."""
    b = GraphBuilder(seed=11)
    x = b.input(["N", 6, TOKENS])
    heads = b.op("Einsum", [x, b.weight(TOKENS, 4, 8)], equation="abc,cde->abde")  # (N, 6, 4, 8)
    y = b.op("Einsum", [b.op("Relu", [heads]), b.weight(4, 8, TOKENS)], equation="abcd,cde->abe")
    model = b.model(b.matmul(b.op("Relu", [y]), TOKENS, 4))
    einsums = [n for n in model.graph.node if n.op_type == "Einsum"]
    assert [layer_macs(model)[n.name] for n in einsums] == [6 * TOKENS * 4 * 8] * 2
    pruned, analysis, plan = prune_exact(model)
    sizes = sorted(analysis.groups[g].size for g in plan.keep)
    assert sizes == [4, 8, TOKENS]  # heads, head size, the second projection's outputs
    assert sorted(tuple(i.dims) for i in pruned.graph.initializer if len(i.dims) == 3) == [(2, 4, 8), (TOKENS, 2, 4)]


def test_einsum_with_an_ellipsis_broadcast_over_the_weight():
    """'...ij,...jk->...ik' with a weight (1, 1, j, k): its size-1 ellipsis axes broadcast and stay out of the
    groups; both channel axes prune exactly."""
    b = GraphBuilder(seed=12)
    h = b.op("Relu", [b.matmul(b.input(["N", 3, 6, TOKENS]), TOKENS, HIDDEN)])
    y = b.op("Einsum", [h, b.weight(1, 1, HIDDEN, 32)], equation="...ij,...jk->...ik")
    model = b.model(b.matmul(b.op("Relu", [y]), 32, 4))
    einsum = next(n for n in model.graph.node if n.op_type == "Einsum")
    assert layer_macs(model)[einsum.name] == 3 * 6 * HIDDEN * 32
    pruned, _, _ = prune_exact(model)
    assert [list(i.dims) for i in pruned.graph.initializer if i.name == einsum.input[1]] == [[1, 1, HIDDEN // 2, 16]]
