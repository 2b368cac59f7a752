"""Control flow (issue 10): If branches, Loop and Scan bodies are analysed like the main graph. Channels inside a
subgraph prune like any other; channels that cross its boundary couple through its inputs and outputs. Every model
is built in code and checked as prune_exact checks: valid (full checker, strict inference, onnxruntime), same inputs
and outputs, and the same outputs as the original with the removed channels zeroed, here for every feed given
(both If conditions)."""
from __future__ import annotations

import numpy as np
import onnx
from builders import GraphBuilder
from exactness import planned, removed_channels
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune import CalibrationSource, Options
from onnxprune.criteria import probes
from onnxprune.graph import all_nodes
from onnxprune.pipeline import prepare
from onnxprune.surgery import apply_plan
from onnxprune.verify import check_valid, count_params, io_signature, layer_macs, run, zero_removed_channels

FLOAT = TensorProto.FLOAT


def subgraph(b: GraphBuilder, name: str, inputs: list[onnx.ValueInfoProto], build, own_weights: bool = False):
    """The nodes `build()` adds to `b` (and, with `own_weights`, the weights it creates) taken out as a subgraph;
    `build` returns its outputs. Without `own_weights` the subgraph reads its weights from the main graph."""
    nodes, inits = len(b.nodes), len(b.inits)
    outputs = build()
    body = helper.make_graph(b.nodes[nodes:], name, inputs,
                             [helper.make_tensor_value_info(o, t, None) for o, t in outputs],
                             b.inits[inits:] if own_weights else [])
    del b.nodes[nodes:]
    if own_weights:
        del b.inits[inits:]
    return body


def finish(b: GraphBuilder, outputs: dict[str, list]) -> onnx.ModelProto:
    """The model with these declared outputs (name -> shape): inference does not see through a Loop's carried state."""
    graph = helper.make_graph(b.nodes, "test", b.inputs,
                              [helper.make_tensor_value_info(n, FLOAT, s) for n, s in outputs.items()], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", b.opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def exact_on(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], ratio: float = 0.5):
    """prune_exact with the feeds given: returns (pruned, analysis, plan)."""
    prepared, plan = planned(model, ratio)
    assert removed_channels(prepared.analysis, plan) > 0, "the plan removes no channel"
    zeroed = zero_removed_channels(prepared.model, prepared.analysis, plan)
    again = prepare(zeroed)
    pruned = apply_plan(again.model, again.analysis, plan)
    assert count_params(pruned) < count_params(prepared.model)
    check_valid(pruned)
    onnx.shape_inference.infer_shapes(pruned, check_type=True, strict_mode=True)
    assert io_signature(pruned) == io_signature(model)
    for feed in feeds:
        for expected, got in zip(run(zeroed, feed), run(pruned, feed)):
            assert expected.shape == got.shape
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-4)
    return pruned, prepared.analysis, plan


def group_of(analysis, weight: str, axis: int):
    return next(g for g in analysis.groups if any(m.space == (weight, axis) for m in g.members))


def images(seed: int = 1, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 8, 8)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ If
def if_model() -> onnx.ModelProto:
    """stem conv -> If(flag: two convs | one conv, weights inside the branches) -> conv."""
    b = GraphBuilder()
    x = b.op("Relu", [b.conv(b.input(["N", 3, 8, 8]), 3, 16)])
    flag = b.input([], name="flag", elem_type=TensorProto.BOOL)
    then = subgraph(b, "then", [], lambda: [(b.conv(b.op("Relu", [b.conv(x, 16, 32)]), 32, 16), FLOAT)], True)
    other = subgraph(b, "else", [], lambda: [(b.op("Relu", [b.conv(x, 16, 16, k=1)]), FLOAT)], True)
    y = b.op("If", [flag], then_branch=then, else_branch=other)
    return finish(b, {b.conv(y, 16, 4): ["N", 4, 8, 8]})


def test_if_branches_prune_exact_for_both_conditions():
    model = if_model()
    feeds = [{"x": images(), "flag": np.array(v)} for v in (True, False)]
    pruned, analysis, plan = exact_on(model, feeds)
    then, other = branch(model.graph.node[2], "then_branch"), branch(model.graph.node[2], "else_branch")
    inside = group_of(analysis, then.node[0].input[1], 0)  # the 32 channels inside 'then'
    assert inside.prunable and inside.id in plan.keep
    crossing = group_of(analysis, model.graph.node[0].input[1], 0)  # stem -> both branches' first convs
    assert crossing.prunable and crossing.id in plan.keep
    assert {then.node[0].input[1], other.node[0].input[1]} <= {m.space[0] for m in crossing.members}
    out = group_of(analysis, model.graph.node[-1].input[1], 1)  # both branches' last convs -> the consumer
    assert out.prunable and {then.node[2].input[1], other.node[0].input[1]} <= {m.space[0] for m in out.members}
    then_weights = [i.dims[0] for i in branch(pruned.graph.node[2], "then_branch").initializer if len(i.dims) == 4]
    assert then_weights == [16, 8]


def branch(node: onnx.NodeProto, name: str) -> onnx.GraphProto:
    return next(a.g for a in node.attribute if a.name == name)


def test_if_output_sizes_follow_both_branches():
    """The branches' declared outputs and the If's inferred output agree after pruning."""
    pruned, _, _ = exact_on(if_model(), [{"x": images(), "flag": np.array(True)}])
    node = next(n for n in pruned.graph.node if n.op_type == "If")
    inferred = onnx.shape_inference.infer_shapes(pruned, strict_mode=True)
    sizes = {vi.name: vi.type.tensor_type.shape.dim[1].dim_value for vi in inferred.graph.value_info}
    assert sizes[node.output[0]] == 8


def test_fixups_inside_a_branch():
    """A depthwise conv's group and Reshape targets held by the branch are fixed where they are."""
    b = GraphBuilder()
    x = b.op("Relu", [b.conv(b.input(["N", 3, 8, 8]), 3, 16)])
    flag = b.input([], name="flag", elem_type=TensorProto.BOOL)

    def then():
        flat = b.op("Reshape", [b.conv(x, 16, 16, group=16), b.const(np.array([0, 16, 64], np.int64))])
        return [(b.op("Reshape", [b.op("Relu", [flat]), b.const(np.array([0, 16, 8, 8], np.int64))]), FLOAT)]
    other = subgraph(b, "else", [], lambda: [(b.op("Relu", [x]), FLOAT)], True)
    y = b.op("If", [flag], then_branch=subgraph(b, "then", [], then, True), else_branch=other)
    model = finish(b, {b.conv(y, 16, 4): ["N", 4, 8, 8]})
    feeds = [{"x": images(), "flag": np.array(v)} for v in (True, False)]
    pruned, _, plan = exact_on(model, feeds)
    assert len(plan.keep) == 1
    then = branch(next(n for n in pruned.graph.node if n.op_type == "If"), "then_branch")
    assert next(a.i for a in then.node[0].attribute if a.name == "group") == 8
    targets = sorted(tuple(onnx.numpy_helper.to_array(i)) for i in then.initializer if i.data_type == TensorProto.INT64)
    assert targets == [(0, 8, 8, 8), (0, 8, 64)]


def test_branches_that_reuse_a_name_stay_frozen_with_the_reason():
    model = if_model()
    then, other = branch(model.graph.node[2], "then_branch"), branch(model.graph.node[2], "else_branch")
    shared = other.node[0].output[0]
    for n in then.node:  # the then branch's first conv output gets the else branch's name
        n.input[:] = [shared if i == then.node[0].output[0] else i for i in n.input]
    then.node[0].output[0] = shared
    onnx.checker.check_model(model, full_check=True)
    analysis = prepare(model).analysis
    assert any("reuse names" in r for r in analysis.barriers)
    stem = group_of(analysis, model.graph.node[0].input[1], 0)
    assert not stem.prunable and any("used inside a subgraph" in r for r in stem.frozen)


# ------------------------------------------------------------------------------------------------ Loop
def loop_model(declare_carried: bool = True) -> onnx.ModelProto:
    """stem conv (8) -> Loop, trip count 2, carrying h through conv(8->16) relu conv(16->8) relu with the weights read
    from the main graph, and stacking each iteration's h as a scan output -> a conv on each."""
    b = GraphBuilder()
    x = b.op("Relu", [b.conv(b.input([1, 3, 8, 8]), 3, 8)])
    carried = helper.make_tensor_value_info("h_in", FLOAT, [1, 8, 8, 8] if declare_carried else None)
    inputs = [helper.make_tensor_value_info("i", TensorProto.INT64, []),
              helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), carried]

    def body():
        h = b.op("Relu", [b.conv(b.op("Relu", [b.conv("h_in", 8, 16)]), 16, 8)])
        return [(b.op("Identity", ["cond_in"]), TensorProto.BOOL), (h, FLOAT), (b.op("Identity", [h]), FLOAT)]
    loop = subgraph(b, "body", inputs, body)
    final, stacked = b.op("Loop", [b.const(np.array(2, np.int64)), "", x], n_out=2, body=loop)
    flat = b.op("Squeeze", [stacked, b.const(np.array([1], np.int64))])  # (2, 8, 8, 8): iterations as the batch
    return finish(b, {b.conv(final, 8, 4): [1, 4, 8, 8], b.conv(flat, 8, 4): [2, 4, 8, 8]})


def test_loop_prunes_through_its_carried_state():
    model = loop_model()
    pruned, analysis, plan = exact_on(model, [{"x": images(batch=1)}])
    body = model.graph.node[2].attribute[0].g
    inner = group_of(analysis, body.node[0].input[1], 0)  # the 16 channels inside the body
    carried = group_of(analysis, model.graph.node[0].input[1], 0)  # stem -> carried h -> both consumers
    assert inner.prunable and carried.prunable and {inner.id, carried.id} <= set(plan.keep)
    assert {body.node[2].input[1], model.graph.node[-1].input[1]} <= {m.space[0] for m in carried.members}
    body_input = next(n for n in pruned.graph.node if n.op_type == "Loop").attribute[0].g.input[2]
    assert body_input.type.tensor_type.shape.dim[1].dim_value == 4


def test_loop_body_without_declared_carried_shapes():
    """ONNX inference leaves a carried input without a shape; the analysis takes the start value's."""
    _, analysis, plan = exact_on(loop_model(declare_carried=False), [{"x": images(batch=1)}])
    assert len(plan.keep) == 2  # the carried 8 channels and the 16 inside the body, as with declared shapes


def test_loop_whose_carried_value_changes_shape_stays_frozen():
    """A carried value that grows each iteration (a Concat in the body) has no one size to prune."""
    b = GraphBuilder()
    x = b.op("Relu", [b.conv(b.input([1, 3, 8, 8]), 3, 8)])
    inputs = [helper.make_tensor_value_info("i", TensorProto.INT64, []),
              helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
              helper.make_tensor_value_info("h_in", FLOAT, [1, None, 8, 8])]
    loop = subgraph(b, "body", inputs, lambda: [(b.op("Identity", ["cond_in"]), TensorProto.BOOL),
                                                (b.op("Concat", ["h_in", b.conv("h_in", 8, 8)], axis=1), FLOAT)])
    b.op("Loop", [b.const(np.array(1, np.int64)), "", x], body=loop)
    model = finish(b, {b.nodes[-1].output[0]: [1, None, 8, 8]})
    analysis = prepare(model).analysis
    stem = group_of(analysis, model.graph.node[0].input[1], 0)
    assert not stem.prunable and stem.frozen


# ------------------------------------------------------------------------------------------------ Scan
def scan_model() -> onnx.ModelProto:
    """x (5, 2, 16) -> MatMul (32) -> Scan over the 5 steps: state += relu(element @ W + b); each step's relu out is
    a scan output; final state and stacked outputs -> MatMul each."""
    b = GraphBuilder()
    h = b.op("Relu", [b.matmul(b.input([5, 2, 16]), 16, 32)])
    inputs = [helper.make_tensor_value_info(name, FLOAT, [2, 32]) for name in ("state", "e")]

    def body():
        r = b.op("Relu", [b.matmul("e", 32, 32)])
        return [(b.op("Add", ["state", r]), FLOAT), (b.op("Identity", [r]), FLOAT)]
    scan = subgraph(b, "body", inputs, body, own_weights=True)
    start = b.const(np.zeros((2, 32), np.float32))
    final, stacked = b.op("Scan", [start, h], n_out=2, body=scan, num_scan_inputs=1)
    return finish(b, {b.matmul(final, 32, 4): [2, 4], b.matmul(stacked, 32, 4): [5, 2, 4]})


def test_scan_prunes_its_scanned_input_and_its_state():
    model = scan_model()
    x = np.random.default_rng(2).standard_normal((5, 2, 16)).astype(np.float32)
    pruned, analysis, plan = exact_on(model, [{"x": x}])
    body = model.graph.node[3].attribute[0].g
    scanned = group_of(analysis, model.graph.node[0].input[1], 1)  # first MatMul -> each element -> body MatMul
    state = group_of(analysis, body.node[0].input[1], 1)  # body MatMul -> state, stacked outputs -> consumers
    assert scanned.prunable and state.prunable and {scanned.id, state.id} <= set(plan.keep)
    assert ("state", 1) in {m.space for m in state.members}
    body = next(n for n in pruned.graph.node if n.op_type == "Scan").attribute[0].g
    assert (16, 16) in [tuple(i.dims) for i in body.initializer]


# ------------------------------------------------------------------------------------------------ nested
def nested_model() -> onnx.ModelProto:
    """A Loop (trip count 2) whose body chooses between two conv branches on an outer flag, carrying h."""
    b = GraphBuilder()
    x = b.op("Relu", [b.conv(b.input([1, 3, 8, 8]), 3, 8)])
    flag = b.input([], name="flag", elem_type=TensorProto.BOOL)
    inputs = [helper.make_tensor_value_info("i", TensorProto.INT64, []),
              helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
              helper.make_tensor_value_info("h_in", FLOAT, [1, 8, 8, 8])]

    def body():
        then = subgraph(b, "then", [], lambda: [(b.op("Relu", [b.conv(b.op("Relu", [b.conv("h_in", 8, 16)]), 16, 8)]),
                                                 FLOAT)])
        other = subgraph(b, "else", [], lambda: [(b.op("Relu", [b.conv("h_in", 8, 8, k=1)]), FLOAT)])
        return [(b.op("Identity", ["cond_in"]), TensorProto.BOOL),
                (b.op("If", [flag], then_branch=then, else_branch=other), FLOAT)]
    loop = subgraph(b, "body", inputs, body)
    final = b.op("Loop", [b.const(np.array(2, np.int64)), "", x], body=loop)
    return finish(b, {b.conv(final, 8, 4): [1, 4, 8, 8]})


def test_if_nested_inside_a_loop():
    model = nested_model()
    feeds = [{"x": images(batch=1), "flag": np.array(v)} for v in (True, False)]
    _, analysis, plan = exact_on(model, feeds)
    assert len(plan.keep) == 2  # the carried 8 through both branches, the 16 inside 'then'


def test_weights_in_constant_nodes_of_nested_subgraphs():
    """Exporters hold a body's weights in Constant nodes: normalisation makes them initializers of their subgraph at
    any depth, here the 'then' branch's in that branch and the 'else' branch's in the Loop body around it (a graph's
    nodes are rebuilt before its subgraphs are read, so none is read stale)."""
    model = nested_model()
    loop = next(n for n in model.graph.node if n.op_type == "Loop").attribute[0].g
    node = next(n for n in loop.node if n.op_type == "If")
    weights = {i.name: i for i in model.graph.initializer}
    moved = [_as_constant_nodes(graph, [i for n in source.node for i in n.input if i in weights], weights)
             for graph, source in [(branch(node, "then_branch"),) * 2, (loop, branch(node, "else_branch"))]]
    kept = [i for i in model.graph.initializer if not any(i.name in names for names in moved)]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.checker.check_model(model, full_check=True)
    feeds = [{"x": images(batch=1), "flag": np.array(v)} for v in (True, False)]
    pruned, _, plan = exact_on(model, feeds)
    assert len(plan.keep) == 2
    assert not [n for n in all_nodes(pruned.graph) if n.op_type == "Constant"]


def _as_constant_nodes(graph: onnx.GraphProto, names: list[str], weights: dict) -> list[str]:
    """Put these weights into Constant nodes at the start of `graph`; returns the names."""
    nodes = [helper.make_node("Constant", [], [name], value=weights[name]) for name in names] + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return names


# ------------------------------------------------------------------------------------------------ data
def test_data_criteria_and_recovery_leave_body_values_alone():
    """onnxruntime cannot expose a value inside a body: activation statistics are taken where a group enters its
    consumers outside (the two convs after the Loop here), groups seen only inside a body are ranked by l1, and least
    squares re-fits only the layers outside; the result is a valid model."""
    model = loop_model()
    feeds = [{"x": images(seed, batch=1)} for seed in range(8)]
    for criterion in ("activation", "regression"):
        options = Options(criterion=criterion, recover="lsq", round_to=1, calib=CalibrationSource(feeds))
        pruned, report = onnxprune.prune(model, 0.5, options)
        check_valid(pruned)
        assert report.to_dict()["summary"]["pruned"] == 2
        run(pruned, feeds[0])
    prepared = prepare(model)
    carried = group_of(prepared.analysis, model.graph.node[0].input[1], 0)
    after_loop = {n.input[0] for n in model.graph.node if n.op_type == "Conv"} - {"x"}
    assert {m.space[0] for m in probes(carried, prepared.analysis.index)} == after_loop


def test_carried_value_that_comes_back_not_zero_marks_the_group_inexact():
    """h -> conv -> Sigmoid carried twice: a removed channel is zero in the first iteration and Sigmoid(0) = 0.5 in
    the second, where the body's conv sums it in. After the Loop it is multiplied by the (zero) start value, so only
    the body's second iteration loses it: the zero flow reruns the body with what the carried value brings back."""
    b = GraphBuilder()
    x = b.op("Relu", [b.conv(b.input([1, 3, 8, 8]), 3, 8)])
    inputs = [helper.make_tensor_value_info("i", TensorProto.INT64, []),
              helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
              helper.make_tensor_value_info("h_in", FLOAT, [1, 8, 8, 8])]
    loop = subgraph(b, "body", inputs, lambda: [(b.op("Identity", ["cond_in"]), TensorProto.BOOL),
                                                (b.op("Sigmoid", [b.conv("h_in", 8, 8)]), FLOAT)])
    final = b.op("Loop", [b.const(np.array(2, np.int64)), "", x], body=loop)
    model = finish(b, {b.conv(b.op("Mul", [final, x]), 8, 4): [1, 4, 8, 8]})
    analysis = prepare(model).analysis
    carried = group_of(analysis, model.graph.node[0].input[1], 0)
    assert carried.prunable and any("Sigmoid" in r and "sums it in" in r for r in carried.inexact), carried.inexact
    body_conv = next(n.name for n in loop.node if n.op_type == "Conv")
    assert any(f"'{body_conv}'" in r for r in carried.inexact)


def test_macs_count_a_body_once_per_iteration():
    """A Loop with a constant trip count runs its body that many times, a Scan once per scanned step."""
    model = loop_model()
    macs = layer_macs(model)
    body = model.graph.node[2].attribute[0].g
    assert macs[body.node[0].name] == 2 * (8 * 8) * 16 * (8 * 9)  # 2 iterations of 64 positions x 16 x (8 x 3 x 3)
    assert macs[model.graph.node[0].name] == (8 * 8) * 8 * (3 * 9)
    scan = scan_model()
    body = scan.graph.node[3].attribute[0].g
    assert layer_macs(scan)[body.node[0].name] == 5 * 2 * 32 * 32  # 5 steps of (2, 32) @ (32, 32)


def test_constant_values_crossing_the_boundary_are_zeroed_with_their_channels():
    """A branch that returns a constant and a Scan state that starts from a non-zero constant: the constants hold
    the group's channels, so the harness zeroes them with the channels and pruning stays exact."""
    b = GraphBuilder()
    x = b.op("Relu", [b.conv(b.input([1, 3, 8, 8]), 3, 16)])
    flag = b.input([], name="flag", elem_type=TensorProto.BOOL)
    then = subgraph(b, "then", [], lambda: [(b.op("Relu", [b.conv(x, 16, 16)]), FLOAT)], True)
    fixed = numpy_helper.from_array(np.random.default_rng(3).uniform(0.5, 1.5, (1, 16, 8, 8)).astype(np.float32),
                                    "fixed")
    other = helper.make_graph([], "else", [], [helper.make_tensor_value_info("fixed", FLOAT, [1, 16, 8, 8])], [fixed])
    y = b.op("If", [flag], then_branch=then, else_branch=other)
    rows = b.op("Transpose", [y], perm=[2, 0, 3, 1])  # (8, 1, 8, 16): scanned over its first axis
    inputs = [helper.make_tensor_value_info(n, FLOAT, [1, 8, 16]) for n in ("acc", "row")]
    body = subgraph(b, "body", inputs, lambda: [(b.op("Add", ["acc", "row"]), FLOAT)])
    start = b.const(np.random.default_rng(4).uniform(0.5, 1.5, (1, 8, 16)).astype(np.float32))
    total = b.op("Scan", [start, rows], body=body, num_scan_inputs=1)
    model = finish(b, {b.matmul(total, 16, 4): [1, 8, 4]})
    feeds = [{"x": images(batch=1), "flag": np.array(v)} for v in (True, False)]
    _, analysis, plan = exact_on(model, feeds)
    crossing = group_of(analysis, then.node[0].input[1], 0)
    assert crossing.id in plan.keep and {"fixed", start} <= {m.space[0] for m in crossing.members}


def test_branch_output_computed_from_constants_freezes_with_the_reason():
    """Identity of an initializer as a branch's output: no rule zeroes that constant with the channels, so the If
    freezes (instead of pruning channels whose constant values the consumer then silently loses)."""
    b = GraphBuilder()
    x = b.op("Relu", [b.conv(b.input([1, 3, 8, 8]), 3, 16)])
    flag = b.input([], name="flag", elem_type=TensorProto.BOOL)
    then = subgraph(b, "then", [], lambda: [(b.op("Relu", [b.conv(x, 16, 16)]), FLOAT)], True)
    fixed = b.const(np.random.default_rng(3).uniform(0.5, 1.5, (1, 16, 8, 8)).astype(np.float32))
    other = subgraph(b, "else", [], lambda: [(b.op("Identity", [fixed]), FLOAT)])
    y = b.op("If", [flag], then_branch=then, else_branch=other)
    model = finish(b, {b.conv(y, 16, 4): [1, 4, 8, 8]})
    analysis = prepare(model).analysis
    out = group_of(analysis, then.node[0].input[1], 0)
    assert not out.prunable and any("computed from constants alone (Identity" in r for r in out.frozen), out.frozen


def test_identity_on_an_outer_constant_inside_a_body_is_bypassed():
    """A body adds a main-graph constant through an Identity (as exporters wrap shared weights): normalisation points
    the Add at the constant itself, so the constant gets its role and is zeroed with the channels."""
    b = GraphBuilder()
    x = b.op("Relu", [b.conv(b.input([1, 3, 8, 8]), 3, 8)])
    shift = b.const(np.random.default_rng(5).uniform(0.5, 1.5, (1, 8, 1, 1)).astype(np.float32))
    inputs = [helper.make_tensor_value_info("i", TensorProto.INT64, []),
              helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
              helper.make_tensor_value_info("h_in", FLOAT, [1, 8, 8, 8])]
    loop = subgraph(b, "body", inputs, lambda: [(b.op("Identity", ["cond_in"]), TensorProto.BOOL),
                                                (b.op("Add", [b.conv("h_in", 8, 8), b.op("Identity", [shift])]),
                                                 FLOAT)])
    final = b.op("Loop", [b.const(np.array(2, np.int64)), "", x], body=loop)
    model = finish(b, {b.conv(final, 8, 4): [1, 4, 8, 8]})
    _, analysis, plan = exact_on(model, [{"x": images(batch=1)}])
    assert plan.keep and not any(analysis.groups[g].inexact for g in plan.keep)
