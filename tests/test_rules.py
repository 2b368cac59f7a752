"""One exactness test per op rule, on small graphs built in code: stem conv -> the op -> a consumer conv."""
import numpy as np
import onnx
import pytest
from builders import GraphBuilder
from exactness import prune_exact

from onnxprune.pipeline import prepare
from onnxprune.rules.elementwise import UNARY

C = 16


def sandwich(body, opset: int = 17, channels_out: int | None = None, consumer: str = "conv") -> onnx.ModelProto:
    """input -> conv(3->16)+relu -> body -> consumer, so the body's channels are produced and consumed by weights."""
    b = GraphBuilder(opset=opset)
    x = b.op("Relu", [b.conv(b.input(["N", 3, 8, 8]), 3, C)])
    y = body(b, x)
    c = channels_out or C
    out = b.conv(y, c, 4) if consumer == "conv" else y
    return b.model(out)


# ------------------------------------------------------------------------------------------------ element-wise
FLOAT_UNARY = [op for op in UNARY if op not in ("Not", "IsNaN", "IsInf", "Cast")]
_UNARY_ATTRS = {"Clip": {}, "LeakyRelu": {"alpha": 0.1}, "ThresholdedRelu": {"alpha": 0.5}}


@pytest.mark.parametrize("op", FLOAT_UNARY)
def test_unary(op):
    def body(b, x):
        positive = b.op("Add", [b.op("Abs", [x]), b.const(np.float32(1.0))])  # Log, Sqrt, Reciprocal need > 0
        return b.op("Mul", [b.op(op, [positive], **_UNARY_ATTRS.get(op, {})), x])  # f(..)*0 keeps removed ones 0
    prune_exact(sandwich(body, opset=20))


def test_cast_and_dropout_and_clip_with_bounds():
    def body(b, x):
        y = b.op("Cast", [x], to=onnx.TensorProto.FLOAT)
        y = b.op("Dropout", [y], n_out=2)[0]
        return b.op("Clip", [y, b.const(np.float32(-1)), b.const(np.float32(2))])
    prune_exact(sandwich(body))


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu"])
def test_binary_with_per_channel_constant(op):
    def body(b, x):
        c = np.random.default_rng(0).uniform(0.5, 2.0, (C, 1, 1)).astype(np.float32)
        x = b.op("Abs", [x]) if op == "Pow" else x
        return b.op(op, [x, b.const(c)])
    prune_exact(sandwich(body))


def test_binary_with_scalar_and_broadcast_row():
    def body(b, x):
        y = b.op("Add", [x, b.const(np.float32(0.5))])
        y = b.op("Mul", [y, x])
        return b.op("Mul", [y, b.const(np.arange(8, dtype=np.float32).reshape(1, 1, 1, 8))])  # over W, not channels
    prune_exact(sandwich(body))


@pytest.mark.parametrize("op", ["Add", "Sum", "Mean", "Max", "Min", "Mul"])
def test_two_variable_inputs_couple(op):
    def body(b, x):
        other = b.op("Relu", [b.conv(x, C, C)])
        return b.op(op, [x, other])
    _, analysis, plan = prune_exact(sandwich(body))


def test_where_with_constant_condition():
    def body(b, x):
        cond = b.const(np.random.default_rng(1).random((C, 1, 1)) > 0.5)
        return b.op("Where", [cond, x, b.op("Neg", [x])])
    prune_exact(sandwich(body))


# ------------------------------------------------------------------------------------------------ pooling, reduce
@pytest.mark.parametrize("op,attrs", [("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
                                      ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
                                      ("LpPool", {"kernel_shape": [2, 2]}),
                                      ("GlobalAveragePool", {}), ("GlobalMaxPool", {})])
def test_pooling(op, attrs):
    prune_exact(sandwich(lambda b, x: b.op(op, [x], **attrs)))


@pytest.mark.parametrize("opset", [13, 18])
@pytest.mark.parametrize("keepdims", [0, 1])
def test_reduce_over_space(opset, keepdims):
    def body(b, x):
        axes = {"axes": [2, 3]} if opset < 18 else {}
        inputs = [x] if opset < 18 else [x, b.const(np.array([2, 3], np.int64))]
        y = b.op("ReduceMean", inputs, keepdims=keepdims, **axes)
        return b.gemm(y, C, 4) if not keepdims else b.conv(y, C, 4, k=1)
    prune_exact(sandwich(body, opset=opset, consumer="none"))


def test_reduce_sum_over_channels_is_exact():  # other reductions over channels: tests/test_norm_rules.py
    prune_exact(sandwich(lambda b, x: b.op("ReduceSum", [x, b.const(np.array([1], np.int64))], keepdims=1),
                         channels_out=1))


# ------------------------------------------------------------------------------------------------ shape ops
def test_pad_on_space():
    prune_exact(sandwich(lambda b, x: b.op("Pad", [x, b.const(np.array([0, 0, 1, 2, 0, 0, 1, 2], np.int64))],
                                     mode="reflect")))


def test_pad_on_channels_freezes_them():
    model = sandwich(lambda b, x: b.op("Pad", [x, b.const(np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64))]),
                     channels_out=C + 2)
    stem = next(g for g in prepare(model).analysis.groups if g.size == C)
    assert not stem.prunable


def test_resize_with_scales():
    prune_exact(sandwich(lambda b, x: b.op("Resize", [x, "", b.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")))


def test_resize_with_sizes_is_fixed():
    pruned, _, _ = prune_exact(sandwich(lambda b, x: b.op(
        "Resize", [x, "", "", b.const(np.array([1, C, 16, 16], np.int64))], mode="linear")), batch=1)
    sizes = [i for i in pruned.graph.initializer if list(i.dims) == [4] and i.data_type == onnx.TensorProto.INT64]
    assert any(onnx.numpy_helper.to_array(s)[1] == C // 2 for s in sizes)


def test_slice_on_channels():
    def body(b, x):
        return b.op("Slice", [x, b.const(np.array([2], np.int64)), b.const(np.array([12], np.int64)),
                              b.const(np.array([1], np.int64))])
    prune_exact(sandwich(body, channels_out=10))


def test_slice_on_space():
    def body(b, x):
        return b.op("Slice", [x, b.const(np.array([1, 1], np.int64)), b.const(np.array([-1, 7], np.int64)),
                              b.const(np.array([2, 3], np.int64))])
    prune_exact(sandwich(body))


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split_across_opsets(opset):
    def body(b, x):
        if opset == 11:
            parts = b.op("Split", [x], n_out=2, axis=1, split=[10, 6])
        elif opset == 13:
            parts = b.op("Split", [x, b.const(np.array([10, 6], np.int64))], n_out=2, axis=1)
        else:
            parts = b.op("Split", [x], n_out=2, axis=1, num_outputs=2)
        a_ch = 10 if opset != 18 else 8
        return b.op("Concat", [b.conv(parts[0], a_ch, 8), b.conv(parts[1], C - a_ch, 8)], axis=1)
    prune_exact(sandwich(body, opset=opset, channels_out=16))


def test_flatten_reshape_squeeze_unsqueeze():
    def body(b, x):
        g = b.op("GlobalAveragePool", [x])
        s = b.op("Squeeze", [g, b.const(np.array([2, 3], np.int64))])
        h = b.op("Relu", [b.gemm(s, C, 32)])
        u = b.op("Unsqueeze", [h, b.const(np.array([2, 3], np.int64))])
        return b.op("Reshape", [u, b.const(np.array([0, 32, 1, 1], np.int64))])
    prune_exact(sandwich(body, channels_out=32))


def test_reshape_with_explicit_feature_count():
    def body(b, x):
        r = b.op("Reshape", [x, b.const(np.array([-1, C * 64], np.int64))])
        return b.gemm(r, C * 64, 10)
    pruned, _, _ = prune_exact(sandwich(body, consumer="none"))
    shapes = [onnx.numpy_helper.to_array(i) for i in pruned.graph.initializer if list(i.dims) == [2]]
    assert any(list(s) == [-1, C // 2 * 64] for s in shapes)


def test_transpose_to_channels_last_and_back():
    def body(b, x):
        t = b.op("Transpose", [x], perm=[0, 2, 3, 1])
        h = b.op("Relu", [b.matmul(t, C, 24)])
        return b.op("Transpose", [h], perm=[0, 3, 1, 2])
    prune_exact(sandwich(body, channels_out=24))


def test_gather_on_space():
    prune_exact(sandwich(lambda b, x: b.op("Gather", [x, b.const(np.array([0, 2, 4], np.int64))], axis=3)))


def test_softmax_over_space_keeps_channels():
    prune_exact(sandwich(lambda b, x: b.op("Mul", [b.op("Softmax", [x], axis=3), x])))


def test_softmax_over_channels_freezes_them():
    model = sandwich(lambda b, x: b.op("Softmax", [x], axis=1))
    stem = next(g for g in prepare(model).analysis.groups if g.size == C)
    assert not stem.prunable and any("Softmax" in r for r in stem.frozen)


# ------------------------------------------------------------------------------------------------ conv family
def test_instance_norm():
    def body(b, x):
        r = np.random.default_rng(2)
        scale, shift = (b.const(r.uniform(0.5, 1.5, C).astype(np.float32)),
                        b.const(r.normal(0, 0.1, C).astype(np.float32)))
        return b.op("InstanceNormalization", [x, scale, shift])
    prune_exact(sandwich(body))


@pytest.mark.parametrize("group", [1, 4])
def test_conv_transpose(group):
    def body(b, x):
        w = b.weight(C, 8 // group, 2, 2)
        inputs = [x, w] + ([b.const(np.zeros(8, np.float32))] if group == 1 else [])
        return b.op("ConvTranspose", inputs, kernel_shape=[2, 2], strides=[2, 2], group=group)
    pruned, _, _ = prune_exact(sandwich(body, channels_out=8))


def test_gemm_without_transposed_weight_and_row_bias():
    def body(b, x):
        f = b.op("Flatten", [b.op("GlobalAveragePool", [x])])
        h = b.op("Relu", [b.op("Gemm", [f, b.weight(C, 32), b.const(np.ones((1, 32), np.float32))])])
        return b.gemm(h, 32, 5)
    prune_exact(sandwich(body, consumer="none"))


def test_attention_scores_couple_query_and_key():
    b = GraphBuilder()
    x = b.input(["N", 6, 16])
    q, k, v = b.matmul(x, 16, 32), b.matmul(x, 16, 32), b.matmul(x, 16, 24)
    scores = b.op("Softmax", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 2, 1])])], axis=-1)
    out = b.matmul(b.op("MatMul", [scores, v]), 24, 16)
    pruned, analysis, plan = prune_exact(b.model(out))
    assert sorted(len(k) for k in plan.keep.values()) == [12, 16]


def test_layer_norm_over_channels_is_marked_inexact():
    b = GraphBuilder()
    x = b.input(["N", 6, 16])
    h = b.matmul(x, 16, 32)
    r = np.random.default_rng(3)
    h = b.op("LayerNormalization", [h, b.const(r.uniform(0.5, 1.5, 32).astype(np.float32)),
                                     b.const(r.normal(0, 0.1, 32).astype(np.float32))], axis=-1)
    model = b.model(b.matmul(h, 32, 16))
    analysis = prepare(model).analysis
    group = next(g for g in analysis.groups if g.size == 32)
    assert group.prunable and group.inexact and "LayerNormalization" in group.inexact[0]
    import onnxprune
    pruned, report = onnxprune.prune(model, 0.5)
    onnx.checker.check_model(pruned, full_check=True)
    assert any(g["inexact"] for g in report.groups)


def _batch_of(b, x):
    """What `x.size(0)` exports to: Shape -> Gather(0) -> Unsqueeze."""
    size = b.op("Gather", [b.op("Shape", [x]), b.const(np.array(0, np.int64))], axis=0)
    return b.op("Unsqueeze", [size, b.const(np.array([0], np.int64))])


def test_flatten_with_a_run_time_batch_view():
    def body(b, x):  # x.view(x.size(0), -1)
        target = b.op("Concat", [_batch_of(b, x), b.const(np.array([-1], np.int64))], axis=0)
        return b.gemm(b.op("Reshape", [x, target]), C * 64, 10)
    prune_exact(sandwich(body, consumer="none"))


def test_reshape_target_built_with_concat_is_fixed():
    def body(b, x):  # x.view(x.size(0), C * 64): the constant entry must follow the pruned channels
        target = b.op("Concat", [_batch_of(b, x), b.const(np.array([C * 64], np.int64))], axis=0)
        return b.gemm(b.op("Reshape", [x, target]), C * 64, 10)
    pruned, _, _ = prune_exact(sandwich(body, consumer="none"))
    assert any(list(onnx.numpy_helper.to_array(i)) == [C // 2 * 64] for i in pruned.graph.initializer
               if list(i.dims) == [1])


def test_shape_reading_the_channel_axis_freezes_it():
    def body(b, x):  # C + 0: arithmetic other than a product, which the analysis does not follow (sizes it does
        channels = b.op("Gather", [b.op("Shape", [x]), b.const(np.array([1], np.int64))], axis=0)  # follow:
        channels = b.op("Add", [channels, b.const(np.array([0], np.int64))])  # tests/test_shape_rules.py)
        return b.op("Reshape", [x, b.op("Concat", [b.const(np.array([0], np.int64)), channels,
                                                   b.const(np.array([-1], np.int64))], axis=0)])
    model = sandwich(body, consumer="none")
    stem = next(g for g in prepare(model).analysis.groups if g.size == C)
    assert not stem.prunable and any("Shape" in r for r in stem.frozen)


def test_channel_shuffle_prunes_the_same_channels_in_every_group():
    def body(b, x):
        other = b.op("Relu", [b.conv(x, C, C)])
        cat = b.op("Concat", [x, other], axis=1)                       # 2C channels in 2 groups
        r = b.op("Reshape", [cat, b.const(np.array([0, 2, C, 8, 8], np.int64))])
        t = b.op("Transpose", [r], perm=[0, 2, 1, 3, 4])
        return b.op("Reshape", [t, b.const(np.array([0, 2 * C, 8, 8], np.int64))])
    pruned, analysis, plan = prune_exact(sandwich(body, channels_out=2 * C))
    # x and the branch are tied channel for channel by the shuffle: one group, pruned once.
    assert len(plan.keep) == 1


def test_einsum_contraction_and_batch_letters():
    b = GraphBuilder()
    x = b.input(["N", 6, 16])
    q, k = b.matmul(x, 16, 32), b.matmul(x, 16, 32)
    scores = b.op("Einsum", [q, k], equation="bid,bjd->bij")
    v = b.matmul(x, 16, 24)
    out = b.op("Einsum", [b.op("Softmax", [scores], axis=-1), v], equation="bij,bjd->bid")
    pruned, analysis, plan = prune_exact(b.model(b.matmul(out, 24, 16)))
    assert sorted(len(k) for k in plan.keep.values()) == [12, 16]


def test_packed_qkv_attention_prunes_whole_heads():
    """One projection makes q, k and v (D -> 3D); each is split into 4 heads of 8. The packed split is read as the
    same channels repeated in q, k and v, so whole heads leave all three and the output projection."""
    b = GraphBuilder()
    x = b.input(["N", 6, 32])
    qkv = b.op("Reshape", [b.matmul(x, 32, 96), b.const(np.array([0, 0, 3, 32], np.int64))])
    qkv = b.op("Transpose", [qkv], perm=[2, 0, 1, 3])                      # (3, N, L, D)
    heads = []
    for part in range(3):
        t = b.op("Gather", [qkv, b.const(np.array(part, np.int64))], axis=0)  # (N, L, D)
        t = b.op("Reshape", [t, b.const(np.array([0, 0, 4, 8], np.int64))])
        heads.append(b.op("Transpose", [t], perm=[0, 2, 1, 3]))             # (N, H, L, d)
    q, k, v = heads
    scores = b.op("Softmax", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])])], axis=-1)
    merged = b.op("Transpose", [b.op("MatMul", [scores, v])], perm=[0, 2, 1, 3])
    merged = b.op("Reshape", [merged, b.const(np.array([0, 0, 32], np.int64))])
    pruned, analysis, plan = prune_exact(b.model(b.matmul(merged, 32, 32)))
    shapes = sorted(tuple(i.dims) for i in pruned.graph.initializer if len(i.dims) == 2)
    assert shapes == [(16, 32), (32, 48)]  # 2 of 4 heads: q, k, v columns 3 x 16, output projection rows 16


def test_packed_qkv_split_into_three_axes_prunes_heads():
    """Swin-style: (N, L, 3D) -> (N, L, 3, heads, d) -> permute -> select q, k, v."""
    b = GraphBuilder()
    x = b.input(["N", 6, 32])
    qkv = b.op("Reshape", [b.matmul(x, 32, 96), b.const(np.array([0, 0, 3, 4, 8], np.int64))])
    qkv = b.op("Transpose", [qkv], perm=[2, 0, 3, 1, 4])                  # (3, N, H, L, d)
    q, k, v = (b.op("Gather", [qkv, b.const(np.array(i, np.int64))], axis=0) for i in range(3))
    scores = b.op("Softmax", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])])], axis=-1)
    merged = b.op("Transpose", [b.op("MatMul", [scores, v])], perm=[0, 2, 1, 3])
    merged = b.op("Reshape", [merged, b.const(np.array([0, 0, 32], np.int64))])
    pruned, _, _ = prune_exact(b.model(b.matmul(merged, 32, 32)))
    assert sorted(tuple(i.dims) for i in pruned.graph.initializer if len(i.dims) == 2) == [(16, 32), (32, 48)]
