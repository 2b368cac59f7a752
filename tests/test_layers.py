"""layers.py: a layer's rows times its weight rows, plus its bias, are what onnxruntime computes (Conv1d/2d/3d in
every padding mode, grouped, dilated, strided, without kernel_shape; Gemm; MatMul); MACs; least-squares recovery
and the regression criterion on N-d convolution chains, exactness included."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune import CalibrationSource, Options
from onnxprune.graph import GraphIndex
from onnxprune.layers import current_bias, describe, refittable
from onnxprune.options import Target
from onnxprune.pipeline import prepare
from onnxprune.verify import check_valid, io_signature, layer_macs, run, zero_removed_channels

SPATIAL = {1: (11,), 2: (9, 8), 3: (7, 6, 5)}


def prune_with(model: onnx.ModelProto, target, calib: list | None = None, **options):
    """The one place these tests call the public API."""
    source = CalibrationSource(calib) if calib is not None else None
    return onnxprune.prune(model, target, Options(calib=source, **options))


def one_node(op: str, x_shape: list, inits: dict[str, np.ndarray], after_add: np.ndarray | None = None,
             **attrs) -> onnx.ModelProto:
    """x -> op(x, *inits) [-> Add(bias)] -> output, shapes inferred strictly."""
    nodes = [helper.make_node(op, ["x", *inits], ["y"], name="layer", **attrs)]
    initializers = [numpy_helper.from_array(v, k) for k, v in inits.items()]
    if after_add is not None:
        nodes.append(helper.make_node("Add", ["y", "add_bias"], ["z"], name="add"))
        initializers.append(numpy_helper.from_array(after_add, "add_bias"))
    graph = helper.make_graph(nodes, "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def conv_attrs(case: str, rank: int) -> dict:
    kernel = {"kernel_shape": [3] * rank}
    return {
        "plain": kernel,
        "grouped": {**kernel, "group": 2, "pads": [1] * 2 * rank},
        "dilated": {**kernel, "dilations": [2] * rank, "pads": [2] * 2 * rank},
        "strided": {**kernel, "strides": [2] * rank, "pads": [1] * 2 * rank},
        "padded": {**kernel, "pads": [1, 0, 2][:rank] + [2, 1, 0][:rank]},
        "same_upper": {**kernel, "auto_pad": "SAME_UPPER", "strides": [2] * rank},
        "same_lower": {**kernel, "auto_pad": "SAME_LOWER", "strides": [2] * rank},
        "valid": {**kernel, "auto_pad": "VALID", "dilations": [2] * rank},
        "no_kernel_shape": {"pads": [1] * 2 * rank},  # kernel from the weight, strides and dilations default
    }[case]


def dense(weight: np.ndarray, groups: int) -> np.ndarray:
    """A grouped conv's weight (O, C/g, k...) as the equivalent ungrouped one (O, C, k...), zero across groups."""
    out, per_group = weight.shape[:2]
    full = np.zeros((out, per_group * groups) + weight.shape[2:], weight.dtype)
    for o in range(out):
        g = o // (out // groups)
        full[o, g * per_group:(g + 1) * per_group] = weight[o]
    return full


def assert_rows_reproduce(model: onnx.ModelProto, x: np.ndarray, groups: int = 1, positions: int = 20) -> None:
    index = GraphIndex.build(model)
    layer = describe(index.model.graph.node[0], index)
    y = run(model, {"x": x})[0]
    sample = layer.sample(x, np.random.default_rng(0), positions)
    expected = layer.output_rows(y, sample)
    rows = layer.weight_rows(dense(index.array(layer.weight), groups) if groups > 1 else index.array(layer.weight))
    bias = current_bias(model, layer, expected.shape[1])
    got = sample.patches.reshape(len(sample.patches), -1).astype(np.float64) @ rows + bias
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    weight = index.array(layer.weight)
    np.testing.assert_allclose(layer.rows_to_weight(layer.weight_rows(weight), weight), weight, rtol=1e-6)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("case", ["plain", "grouped", "dilated", "strided", "padded", "same_upper", "same_lower",
                                  "valid", "no_kernel_shape"])
def test_conv_patches_times_weight_rows_are_the_conv_output(rank, case):
    attrs = conv_attrs(case, rank)
    groups = attrs.get("group", 1)
    rng = np.random.default_rng(rank)
    weight = rng.standard_normal((6, 4 // groups) + (3,) * rank).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    model = one_node("Conv", [2, 4, *SPATIAL[rank]], {"w": weight, "b": bias}, **attrs)
    assert_rows_reproduce(model, rng.standard_normal((2, 4, *SPATIAL[rank])).astype(np.float32), groups)
    assert (refittable(model.graph.node[0], GraphIndex.build(model)) is not None) == (groups == 1)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_rows_with_transposition_alpha_and_beta(trans_b):
    rng = np.random.default_rng(trans_b)
    weight = rng.standard_normal((4, 6) if trans_b else (6, 4)).astype(np.float32)
    model = one_node("Gemm", [30, 6], {"w": weight, "c": rng.standard_normal(4).astype(np.float32)},
                     transB=trans_b, alpha=0.5, beta=2.0)
    assert_rows_reproduce(model, rng.standard_normal((30, 6)).astype(np.float32), positions=1)


def test_matmul_rows_and_the_bias_in_the_add_after_it():
    rng = np.random.default_rng(5)
    model = one_node("MatMul", [3, 5, 6], {"w": rng.standard_normal((6, 4)).astype(np.float32)},
                     after_add=rng.standard_normal(4).astype(np.float32))
    layer = describe(model.graph.node[0], GraphIndex.build(model))
    assert (layer.bias.node, layer.bias.input, layer.bias.create, layer.output_axis) == ("add", 1, False, 2)
    assert_rows_reproduce(model, rng.standard_normal((3, 5, 6)).astype(np.float32))


def test_mac_counts():
    rng = np.random.default_rng(0)
    w = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    cases = [
        (one_node("Conv", ["N", 3, 9, 8], {"w": w(16, 3, 3, 3)}, pads=[1] * 4), 16 * 72 * 27),
        (one_node("Conv", [1, 4, 11], {"w": w(6, 2, 3)}, group=2, strides=[2]), 6 * 5 * 6),
        (one_node("Conv", [1, 4, 7, 6, 5], {"w": w(6, 4, 3, 3, 3)}), 6 * 5 * 4 * 3 * 4 * 27),
        (one_node("ConvTranspose", [1, 4, 5, 5], {"w": w(4, 6, 3, 3)}), 4 * 25 * 6 * 9),
        (one_node("Gemm", ["N", 6], {"w": w(4, 6)}, transB=1), 4 * 6),
        (one_node("Gemm", [5, 6], {"w": w(6, 4)}), 5 * 4 * 6),
        (one_node("MatMul", [2, 5, 6], {"w": w(6, 4)}), 2 * 5 * 4 * 6),
    ]
    for model, expected in cases:
        assert layer_macs(model) == {"layer": expected}


def test_an_attention_matmul_counts_but_is_no_layer():
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, [2, 5, 6])
    k = helper.make_tensor_value_info("k", TensorProto.FLOAT, [2, 6, 5])
    graph = helper.make_graph([helper.make_node("MatMul", ["q", "k"], ["s"], name="scores")], "att", [q, k],
                              [helper.make_tensor_value_info("s", TensorProto.FLOAT, None)])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert layer_macs(model) == {"scores": 2 * 5 * 5 * 6}
    assert describe(model.graph.node[0], GraphIndex.build(model)) is None


# ------------------------------------------------------------------------------------------------ N-d chains

def conv_chain(rank: int) -> onnx.ModelProto:
    """conv(3->16) -> relu -> dilated conv(16->16) -> relu -> grouped conv(16->16, 4 groups) -> relu -> conv(16->8),
    in `rank` spatial dimensions; the first conv has no kernel_shape."""
    rng = np.random.default_rng(rank)
    inits, nodes = [], []

    def conv(x: str, cin: int, cout: int, k: int, **attrs) -> str:
        name = f"conv{len(nodes)}"
        shape = (cout, cin // attrs.get("group", 1)) + (k,) * rank
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * (2 / np.prod(shape[1:])) ** 0.5)
                                             .astype(np.float32), name + "_w"))
        inits.append(numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype(np.float32), name + "_b"))
        nodes.append(helper.make_node("Conv", [x, name + "_w", name + "_b"], [name], name=name, **attrs))
        nodes.append(helper.make_node("Relu", [name], [name + "_relu"], name=name + "_relu"))
        return name + "_relu"

    h = conv("x", 3, 16, 3, pads=[1] * 2 * rank)
    h = conv(h, 16, 16, 3, kernel_shape=[3] * rank, dilations=[2] * rank, pads=[2] * 2 * rank)
    h = conv(h, 16, 16, 3, kernel_shape=[3] * rank, group=4, pads=[1] * 2 * rank)
    conv(h, 16, 8, 1, kernel_shape=[1] * rank)
    nodes.pop()  # no relu after the last conv
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, *SPATIAL[rank]])
    graph = helper.make_graph(nodes, "chain", [x], [helper.make_tensor_value_info(nodes[-1].output[0],
                                                                                 TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    model.graph.ClearField("output")
    model.graph.output.extend(inferred.graph.output)
    return model


def chain_data(rank: int, batches: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(100 + rank)
    return [{"x": rng.standard_normal((8, 3, *SPATIAL[rank])).astype(np.float32)} for _ in range(batches)]


def output_error(model: onnx.ModelProto, reference: onnx.ModelProto, data: list) -> float:
    return float(sum(np.sum((run(model, f)[0] - run(reference, f)[0]) ** 2) for f in data))


def assert_valid(pruned: onnx.ModelProto, original: onnx.ModelProto) -> None:
    check_valid(pruned)
    onnx.shape_inference.infer_shapes(pruned, check_type=True, strict_mode=True)
    assert io_signature(pruned) == io_signature(original)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_regression_and_lsq_on_nd_conv_chains(rank):
    model, data = conv_chain(rank), chain_data(rank)
    plain, _ = prune_with(model, 0.5, data, criterion="regression", round_to=1)
    recovered, report = prune_with(model, 0.5, data, criterion="regression", round_to=1, recover="lsq")
    for pruned in (plain, recovered):
        assert_valid(pruned, model)
    assert report.criterion_fallbacks == 0 and report.recovered_layers >= 2 and report.plan.keep
    assert output_error(recovered, model, data) <= output_error(plain, model, data)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_lsq_keeps_a_zeroed_nd_chain_exact(rank):
    """Zero what the regression criterion removes: pruning that model with lsq recovery must not change it."""
    model, data = conv_chain(rank), chain_data(rank)
    _, report = prune_with(model, 0.5, data, criterion="regression", round_to=1)
    prepared = prepare(model)
    zeroed = zero_removed_channels(prepared.model, prepared.analysis, report.plan)
    pruned, _ = prune_with(zeroed, Target.plan(report.plan), data, recover="lsq", round_to=1)
    assert_valid(pruned, model)
    for feeds in data:
        np.testing.assert_allclose(run(pruned, feeds)[0], run(zeroed, feeds)[0], rtol=1e-4, atol=1e-4)
