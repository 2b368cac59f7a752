"""Constant folding in normalisation (onnxprune/fold.py): arithmetic on constants becomes initializers, so the
rules read it, without duplicating weights."""
import numpy as np
import onnx
from builders import GraphBuilder
from exactness import prune_exact
from onnx import TensorProto, helper

from onnxprune.graph import normalize
from onnxprune.pipeline import prepare
from onnxprune.verify import random_feeds, run


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def normalized(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    normalize(copy)
    return copy


def same_outputs(model: onnx.ModelProto, other: onnx.ModelProto) -> None:
    feeds = random_feeds(model, seed=0, batch=2)
    for a, b in zip(run(model, feeds), run(other, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # float rounding of the folded math


def computed_pads(b: GraphBuilder, rank: int = 4) -> str:
    """pads = Concat(ConstantOfShape([2]) of 0, [1, 1]) padded to 2*rank with a Slice/Cast chain, as torch emits for
    F.pad with a list: every input is a constant, nothing reads a shape."""
    zeros = b.op("ConstantOfShape", [b.const(np.array([rank], np.int64))],
                 value=helper.make_tensor("v", TensorProto.INT64, [1], [0]))
    ones = b.op("Cast", [b.const(np.array([1.0, 1.0], np.float32))], to=TensorProto.INT64)
    head = b.op("Slice", [zeros, b.const(np.array([0], np.int64)), b.const(np.array([2], np.int64))])
    spatial = b.op("Concat", [head, ones], axis=0)  # begins: 0, 0, 1, 1
    return b.op("Concat", [spatial, spatial], axis=0)


def test_pads_built_from_constants_fold_and_the_convs_around_the_pad_prune():
    b = GraphBuilder()
    x = b.op("Relu", [b.conv(b.input(["N", 3, 8, 8]), 3, 16)])
    y = b.op("Pad", [x, computed_pads(b)], mode="reflect")
    model = b.model(b.conv(y, 16, 4))
    folded = normalized(model)
    assert ops(folded) == ["Conv", "Relu", "Pad", "Conv"]
    same_outputs(model, folded)
    _, analysis, plan = prune_exact(model)
    assert not any("computed at run time" in r for r in analysis.barriers)


def standardised_weight(b: GraphBuilder, cout: int, cin: int) -> str:
    """W' = (W - mean(W)) / sqrt(var(W) + eps) per output channel, then a gain: NF-ResNet's ScaledStdConv2d."""
    w = b.weight(cout, cin, 3, 3)
    mean = b.op("ReduceMean", [w], axes=[1, 2, 3], keepdims=1)
    centred = b.op("Sub", [w, mean])
    var = b.op("ReduceMean", [b.op("Mul", [centred, centred])], axes=[1, 2, 3], keepdims=1)
    std = b.op("Sqrt", [b.op("Add", [var, b.const(np.float32(1e-5))])])
    gain = b.const(np.random.default_rng(3).uniform(0.5, 1.5, (cout, 1, 1, 1)).astype(np.float32))
    return b.op("Mul", [b.op("Div", [centred, std]), gain])


def ws_conv(b: GraphBuilder, x: str, cin: int, cout: int) -> str:
    bias = b.const(np.zeros(cout, np.float32))
    return b.op("Conv", [x, standardised_weight(b, cout, cin), bias], kernel_shape=[3, 3], pads=[1, 1, 1, 1])


def test_weight_standardisation_folds_into_a_plain_weight_and_the_conv_pair_prunes_exactly():
    b = GraphBuilder()
    x = b.op("Relu", [ws_conv(b, b.input(["N", 3, 8, 8]), 3, 16)])
    model = b.model(ws_conv(b, x, 16, 4))
    folded = normalized(model)
    assert ops(folded) == ["Conv", "Relu", "Conv"]
    assert len(folded.graph.initializer) == 4  # two weights and two biases: the raw weights died with the region
    same_outputs(model, folded)
    _, analysis, _ = prune_exact(model)
    assert any(g.prunable and g.size == 16 for g in analysis.groups)


def test_a_large_result_that_would_copy_a_live_weight_is_not_folded():
    b = GraphBuilder()
    x = b.input(["N", 64, 8, 8])
    w = b.weight(64, 64, 3, 3)  # read by the first conv and, doubled, by the second
    y = b.op("Conv", [x, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    doubled = b.op("Mul", [w, b.const(np.float32(2.0))])
    model = b.model(b.op("Conv", [y, doubled], kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    assert ops(normalized(model)) == ["Conv", "Mul", "Conv"]


def test_small_results_fold_even_when_their_constants_live_on():
    b = GraphBuilder()
    x = b.input(["N", 4, 8, 8])
    w = b.weight(4, 4, 1, 1)
    y = b.op("Conv", [x, w])
    model = b.model(b.op("Conv", [y, b.op("Neg", [w])]))
    folded = normalized(model)
    assert ops(folded) == ["Conv", "Conv"]
    same_outputs(model, folded)


def test_dequantize_of_a_quantized_weight_stays():
    b = GraphBuilder(opset=13)
    x = b.input(["N", 4, 8, 8])
    q = b.const(np.arange(16, dtype=np.int8).reshape(4, 4, 1, 1))
    w = b.op("DequantizeLinear", [q, b.const(np.float32(0.1)), b.const(np.int8(0))])
    model = b.model(b.op("Conv", [x, w]))
    assert ops(normalized(model)) == ["DequantizeLinear", "Conv"]


def test_a_graph_output_computed_from_constants_keeps_its_node():
    b = GraphBuilder()
    x = b.input(["N", 4])
    shift = b.op("Neg", [b.const(np.ones(4, np.float32))])
    model = b.model(b.op("Add", [x, shift]), shift)
    folded = normalized(model)
    assert ops(folded) == ["Neg", "Add"]
    prepare(folded)  # still a valid model for the analysis


def test_random_ops_are_not_constants():
    b = GraphBuilder()
    x = b.input([2, 4])
    noise = b.op("RandomUniformLike", [b.const(np.zeros((2, 4), np.float32))])
    model = b.model(b.op("Add", [x, noise]))
    assert "RandomUniformLike" in ops(normalized(model))
