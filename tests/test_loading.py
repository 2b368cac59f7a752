"""Real exports are messier than hand-built graphs: Constant-node weights, Identity chains, shared weights, symbolic
dimensions, unknown ops, subgraphs, external data, older opsets."""
import numpy as np
import onnx
import pytest
from builders import GraphBuilder, conv_bn_relu_chain, residual_block
from exactness import params, prune_exact
from onnx import helper

import onnxprune
from onnxprune import Options
from onnxprune.pipeline import prepare
from onnxprune.errors import OnnxPruneError
from onnxprune.verify import check_valid, count_macs


def weights_as_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """What PaddlePaddle's converter emits: every weight a Constant node, no initializers."""
    constants = [helper.make_node("Constant", [], [i.name], value=i) for i in model.graph.initializer]
    model.graph.ClearField("initializer")
    nodes = constants + list(model.graph.node)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    return model


def test_weights_in_constant_nodes():
    reference = params(prune_exact(residual_block())[0])
    pruned, _, _ = prune_exact(weights_as_constant_nodes(residual_block()))
    assert params(pruned) == reference


def test_identity_chains_on_weights_and_activations():
    model = conv_bn_relu_chain()
    g = model.graph
    conv = g.node[0]
    g.node.insert(0, helper.make_node("Identity", [conv.input[1]], ["w_id1"], name="id1"))
    g.node.insert(1, helper.make_node("Identity", ["w_id1"], ["w_id2"], name="id2"))
    conv.input[1] = "w_id2"
    relu = next(n for n in g.node if n.op_type == "Relu")
    consumer = next(n for n in g.node if relu.output[0] in n.input)
    g.node.insert(list(g.node).index(consumer), helper.make_node("Identity", [relu.output[0]], ["act_id"], name="id3"))
    consumer.input[0] = "act_id"
    pruned, _, _ = prune_exact(model)
    assert params(pruned) == params(prune_exact(conv_bn_relu_chain())[0])


def test_shared_weight_couples_its_users():
    b = GraphBuilder()
    x = b.op("Relu", [b.conv(b.input(["N", 3, 8, 8]), 3, 16)])
    w = b.weight(16, 16, 3, 3)
    y1 = b.op("Conv", [x, w], kernel_shape=[3, 3], pads=[1] * 4)
    y2 = b.op("Conv", [b.op("Relu", [y1]), w], kernel_shape=[3, 3], pads=[1] * 4)
    model = b.model(b.conv(y2, 16, 4))
    pruned, analysis, plan = prune_exact(model)
    # The shared weight ties conv input channels to its output channels: one group of 16 -> 8.
    shared = [g for g in analysis.groups if g.size == 16 and any(m.space[0] == w for m in g.members)]
    assert len(shared) == 1 and shared[0].size == 16
    assert [list(i.dims) for i in pruned.graph.initializer if i.name == w] == [[8, 8, 3, 3]]


def test_symbolic_batch_and_spatial_dimensions():
    b = GraphBuilder()
    x = b.conv_bn_relu(b.input(["batch", 3, "height", "width"]), 3, 16)
    x = b.conv_bn_relu(x, 16, 32)
    model = b.model(b.op("GlobalAveragePool", [b.conv(x, 32, 8)]))
    prune_exact(model, length=6)  # at 1x1 a 3x3 conv would only use its centre


def test_unknown_op_freezes_what_it_touches_and_says_so():
    model = residual_block()
    g = model.graph
    relu = [n for n in g.node if n.op_type == "Relu"][-1]  # after the residual Add
    relu.op_type, relu.domain = "MyRelu", "custom.domain"
    model.opset_import.append(helper.make_opsetid("custom.domain", 1))
    analysis = prepare(model).analysis
    frozen = [g for g in analysis.groups if g.frozen and g.is_channel_group]
    assert any("no rule for op custom.domain.MyRelu" in r for g in frozen for r in g.frozen)
    assert analysis.prunable  # the rest still prunes


def test_shapes_not_inferable_downstream_of_a_custom_op_are_frozen_not_guessed():
    b = GraphBuilder()
    x = b.conv_bn_relu(b.input(["N", 3, 8, 8]), 3, 16)
    mystery = b.op("Mystery", [x])
    b.nodes[-1].domain = "vendor"
    out = b.conv(b.conv_bn_relu(mystery, 16, 32), 32, 4)
    graph = helper.make_graph(b.nodes, "g", b.inputs, [helper.make_tensor_value_info(out, 1, ["N", 4, 8, 8])],
                              b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("vendor", 1)])
    analysis = prepare(model).analysis
    assert all(not g.prunable for g in analysis.groups if g.size == 16)
    pruned, report = onnxprune.prune(model, 0.5, Options(round_to=1))
    onnx.checker.check_model(pruned)  # no ORT run: the custom op has no kernel
    assert report.params_after == report.params_before and not analysis.prunable  # nothing past the op is guessed


def test_tensor_used_inside_a_subgraph_is_frozen():
    b = GraphBuilder()
    x = b.op("Relu", [b.conv(b.input(["N", 3, 8, 8]), 3, 16)])
    y = b.op("Relu", [b.conv(x, 16, 16)])
    then_out = helper.make_tensor_value_info("then_y", onnx.TensorProto.FLOAT, None)
    then_graph = helper.make_graph([helper.make_node("Identity", [y], ["then_y"])], "then", [], [then_out])
    else_graph = helper.make_graph([helper.make_node("Neg", [y], ["then_y"])], "else", [], [then_out])
    cond = b.const(np.array(True))
    branch = b.op("If", [cond], then_branch=then_graph, else_branch=else_graph)
    model = b.model(b.conv(branch, 16, 4))
    analysis = prepare(model).analysis
    inner = [g for g in analysis.groups if any(m.space[0] == y for m in g.members)]
    assert inner and not inner[0].prunable and any("subgraph" in r for r in inner[0].frozen)
    prune_exact(model)


def test_weights_listed_as_graph_inputs_are_pruned_as_constants():
    model = residual_block()
    model.graph.input.extend(helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
                             for i in model.graph.initializer)
    pruned, report = onnxprune.prune(model, 0.5, Options(round_to=1))
    onnx.checker.check_model(pruned, full_check=True)
    assert [i.name for i in pruned.graph.input] == ["x"]
    assert report.params_after == params(prune_exact(residual_block())[0])


def test_external_data_round_trip(tmp_path):
    model = residual_block()
    onnx.save_model(model, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.data", size_threshold=0)
    pruned, report = onnxprune.prune(tmp_path / "ext.onnx", 0.5, Options(round_to=1))
    assert report.params_after < report.params_before
    check_valid(pruned)  # its weights stay in a data file (lazy_tensors): the checker reads them from a path


def test_opset_11_graph():
    b = GraphBuilder(opset=11)
    x = b.conv_bn_relu(b.input(["N", 3, 8, 8]), 3, 16)
    parts = b.op("Split", [x], n_out=2, axis=1, split=[8, 8])
    g = b.op("ReduceMean", [b.op("Add", parts)], axes=[2, 3], keepdims=0)
    u = b.op("Unsqueeze", [g], axes=[2])
    s = b.op("Squeeze", [u], axes=[2])
    model = b.model(b.gemm(s, 8, 4))
    prune_exact(model)


def test_opset_below_11_is_refused():
    model = residual_block()
    model.opset_import[0].version = 9
    with pytest.raises(OnnxPruneError, match="opset 9"):
        onnxprune.prune(model, 0.5)


def test_input_model_is_not_modified():
    model = residual_block()
    before = model.SerializeToString()
    onnxprune.prune(model, 0.5)
    assert model.SerializeToString() == before


def test_macs_match_hand_counts():
    b = GraphBuilder()
    x = b.input([1, 3, 8, 8])
    c1 = b.conv(x, 3, 16)                                  # 8*8*16 outputs, 3*3*3 each
    c2 = b.conv(c1, 16, 16, group=4, stride=2)             # 4*4*16 outputs, 4*3*3 each
    t = b.op("ConvTranspose", [c2, b.weight(16, 8, 2, 2)], kernel_shape=[2, 2], strides=[2, 2])  # 16*4*4 in, 8*2*2
    f = b.op("Flatten", [b.op("GlobalAveragePool", [t])])
    g = b.gemm(f, 8, 10)                                   # 8*10
    m = b.op("MatMul", [b.op("Unsqueeze", [g, b.const(np.array([2], np.int64))]),
                        b.const(np.ones((1, 5), np.float32))])  # (1,10,1)x(1,5): 10*5*1
    model = b.model(m)
    expected = 8 * 8 * 16 * 27 + 4 * 4 * 16 * 36 + 16 * 4 * 4 * 8 * 4 + 80 + 50
    assert count_macs(model) == expected


def test_macs_count_a_symbolic_batch_as_one():
    b = GraphBuilder()
    model = b.model(b.gemm(b.input(["N", 32]), 32, 16))
    assert count_macs(model) == 32 * 16


def test_shape_arithmetic_on_static_shapes_is_resolved():
    """TorchScript's `x.reshape(x.shape[:1] + (-1,))`-style targets: Shape -> Slice -> Concat -> Reshape."""
    b = GraphBuilder()
    x = b.conv_bn_relu(b.input([2, 3, 8, 8]), 3, 16)
    end = b.op("Reshape", [b.const(np.array(1, np.int64)), b.const(np.array([1], np.int64))])  # computed, not stored
    head = b.op("Slice", [b.op("Shape", [x]), b.const(np.array([0], np.int64)), end])
    target = b.op("Concat", [head, b.const(np.array([16 * 64], np.int64))], axis=0)
    model = b.model(b.gemm(b.op("Reshape", [x, target]), 16 * 64, 10))
    pruned, analysis, plan = prune_exact(model)
    assert any(g.size == 16 for g in analysis.prunable)


def _sizes_of(b, x, axes):
    """Shape(x)[axes] as a 1-D tensor, the way the TorchScript exporter builds run-time reshape targets: one scalar
    Gather and Unsqueeze per size, and a Concat."""
    shape = b.op("Shape", [x])
    scalars = [b.op("Gather", [shape, b.const(np.array(a, np.int64))], axis=0) for a in axes]
    return b.op("Concat", [b.op("Unsqueeze", [s, b.const(np.array([0], np.int64))]) for s in scalars], axis=0)


def test_attention_with_run_time_batch_and_sequence_prunes_heads():
    """BERT-style export: batch and sequence are named dims shared by two inputs; q/k/v are split into heads by
    reshapes whose targets are computed from Shape, so inference loses the head count after them. Run at 7 tokens
    with a 0/1 mask, so that every query attends over several keys."""
    b = GraphBuilder()
    x = b.input(["batch", "sequence", 32])
    mask = b.op("Cast", [b.input(["batch", "sequence"], name="mask", elem_type=onnx.TensorProto.INT64)],
                to=onnx.TensorProto.FLOAT)
    # Position embeddings sliced to the sequence length: inference loses the names of batch and sequence here.
    positions = b.const(np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32))
    length = _sizes_of(b, x, [1])
    x = b.op("Add", [x, b.op("Slice", [positions, b.const(np.array([0], np.int64)), length,
                                       b.const(np.array([0], np.int64))])])
    heads = []
    for _ in range(3):
        t = b.matmul(x, 32, 32)
        target = b.op("Concat", [_sizes_of(b, t, [0, 1]), b.const(np.array([4, 8], np.int64))], axis=0)
        heads.append(b.op("Transpose", [b.op("Reshape", [t, target])], perm=[0, 2, 1, 3]))
    q, k, v = heads
    scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])])
    masked = b.op("Sub", [b.const(np.float32(1.0)), mask])  # BERT: (1 - mask) * -10000
    bias = b.op("Unsqueeze", [b.op("Mul", [masked, b.const(np.float32(-1e4))]), b.const(np.array([1, 2], np.int64))])
    probs = b.op("Softmax", [b.op("Add", [scores, bias])], axis=-1)
    context = b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
    target = b.op("Concat", [_sizes_of(b, context, [0, 1]), b.const(np.array([32], np.int64))], axis=0)
    model = b.model(b.matmul(b.op("Reshape", [context, target]), 32, 32))
    pruned, analysis, plan = prune_exact(model, length=7)
    head_groups = [analysis.groups[g] for g in plan.keep if analysis.groups[g].size == 4]
    assert head_groups, "the heads were not prunable"
    assert sorted(tuple(i.dims) for i in pruned.graph.initializer if len(i.dims) == 2)[:1] == [(16, 32)]


def test_reshape_pairs_leading_run_time_sizes_whose_names_were_lost():
    from onnxprune.rules.registry import Couple, Expand
    from onnxprune.rules.shape import reshape_relations
    relations = reshape_relations(("unk__1", "unk__2", 4, 8), ("unk__3", "unk__4", 32))
    couples = [r for r in relations if isinstance(r, Couple)]
    assert [(c.refs[0].axis, c.refs[1].axis) for c in couples] == [(0, 0), (1, 1)]
    (merge,) = [r for r in relations if isinstance(r, Expand)]
    assert (merge.fine.axis, merge.coarse.axis, merge.inner) == (2, 2, 8)


def test_probes_fill_sizes_that_do_not_depend_on_run_time_dimensions():
    from onnxprune.graph import _fill_from_probes
    b = GraphBuilder()
    out = b.op("Relu", [b.input(["batch", 16])])
    model = b.model(out)
    shapes = {out: ("batch", None)}  # as if inference had lost the 16
    _fill_from_probes(model, shapes)
    assert shapes[out] == ("batch", 16)  # the batch differs between the probes, so it stays as it was


def test_one_static_size_sizes_its_whole_coupled_class():
    from onnxprune.graph import GraphIndex, infer_shapes
    from onnxprune.groups import analyze
    model = conv_bn_relu_chain()
    shapes = infer_shapes(model)
    relu = next(n.output[0] for n in model.graph.node if n.op_type == "Relu")
    shapes[relu] = (shapes[relu][0], None, *shapes[relu][2:])  # inference lost this channel count
    analysis = analyze(model, GraphIndex.build(model, shapes))
    assert any(g.size == 16 and g.prunable for g in analysis.groups)
