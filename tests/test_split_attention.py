"""ResNeSt split attention (issue 10): a radix conv (groups = radix * cardinality) whose output is reshaped into its
radix parts, summed, pooled, sent through a grouped two-layer attention MLP, a softmax over the radix axis, and used to
weight the parts. Channel c of every radix part is one channel: pruning it narrows every group of the conv, which keeps
its group count, and the attention's r*C output loses channel c of every part."""
import numpy as np
import onnx
import pytest
from builders import GraphBuilder
from exactness import prune_exact

from onnxprune.pipeline import prepare

C, HIDDEN = 16, 8


def i64(*values: int) -> np.ndarray:
    return np.array(values, np.int64)


def resnest_block(radix: int, cardinality: int, stem_act: str = "Relu") -> tuple[onnx.ModelProto, str]:
    """timm's SplitAttn as torch exports it, between a stem conv and a 1x1 conv; returns the model and the radix
    conv's output (N, radix * C, H, W)."""
    b = GraphBuilder()
    x = b.op(stem_act, [b.conv(b.input(["N", 3, 8, 8]), 3, C)])
    y = b.op("Relu", [b.bn(b.conv(x, C, radix * C, group=radix * cardinality, bias=False), radix * C)])
    parts = b.op("Reshape", [y, b.const(i64(0, radix, C, 8, 8))])
    gap = b.op("ReduceMean", [b.op("ReduceSum", [parts, b.const(i64(1))], keepdims=0)], axes=[2, 3], keepdims=1)
    hidden = b.op("Relu", [b.bn(b.conv(gap, C, HIDDEN, k=1, group=cardinality), HIDDEN)])
    attn = b.conv(hidden, HIDDEN, radix * C, k=1, group=cardinality)
    attn = b.op("Reshape", [attn, b.const(i64(0, cardinality, radix, -1))])  # RadixSoftmax
    attn = b.op("Softmax", [b.op("Transpose", [attn], perm=[0, 2, 1, 3])], axis=1)
    attn = b.op("Reshape", [b.op("Reshape", [attn, b.const(i64(0, -1))]), b.const(i64(0, -1, 1, 1))])
    attn = b.op("Reshape", [attn, b.const(i64(0, radix, C, 1, 1))])
    out = b.op("ReduceSum", [b.op("Mul", [parts, attn]), b.const(i64(1))], keepdims=0)
    return b.model(b.conv(out, C, 4, k=1)), y


def conv_groups(model: onnx.ModelProto) -> list[int]:
    return [a.i for n in model.graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"]


def group_of(model: onnx.ModelProto, tensor: str, axis: int = 1):
    """The distinct groups on a tensor's axis."""
    analysis = prepare(model).analysis
    return [analysis.groups[gid] for gid in dict.fromkeys(gid for gid, _, _ in analysis.layouts[(tensor, axis)])]


def layout(model: onnx.ModelProto, tensor: str, axis: int = 1) -> list[tuple[int, int, int]]:
    return prepare(model).analysis.layouts[(tensor, axis)]


@pytest.mark.parametrize("cardinality", [1, 2])
def test_resnest_split_attention_prunes_exactly_keeping_the_group_counts(cardinality):
    model, radix_out = resnest_block(radix=2, cardinality=cardinality)
    pruned, analysis, plan = prune_exact(model)
    assert all(g.prunable for g in group_of(model, radix_out))
    assert conv_groups(pruned) == conv_groups(model)  # every group narrower, none removed
    assert not any(g.inexact for g in analysis.groups if g.prunable)


def test_the_radix_parts_lose_the_same_channels():
    """The radix conv's output is channel c of part 0, then channel c of part 1: one group, read twice."""
    model, radix_out = resnest_block(radix=2, cardinality=1)
    (group,) = group_of(model, radix_out)
    assert group.size == C and layout(model, radix_out) == [(group.id, 0, 1), (group.id, C, 1)]


def test_cardinality_groups_tie_channel_c_of_every_group():
    """With cardinality 2 the conv has 4 groups of C / 2 channels; channel c of each is one channel."""
    model, radix_out = resnest_block(radix=2, cardinality=2)
    (group,) = group_of(model, radix_out)
    assert group.size == C // 2
    assert layout(model, radix_out) == [(group.id, offset, 1) for offset in (0, C // 2, C, 3 * C // 2)]


def test_a_constant_removed_channel_into_the_radix_conv_marks_its_group():
    """Channel c of every group removed from the conv's input feeds the kept outputs of every group: where it is not
    zero (Sigmoid(0) = 0.5) the group is marked inexact with the reason, never silently different; the others
    still prune exactly."""
    model, _ = resnest_block(radix=2, cardinality=1, stem_act="Sigmoid")
    stem = next(n.output[0] for n in model.graph.node if n.op_type == "Sigmoid")
    (group,) = group_of(model, stem)
    assert any("Sigmoid(0) = 0.5" in r and "sums it in" in r for r in group.inexact)
    prune_exact(model, exact_groups_only=True)


def test_a_grouped_conv_whose_groups_are_free_still_prunes_whole_groups():
    """The per-group reading is taken only where the groups themselves cannot go: a grouped conv between plain
    convs loses whole groups, and its group count drops."""
    b = GraphBuilder()
    x = b.op("Relu", [b.conv(b.input(["N", 3, 8, 8]), 3, C)])
    y = b.op("Relu", [b.conv(x, C, 2 * C, group=4)])
    model = b.model(b.conv(y, 2 * C, 4, k=1))
    pruned, _, _ = prune_exact(model)
    assert conv_groups(pruned)[1] == 2


def test_a_softmax_over_the_channels_of_the_parts_keeps_them():
    """A softmax over C (not over the radix axis) makes a removed channel non-zero: the channels stay or are marked,
    never silently different."""
    b = GraphBuilder()
    x = b.op("Relu", [b.conv(b.input(["N", 3, 8, 8]), 3, C)])
    y = b.op("Relu", [b.conv(x, C, 2 * C, group=2)])
    parts = b.op("Softmax", [b.op("Reshape", [y, b.const(i64(0, 2, C, 8, 8))])], axis=2)
    out = b.op("ReduceSum", [parts, b.const(i64(1))], keepdims=0)
    model = b.model(b.conv(out, C, 4, k=1))
    (group,) = group_of(model, y)
    assert not group.prunable or group.inexact
