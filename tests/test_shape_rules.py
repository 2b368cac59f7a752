"""Sizes read with Shape on channel axes, Expand, Tile, run-time flattens and split attention (issue 10): each
prunes exactly on a graph built in code, and each case the analysis cannot follow stays frozen with its reason."""
import numpy as np
import onnx
from builders import GraphBuilder
from exactness import prune_exact
from onnx import TensorProto, helper

from onnxprune.pipeline import prepare

C = 16


def i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def stem(b: GraphBuilder, batch: object = "N", side: int = 8) -> str:
    return b.op("Relu", [b.conv(b.input([batch, 3, side, side]), 3, C)])


def sizes(b: GraphBuilder, x: str, *axes: int) -> list[str]:
    """`B, C, H, W = x.shape` as torch exports it: one Gather per size, each unsqueezed for a Concat."""
    shape = b.op("Shape", [x])
    return [b.op("Unsqueeze", [b.op("Gather", [shape, b.const(np.int64(a))], axis=0), b.const(i64(0))])
            for a in axes]


def channel_group(model: onnx.ModelProto, tensor: str):
    analysis = prepare(model).analysis
    return next(analysis.groups[gid] for gid, _, _ in analysis.layouts[(tensor, 1)])


def node_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


# ------------------------------------------------------------------------------------------ Shape on channel axes

def token_mixer(b: GraphBuilder, x: str) -> str:
    """(B, C, H, W) -> (B, C, H*W) -> (B, HW, C) -> linear C -> C + residual -> back to (B, C, H, W), every size read
    from x.shape (a vision transformer's block, a Paddle export)."""
    n, c, h, w = sizes(b, x, 0, 1, 2, 3)
    hw = b.op("Mul", [h, w])
    tokens = b.op("Transpose", [b.op("Reshape", [x, b.op("Concat", [n, c, hw], axis=0)])], perm=[0, 2, 1])
    mixed = b.op("Add", [tokens, b.matmul(tokens, C, C)])
    back = b.op("Transpose", [mixed], perm=[0, 2, 1])
    return b.op("Reshape", [back, b.op("Concat", [n, c, h, w], axis=0)])


def test_sizes_read_from_the_channel_axis_into_reshape_targets_prune_exactly():
    b = GraphBuilder()
    x = stem(b)
    model = b.model(b.conv(token_mixer(b, x), C, 4))
    pruned, analysis, plan = prune_exact(model)
    assert channel_group(model, x).prunable
    assert not any("Shape" in r for g in analysis.groups for r in g.frozen if "axis 1 of" in r)


def test_a_size_left_in_a_run_time_target_follows_pruning_at_run_time():
    """x.reshape(*x.shape[:2], -1): the batch and channel sizes stay one run-time value; the Shape stays in the
    pruned model and reads the pruned channel count."""
    b = GraphBuilder()
    x = stem(b)
    head = b.op("Slice", [b.op("Shape", [x]), b.const(i64(0)), b.const(i64(2))])
    flat = b.op("Reshape", [x, b.op("Concat", [head, b.const(i64(-1))], axis=0)])
    pooled = b.op("ReduceMax", [flat], axes=[2], keepdims=0)
    model = b.model(b.gemm(pooled, C, 10))
    pruned, _, _ = prune_exact(model)
    assert "Shape" in node_types(pruned)
    assert channel_group(model, x).prunable


def test_the_channel_size_in_other_arithmetic_keeps_the_channels():
    """zeros_like through ConstantOfShape(Shape(x)): the pruned size would reach a tensor no rule resizes."""
    b = GraphBuilder()
    x = stem(b, batch=1)
    zeros = b.op("ConstantOfShape", [b.op("Shape", [x])], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0]))
    model = b.model(b.conv(b.op("Add", [x, zeros]), C, 4))
    group = channel_group(model, x)
    assert not group.prunable and any("Shape" in r and "axis 1" in r for r in group.frozen)


def test_a_channel_size_times_a_spatial_size_merged_by_the_same_reshape_follows():
    """(B, C, H, W) viewed as (B, C*H, W) with B, C*H one run-time value: C*H is exactly what the reshape merges
    into that axis, so it follows a pruned C; the view back uses constants, which the fixup rewrites."""
    b = GraphBuilder()
    x = stem(b)
    shape = b.op("Shape", [x])
    n_c = b.op("Slice", [shape, b.const(i64(0)), b.const(i64(2))])
    ch = b.op("Mul", [n_c, b.op("Concat", [b.const(i64(1)), b.op("Slice", [shape, b.const(i64(2)),
                                                                           b.const(i64(3))])], axis=0)])
    merged = b.op("Reshape", [x, b.op("Concat", [ch, b.const(i64(-1))], axis=0)])
    back = b.op("Reshape", [b.op("ReduceMax", [merged], axes=[2], keepdims=1), b.const(i64(0, C, 8, 1))])
    model = b.model(b.conv(back, C, 4))
    pruned, _, _ = prune_exact(model)
    assert "Shape" in node_types(pruned)


def test_sizes_of_one_tensor_reshaping_another_at_run_time_keep_the_channels():
    """y.reshape(*x.shape[:2], -1) with y = conv(x): x's channel count is no size of y's channels."""
    b = GraphBuilder()
    x = stem(b)
    y = b.op("Relu", [b.conv(x, C, C)])
    head = b.op("Slice", [b.op("Shape", [x]), b.const(i64(0)), b.const(i64(2))])
    flat = b.op("Reshape", [y, b.op("Concat", [head, b.const(i64(-1))], axis=0)])
    model = b.model(b.gemm(b.op("ReduceMax", [flat], axes=[2], keepdims=0), C, 10))
    for tensor in (x, y):
        group = channel_group(model, tensor)
        assert not group.prunable and any("does not carry axis 1" in r for r in group.frozen)


def test_pads_computed_from_static_sizes_beside_a_run_time_batch_are_known():
    """TF-style SAME padding: pads from the spatial sizes, read next to a run-time batch, so the Shape value is
    only partly static; the Pad rule reads them and the spatial axes the Shape reads stay as they are."""
    b = GraphBuilder()
    x = stem(b)
    side = b.op("Gather", [b.op("Shape", [x]), b.const(i64(2))], axis=0)
    p = b.op("Sub", [side, b.const(i64(7))])  # 1
    zeros = b.const(i64(0, 0))
    y = b.op("Pad", [x, b.op("Concat", [zeros, p, p, zeros, p, p], axis=0)], mode="edge")
    model = b.model(b.conv(y, C, 4))
    prune_exact(model)
    assert channel_group(model, x).prunable


def test_resize_to_sizes_read_beside_a_run_time_batch_follows_the_channels():
    """F.interpolate(x, size=(16, 16)) exported as Resize(x, sizes=Concat(x.shape[:2], [16, 16]))."""
    b = GraphBuilder(opset=13)
    x = stem(b)
    head = b.op("Slice", [b.op("Shape", [x]), b.const(i64(0)), b.const(i64(2))])
    up = b.op("Resize", [x, "", "", b.op("Concat", [head, b.const(i64(16, 16))], axis=0)], mode="nearest")
    model = b.model(b.conv(up, C, 4))
    pruned, _, _ = prune_exact(model)
    assert "Shape" in node_types(pruned)


# ------------------------------------------------------------------------------------------------------ Expand

def test_expand_of_pooled_channels_to_the_feature_shape_prunes_exactly():
    b = GraphBuilder()
    x = stem(b, batch=1)
    pooled = b.op("GlobalAveragePool", [x])  # (1, C, 1, 1) broadcast back over H, W: expand_as(x)
    spread = b.op("Expand", [pooled, b.op("Shape", [x])])
    model = b.model(b.conv(b.op("Mul", [x, spread]), C, 4))
    prune_exact(model)
    assert channel_group(model, x).prunable


def test_expand_broadcasting_a_mask_over_the_channels_prunes_exactly():
    b = GraphBuilder()
    x = stem(b, batch=1)
    first = b.op("Slice", ["x", b.const(i64(0)), b.const(i64(1)), b.const(i64(1))])  # (1, 1, 8, 8) of the input
    spread = b.op("Expand", [b.op("Sigmoid", [first]), b.const(i64(1, C, 8, 8))])
    model = b.model(b.conv(b.op("Mul", [x, spread]), C, 4))
    pruned, _, _ = prune_exact(model)
    assert channel_group(model, x).prunable


def test_expand_to_a_shape_computed_by_other_arithmetic_keeps_the_channels():
    b = GraphBuilder()
    x = stem(b)
    pooled = b.op("GlobalAveragePool", [x])
    shape = b.op("Add", [b.op("Shape", [x]), b.const(i64(0, 0, 0, 0))])
    spread = b.op("Expand", [pooled, shape])
    model = b.model(b.conv(b.op("Mul", [x, spread]), C, 4))
    group = channel_group(model, x)
    assert not group.prunable and any("Expand" in r or "Shape" in r for r in group.frozen)


# ------------------------------------------------------------------------------------------------------ Tile

def test_tile_over_the_channels_prunes_the_same_channels_in_every_copy():
    b = GraphBuilder()
    x = stem(b)
    tiled = b.op("Tile", [x, b.const(i64(1, 2, 1, 1))])
    model = b.model(b.conv(tiled, 2 * C, 4))
    pruned, analysis, plan = prune_exact(model)
    assert len(plan.keep) == 1


def test_tile_with_repeats_known_only_at_run_time_keeps_what_it_touches():
    b = GraphBuilder()
    x = stem(b)
    batch = b.op("Slice", [b.op("Shape", [x]), b.const(i64(0)), b.const(i64(1))])
    repeats = b.op("Concat", [b.const(i64(1, 1, 1)), batch], axis=0)
    model = b.model(b.conv(b.op("Tile", [x, repeats]), C, 4))
    group = channel_group(model, x)
    assert not group.prunable and any("'repeats' computed at run time" in r for r in group.frozen)


# ------------------------------------------------------------------------------ run-time flatten into a linear layer

def test_permute_and_run_time_flatten_into_a_linear_layer_prunes_the_channels():
    """x.permute(0, 2, 3, 1).reshape(x.shape[0], -1) @ W: channels last, flattened after the spatial axes."""
    b = GraphBuilder()
    x = b.op("Relu", [b.conv(b.input(["N", 3, 4, 4]), 3, C, stride=2)])  # 2x2 spatial
    t = b.op("Transpose", [x], perm=[0, 2, 3, 1])
    (n,) = sizes(b, t, 0)
    flat = b.op("Reshape", [t, b.op("Concat", [n, b.const(i64(-1))], axis=0)])
    model = b.model(b.gemm(flat, 4 * C, 10))
    pruned, analysis, plan = prune_exact(model)
    assert channel_group(model, x).prunable


# ------------------------------------------------------------------------------------------------ split attention

def radix_attention(b: GraphBuilder, parts: str, radix: int, cardinality: int = 1) -> str:
    """Attention over the radix parts (N, r, C, H, W): their sum pooled, two 1x1 convs to r*C, then timm's
    RadixSoftmax: viewed (N, card, r, -1), softmax over r, flattened and viewed (N, r, C, 1, 1); the parts
    weighted by it and summed."""
    gap = b.op("GlobalAveragePool", [b.op("ReduceSum", [parts, b.const(i64(1))], keepdims=0)])
    attn = b.conv(b.op("Relu", [b.conv(gap, C, 8, k=1)]), 8, radix * C, k=1, group=cardinality)
    attn = b.op("Reshape", [attn, b.const(i64(0, cardinality, radix, -1))])
    attn = b.op("Softmax", [b.op("Transpose", [attn], perm=[0, 2, 1, 3])], axis=1)
    attn = b.op("Reshape", [b.op("Reshape", [attn, b.const(i64(0, -1))]), b.const(i64(0, radix, C, 1, 1))])
    return b.op("ReduceSum", [b.op("Mul", [parts, attn]), b.const(i64(1))], keepdims=0)


def test_selective_kernel_attention_prunes_the_same_channels_in_every_path():
    """SKNet: two conv paths stacked on a radix axis, the attention's r*C split back into (r, C) and a softmax
    over r (timm's SelectiveKernelAttn)."""
    b = GraphBuilder()
    x = stem(b)
    paths = [b.op("Unsqueeze", [b.op("Relu", [b.conv(x, C, C, k=k)]), b.const(i64(1))]) for k in (3, 1)]
    parts = b.op("Concat", paths, axis=1)
    gap = b.op("GlobalAveragePool", [b.op("ReduceSum", [parts, b.const(i64(1))], keepdims=0)])
    attn = b.conv(b.op("Relu", [b.conv(gap, C, 8, k=1)]), 8, 2 * C, k=1)
    attn = b.op("Softmax", [b.op("Reshape", [attn, b.const(i64(0, 2, C, 1, 1))])], axis=1)
    out = b.op("ReduceSum", [b.op("Mul", [parts, attn]), b.const(i64(1))], keepdims=0)
    model = b.model(b.conv(out, C, 4))
    pruned, analysis, plan = prune_exact(model)
    assert len(plan.keep) >= 3  # the stem, the paths' channels, the attention's hidden width


def test_resnest_split_attention_through_a_grouped_conv_prunes_exactly():
    b = GraphBuilder()
    x = stem(b)
    y = b.op("Relu", [b.conv(x, C, 2 * C, group=2)])  # radix 2: each group of the conv is one part
    parts = b.op("Reshape", [y, b.const(i64(0, 2, C, 8, 8))])
    model = b.model(b.conv(radix_attention(b, parts, radix=2), C, 4))
    pruned, analysis, _ = prune_exact(model)
    assert channel_group(model, y).prunable  # channel c of both radix parts at once; the conv keeps its 2 groups
    assert [a.i for n in pruned.graph.node for a in n.attribute if a.name == "group"][1] == 2
