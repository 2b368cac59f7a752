"""Reductions and the normalisations exporters spell out with them (issue 10): a reduction over other axes carries the
channels; one over the channels consumes them, exactly where a removed (zero) channel adds nothing (Sum, L1, L2, ...)
and with an inexact mark where it does not (Mean, Max, ...); decomposed LayerNorm and RMSNorm give a prunable group
marked inexact, not a frozen one, and leave the other groups exact."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import GraphBuilder
from exactness import feeds_at, planned, prune_exact

import onnxprune
from onnxprune.pipeline import prepare
from onnxprune.rules.shape import REDUCE, REDUCED_INEXACT
from onnxprune.surgery import apply_plan
from onnxprune.verify import run, zero_removed_channels

C = 16
EXACT_OVER_CHANNELS = sorted(set(REDUCE) - set(REDUCED_INEXACT))


def reduce_model(op: str, axes: list[int] | None, keepdims: int = 1, opset: int = 18, sign: str = "",
                 consumer: bool = False, **attrs) -> onnx.ModelProto:
    """conv (3 -> C) -> [Abs, and Neg for `sign` "-"] -> OP over `axes` (an input from opset 18, an attribute
    before) [-> a layer reading the channels: a 1x1 conv, or a Gemm where the spatial axes are gone]."""
    b = GraphBuilder(opset=opset)
    x = b.conv(b.input(["N", 3, 6, 6]), 3, C)
    x = b.op("Abs", [x]) if sign else x
    x = b.op("Neg", [x]) if sign == "-" else x
    if opset >= 18 or op == "ReduceSum" and opset >= 13:
        inputs = [x, b.const(np.array(axes, np.int64))] if axes is not None else [x]
        y = b.op(op, inputs, keepdims=keepdims, **attrs)
    else:
        y = b.op(op, [x], axes=axes, keepdims=keepdims, **attrs)
    if consumer:
        y = b.conv(y, C, 4, k=1) if keepdims else b.gemm(y, C, 4)
    return b.model(y)


def stem_group(model: onnx.ModelProto):
    return next(g for g in prepare(model).analysis.groups if g.size == C)


def pruned_difference(model: onnx.ModelProto) -> float:
    """Largest output difference between the original with the removed channels zeroed and the pruned model, every
    group of the plan pruned (inexact ones too)."""
    prepared, plan = planned(model, 0.5)
    zeroed = zero_removed_channels(prepared.model, prepared.analysis, plan)
    again = prepare(zeroed)
    pruned = apply_plan(again.model, again.analysis, plan)
    feeds = feeds_at(model, seed=1, batch=2, length=6)
    return max(float(np.max(np.abs(e - g))) for e, g in zip(run(zeroed, feeds), run(pruned, feeds)))


# ------------------------------------------------------------------------------------------------ over other axes
@pytest.mark.parametrize("op", REDUCE)
def test_reduction_over_space_carries_the_channels(op):
    """Negative axes, keepdims 0, axes as an input: the channels flow through, exact or marked where f(0) != 0."""
    model = reduce_model(op, [-2, -1], keepdims=0, sign="+" if op == "ReduceLogSum" else "", consumer=True)
    group = stem_group(model)
    assert group.prunable, group.frozen
    if op in ("ReduceLogSum", "ReduceLogSumExp"):  # of zeros: -inf, log n, which the Gemm would lose
        assert any(op in r and "Gemm" in r for r in group.inexact), group.inexact
        return
    assert not group.inexact
    prune_exact(model)


@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduction_over_space_with_attribute_axes(keepdims):
    prune_exact(reduce_model("ReduceMax", [2, 3], keepdims=keepdims, opset=13, consumer=True))


def test_noop_with_empty_axes_is_the_identity():
    model = reduce_model("ReduceSum", [], noop_with_empty_axes=1, consumer=True)
    reduced = next(n.output[0] for n in model.graph.node if n.op_type == "ReduceSum")
    assert (reduced, 1) in {m.space for m in stem_group(model).members}  # its output has the channels
    prune_exact(model)


# ------------------------------------------------------------------------------------------------ over the channels
@pytest.mark.parametrize("op", EXACT_OVER_CHANNELS)
def test_reduction_over_channels_that_zeros_do_not_change_is_exact(op):
    model = reduce_model(op, [-3], sign="+" if op == "ReduceLogSum" else "")
    assert not stem_group(model).inexact
    prune_exact(model)


@pytest.mark.parametrize("op", sorted(REDUCED_INEXACT))
def test_reduction_over_channels_that_zeros_change_is_marked(op):
    """Marked with the op and why, and the mark is needed: pruning through it changes the outputs (for Max every
    kept channel negative, for Min positive: the removed zeros were the extreme)."""
    model = reduce_model(op, [1], keepdims=0, sign={"ReduceMax": "-", "ReduceMin": "+"}.get(op, ""))
    group = stem_group(model)
    assert group.prunable and any(op in r and REDUCED_INEXACT[op] in r for r in group.inexact), group.inexact
    assert pruned_difference(model) > 1e-3


def test_reduction_of_every_axis_consumes_the_channels():
    prune_exact(reduce_model("ReduceL2", None, keepdims=0))


def test_l2_normalisation_over_channels_is_exact():
    """x / ||x|| over the channels (embedding heads): zeros leave the norm as it is, and 0 / d = 0."""
    b = GraphBuilder(opset=18)
    x = b.conv(b.input(["N", 3, 6, 6]), 3, C)
    norm = b.op("ReduceL2", [x, b.const(np.array([1], np.int64))], keepdims=1)
    model = b.model(b.conv(b.op("Div", [x, norm]), C, 4, k=1))
    assert not stem_group(model).inexact
    prune_exact(model)


def test_sum_over_channels_of_a_constant_is_marked():
    """Sigmoid(0) = 0.5 for a removed channel, which the sum then loses."""
    b = GraphBuilder(opset=18)
    x = b.op("Sigmoid", [b.conv(b.input(["N", 3, 6, 6]), 3, C)])
    model = b.model(b.op("ReduceSum", [x, b.const(np.array([1], np.int64))], keepdims=1))
    assert any("Sigmoid" in r and "ReduceSum" in r for r in stem_group(model).inexact)


# ------------------------------------------------------------------------------------------------ decomposed norms
D, HIDDEN = 32, 64


def _plain_layer_norm(b: GraphBuilder, x: str, axis: int, gamma: str, beta: str) -> str:
    """torch.onnx (before LayerNormalization), tf2onnx of tf.nn.moments: (x - mean) / sqrt(var + eps)."""
    d = b.op("Sub", [x, _mean(b, x, axis)])
    var = _mean(b, b.op("Pow", [d, b.const(np.float32(2.0))]), axis)
    y = b.op("Div", [d, b.op("Sqrt", [b.op("Add", [var, b.const(np.float32(1e-5))])])])
    return b.op("Add", [b.op("Mul", [y, gamma]), beta])


def _keras_layer_norm(b: GraphBuilder, x: str, axis: int, gamma: str, beta: str) -> str:
    """tf2onnx of Keras LayerNormalization: x * (gamma * rsqrt(var + eps)) + (beta - mean * gamma * rsqrt(...))."""
    mean = _mean(b, x, axis)
    d = b.op("Sub", [x, mean])
    var = _mean(b, b.op("Mul", [d, d]), axis)
    rsqrt = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [var, b.const(np.float32(1e-3))])])])
    scale = b.op("Mul", [rsqrt, gamma])
    return b.op("Add", [b.op("Mul", [x, scale]), b.op("Sub", [beta, b.op("Mul", [mean, scale])])])


def _jax_layer_norm(b: GraphBuilder, x: str, axis: int, gamma: str, beta: str) -> str:
    """jax2tf of flax LayerNorm (fast variance): var = max(0, mean(x^2) - mean(x)^2)."""
    mean = _mean(b, x, axis)
    var = b.op("Sub", [_mean(b, b.op("Mul", [x, x]), axis), b.op("Mul", [mean, mean])])
    var = b.op("Max", [var, b.const(np.float32(0.0))])
    scale = b.op("Mul", [b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [var, b.const(np.float32(1e-6))])])]), gamma])
    return b.op("Add", [b.op("Mul", [b.op("Sub", [x, mean]), scale]), beta])


def _rms_norm_reciprocal(b: GraphBuilder, x: str, axis: int, gamma: str, beta: str) -> str:
    """RMSNorm, x * rsqrt(mean(x^2) + eps) * gamma (no shift)."""
    ms = _mean(b, b.op("Pow", [x, b.const(np.float32(2.0))]), axis)
    rsqrt = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [ms, b.const(np.float32(1e-6))])])])
    return b.op("Mul", [b.op("Mul", [x, rsqrt]), gamma])


def _rms_norm_div(b: GraphBuilder, x: str, axis: int, gamma: str, beta: str) -> str:
    """RMSNorm, x / sqrt(mean(x^2) + eps) * gamma."""
    ms = _mean(b, b.op("Mul", [x, x]), axis)
    return b.op("Mul", [b.op("Div", [x, b.op("Sqrt", [b.op("Add", [ms, b.const(np.float32(1e-6))])])]), gamma])


def _mean(b: GraphBuilder, x: str, axis: int) -> str:
    if b.opset >= 18:
        return b.op("ReduceMean", [x, b.const(np.array([axis], np.int64))], keepdims=1)
    return b.op("ReduceMean", [x], axes=[axis], keepdims=1)


NORMS = {"plain": _plain_layer_norm, "keras": _keras_layer_norm, "jax": _jax_layer_norm,
         "rms_reciprocal": _rms_norm_reciprocal, "rms_div": _rms_norm_div}


def tokens_with_norm(norm, opset: int) -> onnx.ModelProto:
    """tokens -> linear (16 -> D) -> NORM over D -> linear (D -> HIDDEN) -> relu -> linear (HIDDEN -> 16)."""
    b = GraphBuilder(seed=4, opset=opset)
    h = b.matmul(b.input(["N", 6, 16]), 16, D)
    gamma = b.const(b.rng.uniform(0.5, 1.5, D).astype(np.float32))
    beta = b.const(b.rng.normal(0, 0.1, D).astype(np.float32))
    h = norm(b, h, -1, gamma, beta)
    h = b.op("Relu", [b.matmul(h, D, HIDDEN)])
    return b.model(b.matmul(h, HIDDEN, 16))


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("form", sorted(NORMS))
def test_decomposed_norm_is_an_inexact_group(form, opset):
    model = tokens_with_norm(NORMS[form], opset)
    analysis = prepare(model).analysis
    normed = next(g for g in analysis.groups if g.size == D)
    assert normed.prunable and any("ReduceMean" in r and "number of channels" in r for r in normed.inexact)
    hidden = next(g for g in analysis.groups if g.size == HIDDEN)
    assert hidden.prunable and not hidden.inexact
    _, _, plan = prune_exact(model, exact_groups_only=True, length=3)
    assert hidden.id in plan.keep and normed.id not in plan.keep


def test_decomposed_norm_over_conv_channels():
    """LayerNorm2d (ConvNeXt-style, channels of an NCHW tensor) spelled out: inexact, the next conv's group exact."""
    b = GraphBuilder(seed=5)
    x = b.conv(b.input(["N", 3, 6, 6]), 3, D)
    gamma = b.const(b.rng.uniform(0.5, 1.5, (D, 1, 1)).astype(np.float32))
    beta = b.const(b.rng.normal(0, 0.1, (D, 1, 1)).astype(np.float32))
    x = b.op("Relu", [b.conv(_plain_layer_norm(b, x, 1, gamma, beta), D, HIDDEN)])
    model = b.model(b.conv(x, HIDDEN, 4))
    normed = next(g for g in prepare(model).analysis.groups if g.size == D)
    assert normed.prunable and normed.inexact
    prune_exact(model, exact_groups_only=True)


def test_decomposed_norm_prunes_to_a_valid_model():
    model = tokens_with_norm(_keras_layer_norm, 17)
    pruned, report = onnxprune.prune(model, 0.5)
    onnx.checker.check_model(pruned, full_check=True)
    assert [g["channels"] - g["kept"] for g in report.to_dict()["groups"] if g["inexact"]] == [D // 2]


def test_layer_norm_over_channels_and_space_is_an_inexact_group():
    """LayerNormalization from axis 1 of an NCHW tensor (GroupNorm with one group, as timm exports it)."""
    b = GraphBuilder(seed=6)
    x = b.conv(b.input(["N", 3, 6, 6]), 3, D)
    scale = b.const(b.rng.uniform(0.5, 1.5, (D, 6, 6)).astype(np.float32))
    shift = b.const(b.rng.normal(0, 0.1, (D, 6, 6)).astype(np.float32))
    x = b.op("Relu", [b.conv(b.op("LayerNormalization", [x, scale, shift], axis=1), D, HIDDEN)])
    model = b.model(b.conv(x, HIDDEN, 4))
    normed = next(g for g in prepare(model).analysis.groups if g.size == D)
    assert normed.prunable and any("LayerNormalization" in r for r in normed.inexact)
    assert {(scale, 0), (shift, 0)} <= {m.space for m in normed.members}
    prune_exact(model, exact_groups_only=True)
    pruned, _ = onnxprune.prune(model, 0.5, onnxprune.Options(round_to=1))
    assert [list(i.dims) for i in pruned.graph.initializer if i.name == scale] == [[D // 2, 6, 6]]
