"""Each pattern prunes to a valid model, exactly, with the parameter count worked out by hand."""
import builders
import pytest
from exactness import params, prune_exact


def conv_params(cin, cout, k, group=1, bias=True):
    return cout * (cin // group) * k * k + (cout if bias else 0)


BN = 4  # scale, shift, mean, var per channel


def test_conv_bn_relu_chain():
    pruned, _, _ = prune_exact(builders.conv_bn_relu_chain())
    # 16 -> 8 and 32 -> 16 channels; the output conv's 8 channels reach the graph output and stay.
    expected = conv_params(3, 8, 3) + BN * 8 + conv_params(8, 16, 3) + BN * 16 + conv_params(16, 8, 3)
    assert params(pruned) == expected


def test_residual_block_couples_the_add():
    pruned, analysis, plan = prune_exact(builders.residual_block())
    # stem(16) and the block's last conv(16) meet at the Add: one group, 8 kept; the inner 32 -> 16.
    expected = (conv_params(3, 8, 3) + BN * 8 + conv_params(8, 16, 3) + BN * 16 + conv_params(16, 8, 3) + BN * 8
                + conv_params(8, 4, 3))
    assert params(pruned) == expected


def test_concat_branches_prune_each_input_separately():
    pruned, analysis, _ = prune_exact(builders.concat_branches())
    expected = conv_params(3, 8, 3) + BN * 8 + conv_params(3, 4, 1) + BN * 4 + conv_params(12, 4, 3)
    assert params(pruned) == expected


def test_depthwise_couples_input_and_output():
    pruned, _, _ = prune_exact(builders.depthwise_separable())
    expected = conv_params(3, 8, 1) + BN * 8 + conv_params(8, 8, 3, group=8) + BN * 8 + conv_params(8, 8, 1)
    assert params(pruned) == expected
    conv = [n for n in pruned.graph.node if n.op_type == "Conv"][1]
    assert next(a.i for a in conv.attribute if a.name == "group") == 8


def test_squeeze_excite_gate_follows_the_main_branch():
    pruned, _, _ = prune_exact(builders.squeeze_excite())
    expected = (conv_params(3, 8, 3) + BN * 8 + conv_params(8, 4, 1) + conv_params(4, 8, 1) + conv_params(8, 4, 3))
    assert params(pruned) == expected


def test_flatten_into_gemm_removes_blocks_of_features():
    pruned, _, _ = prune_exact(builders.flatten_gemm_head())
    # 16 channels of 4x4 -> 8 channels: the first Gemm loses 8 blocks of 16 input features; its 32 outputs -> 16.
    expected = conv_params(3, 8, 3) + BN * 8 + (8 * 16) * 16 + 16 + 16 * 10 + 10
    assert params(pruned) == expected


def test_matmul_mlp_hidden_neurons():
    pruned, _, _ = prune_exact(builders.matmul_mlp())
    expected = (16 * 16 + 16) + (16 * 12 + 12) + (12 * 16 + 16)
    assert params(pruned) == expected


def test_grouped_conv_prunes_whole_groups():
    pruned, _, _ = prune_exact(builders.grouped_conv())
    # 8 groups of 4 channels -> 4 groups: 16 channels on both sides of the grouped conv.
    expected = conv_params(3, 16, 1) + BN * 16 + conv_params(16, 16, 3, group=4) + BN * 16 + conv_params(16, 8, 1)
    assert params(pruned) == expected
    conv = [n for n in pruned.graph.node if n.op_type == "Conv"][1]
    assert next(a.i for a in conv.attribute if a.name == "group") == 4


def test_split_sizes_follow_the_pruned_parts():
    pruned, _, _ = prune_exact(builders.split_branches())
    expected = conv_params(3, 12, 3) + BN * 12 + conv_params(8, 4, 3) + conv_params(4, 4, 3) + 2
    assert params(pruned) == expected


@pytest.mark.parametrize("criterion", ["l1", "l2", "random"])
def test_every_criterion_is_exact(criterion):
    prune_exact(builders.residual_block(), criterion=criterion)
