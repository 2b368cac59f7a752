"""Quantized models (issue 10): QDQ models as onnxruntime.quantization writes them prune like their float graph.

Per-axis scales and zero points are sliced with their weights, per-tensor ones kept; the pruned model is still a QDQ
model that onnxruntime runs with its int8 kernels, and it is exact against the original with the removed channels
zeroed in the integer domain (the zero point). QOperator and dynamically quantized ops freeze with the reason."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

import onnxprune
from builders import GraphBuilder, invoke
from exactness import planned, prune_exact
from onnxprune import CalibrationSource, Options, Target
from onnxprune.recover import output_error
from onnxprune.roles import Role
from onnxprune.verify import check_valid, random_feeds


# ---------------------------------------------------------------------------------------------- models

def conv_net() -> onnx.ModelProto:
    """Two convs, a pooled head and two linear layers: conv and Gemm weights, a flatten between them."""
    b = GraphBuilder(seed=3)
    x = b.op("Relu", [b.conv(b.input([1, 3, 8, 8]), 3, 16)])
    x = b.op("Relu", [b.conv(x, 16, 16)])
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])])
    x = b.op("Relu", [b.gemm(x, 16, 12)])
    return b.model(b.gemm(x, 12, 4))


def matmul_net() -> onnx.ModelProto:
    """A transformer-style MLP: MatMul + Add, Relu, MatMul + Add over a sequence."""
    b = GraphBuilder(seed=4)
    x = b.op("Relu", [b.matmul(b.input([1, 6, 16]), 16, 32)])
    return b.model(b.matmul(x, 32, 8))


class RandomReader(CalibrationDataReader):
    """onnxruntime.quantization's calibration protocol over random samples of the model's inputs."""

    def __init__(self, model: onnx.ModelProto, samples: int = 8):
        self.feeds = iter([random_feeds(model, seed=k) for k in range(samples)])

    def get_next(self) -> dict | None:
        return next(self.feeds, None)


def quantized(model: onnx.ModelProto, tmp_path, per_channel: bool, unsigned: bool = False) -> onnx.ModelProto:
    """The model quantized by onnxruntime in QDQ format, calibrated on random data; int8 (weights symmetric, zero
    point 0), or `unsigned` uint8 (weights asymmetric: zero points that are not 0).

    Weights get 7 bits (reduce_range): on AVX2 machines without VNNI onnxruntime's u8s8 kernels add products in
    saturating int16 pairs, so with 8-bit weights which channels sit side by side can change a sum by a quantum,
    and removing channels changes that (measured on the digits model: 0.027, one output quantum)."""
    source, target = tmp_path / "float.onnx", tmp_path / f"qdq{int(per_channel)}.onnx"
    onnx.save(model, source)
    kind = QuantType.QUInt8 if unsigned else QuantType.QInt8
    quantize_static(str(source), str(target), RandomReader(model), quant_format=QuantFormat.QDQ,
                    per_channel=per_channel, weight_type=kind, activation_type=kind, reduce_range=True)
    return onnx.load(target)


def optimized_op_types(model: onnx.ModelProto, tmp_path) -> Counter:
    """The op types of the graph onnxruntime runs (extended optimizations: QDQ groups fused into int8 kernels)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node)


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


def dequantize_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    inits = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]


# ---------------------------------------------------------------------------------------------- QDQ from onnxruntime

QUANTIZATIONS = pytest.mark.parametrize("per_channel, unsigned", [(False, False), (True, False), (False, True),
                                                                 (True, True)])


@QUANTIZATIONS
def test_qdq_conv_net_prunes_exactly_and_keeps_its_int8_kernels(tmp_path, per_channel, unsigned):
    model = quantized(conv_net(), tmp_path, per_channel, unsigned)
    pruned, analysis, plan = prune_exact(model, 0.5, atol=1e-6)
    assert len(plan.keep) == 3  # both convs' and the hidden linear layer's channels
    before, after = optimized_op_types(model, tmp_path), optimized_op_types(pruned, tmp_path)
    assert after == before and after["QLinearConv"] == 2 and after["QGemm"] == 2, after
    assert "Conv" not in after and "Gemm" not in after  # no float fallback


@QUANTIZATIONS
def test_qdq_matmul_net_prunes_exactly_with_int8_kernels(tmp_path, per_channel, unsigned):
    """The bias Add after each MatMul reads its own quantized constant (zero point not 0): zeroed to that."""
    model = quantized(matmul_net(), tmp_path, per_channel, unsigned)
    pruned, _, plan = prune_exact(model, 0.5, atol=1e-6)
    assert [len(k) for k in plan.keep.values()] == [16]
    after = optimized_op_types(pruned, tmp_path)
    assert after == optimized_op_types(model, tmp_path) and after["QLinearMatMul"] == 2, after
    assert "MatMul" not in after  # no float matrix product left


def test_per_axis_scales_are_sliced_and_per_tensor_ones_kept(tmp_path):
    model = quantized(conv_net(), tmp_path, per_channel=True)
    pruned, _, _ = prune_exact(model, 0.5, atol=1e-6)
    for node in dequantize_nodes(pruned):
        data, scale = initializer(pruned, node.input[0]), initializer(pruned, node.input[1])
        zero_point = initializer(pruned, node.input[2])
        if scale.size > 1:  # per axis: one scale and zero point per index of the quantized axis, as the data has
            axis = onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "axis"))
            assert scale.shape == zero_point.shape == (data.shape[axis],)
        assert data.dtype == initializer(model, node.input[0]).dtype  # still integer data
    kept = {i.name: numpy_helper.to_array(i) for i in pruned.graph.initializer if i.dims == []}
    for name, value in kept.items():  # per-tensor scales and zero points are unchanged
        assert np.array_equal(value, initializer(model, name))


def test_uint8_activations_and_int8_weights_built_by_hand_prune_exactly():
    """Quantize-dequantize around the input (uint8, zero point 128) and per-axis int8 weights written by hand."""
    b = GraphBuilder(seed=6)
    s, zp = b.const(np.float32(0.02)), b.const(np.uint8(128))
    x = b.op("DequantizeLinear", [b.op("QuantizeLinear", [b.input([1, 3, 8, 8]), s, zp]), s, zp])
    for cin, cout in ((3, 16), (16, 8)):
        w = b.const(b.rng.integers(-50, 50, (cout, cin, 3, 3)).astype(np.int8))
        w = b.op("DequantizeLinear", [w, b.const(np.linspace(0.005, 0.02, cout).astype(np.float32)),
                                      b.const(np.zeros(cout, np.int8))], axis=0)
        x = b.op("Relu", [b.op("Conv", [x, w], pads=[1] * 4)])
        x = b.op("DequantizeLinear", [b.op("QuantizeLinear", [x, s, zp]), s, zp])
    pruned, analysis, plan = prune_exact(b.model(x), 0.5)
    assert [analysis.groups[g].size for g in plan.keep] == [16]


def test_float_weights_quantized_in_the_graph_prune_exactly():
    """Quantization-aware-training exports keep float weights behind QuantizeLinear -> DequantizeLinear: the float
    weight takes the roles the conv gives the dequantized value, and its per-axis scales are sliced with it."""
    b = GraphBuilder(seed=13, opset=13)
    x = b.input([1, 3, 8, 8])
    for cin, cout in ((3, 16), (16, 8)):
        s, zp = b.const(np.float32(0.05)), b.const(np.int8(0))
        x = b.op("DequantizeLinear", [b.op("QuantizeLinear", [x, s, zp]), s, zp])
        ws, wzp = b.const(np.full(cout, 0.02, np.float32)), b.const(np.zeros(cout, np.int8))
        w = b.op("QuantizeLinear", [b.weight(cout, cin, 3, 3), ws, wzp], axis=0)
        w = b.op("DequantizeLinear", [w, ws, wzp], axis=0)
        x = b.op("Relu", [b.op("Conv", [x, w, b.const(np.zeros(cout, np.float32))], pads=[1] * 4)])
    pruned, analysis, plan = prune_exact(b.model(x), 0.5)
    roles = {m.role for g in plan.keep for m in analysis.groups[g].members if m.constant}
    assert {Role.W_OUT, Role.W_IN, Role.BIAS} <= roles


def test_per_axis_quantized_activation_slices_its_scale():
    b = GraphBuilder(seed=7)
    x = b.op("Relu", [b.conv(b.input([1, 3, 8, 8]), 3, 16)])
    scale, zero_point = b.const(np.linspace(0.01, 0.05, 16).astype(np.float32)), b.const(np.zeros(16, np.int8))
    x = b.op("DequantizeLinear", [b.op("QuantizeLinear", [x, scale, zero_point], axis=1), scale, zero_point],
             axis=1)
    pruned, _, _ = prune_exact(b.model(b.conv(x, 16, 8)), 0.5)
    assert initializer(pruned, scale).shape == (8,)


@pytest.mark.parametrize("reader, reason", [
    ("Cast", "QuantizeLinear(0) is its zero point, which a reader takes as it is"),
    ("DequantizeLinear", "DequantizeLinear(0) is -(zero point) * scale"),
])
def test_a_zero_point_read_as_it_is_marks_the_group_inexact(reader, reason):
    """A removed channel quantizes to the zero point (-3): only a DequantizeLinear with that zero point makes it 0
    again; a Cast of the integers or a DequantizeLinear with another zero point (5) passes a constant on."""
    b = GraphBuilder(seed=12)
    x = b.op("Relu", [b.conv(b.input([1, 3, 8, 8]), 3, 16)])
    scale = b.const(np.float32(0.05))
    q = b.op("QuantizeLinear", [x, scale, b.const(np.array(-3, np.int8))])
    args = {"Cast": ([q], {"to": onnx.TensorProto.FLOAT}), "DequantizeLinear": ([q, scale, b.const(np.int8(5))], {})}
    y = b.op(reader, args[reader][0], **args[reader][1])
    prepared, plan = planned(b.model(b.conv(y, 16, 8)), 0.5)
    inexact = [r for g in plan.keep for r in prepared.analysis.groups[g].inexact]
    assert len(plan.keep) == 1 and any(reason in r for r in inexact), inexact


# ---------------------------------------------------------------------------------------------- criteria

def test_l1_ranks_channels_by_their_dequantized_weights():
    """Large integers times small scales are small weights: l1 must see the products, not the stored integers."""
    b = GraphBuilder(seed=8)
    integers = np.tile(np.arange(1, 9, dtype=np.int8)[:, None, None, None] * 10, (1, 3, 3, 3))
    scales = (1.0 / np.arange(1, 9) ** 2).astype(np.float32)  # channel c dequantizes to 10 / (c + 1)
    w = b.op("DequantizeLinear", [b.const(integers), b.const(scales), b.const(np.zeros(8, np.int8))], axis=0)
    x = b.op("Relu", [b.op("Conv", [b.input([1, 3, 8, 8]), w], pads=[1] * 4)])
    prepared, plan = planned(b.model(b.conv(x, 8, 4)), 0.5)
    assert list(plan.keep.values())[0].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("criterion", ["activation", "apoz", "regression"])
def test_data_driven_criteria_rank_quantized_layers(tmp_path, criterion):
    """Activations are measured at the dequantized inputs, the regression criterion reads dequantized weights: no
    group falls back to l1."""
    model = quantized(conv_net(), tmp_path, per_channel=True)
    feeds = [random_feeds(model, seed=k) for k in range(4)]
    _, report = onnxprune.prune(model, Target.ratio(0.5), Options(criterion=criterion, round_to=1,
                                                                  calib=CalibrationSource(feeds)))
    assert report.to_dict()["criterion_fallbacks"] == 0


@pytest.mark.parametrize("recover", ["bias", "lsq"])
def test_recovery_requantizes_what_it_fits_and_keeps_the_int8_kernels(tmp_path, recover):
    """Bias recovery and least squares work on the dequantized values; what they fit goes back as integers with the
    layer's own scale and zero point (int8 weights, int32 biases), so onnxruntime still fuses the same kernels."""
    model = quantized(conv_net(), tmp_path, per_channel=True)
    feeds = [random_feeds(model, seed=k) for k in range(16)]
    plain = onnxprune.prune(model, Target.ratio(0.5), Options(round_to=1))[0]
    pruned, report = onnxprune.prune(model, Target.ratio(0.5), Options(recover=recover, round_to=1,
                                                                       calib=CalibrationSource(feeds)))
    check_valid(pruned)
    changed = [i.name for i in plain.graph.initializer
               if not np.array_equal(initializer(pruned, i.name), numpy_helper.to_array(i))]
    assert changed and all(initializer(pruned, n).dtype == initializer(plain, n).dtype for n in changed)
    assert {initializer(pruned, n).dtype.kind for n in changed} == {"i"}  # integers, nothing float added
    assert len(pruned.graph.initializer) == len(plain.graph.initializer)
    assert output_error(pruned, model, feeds) < output_error(plain, model, feeds)
    assert optimized_op_types(pruned, tmp_path) == optimized_op_types(model, tmp_path)


# ---------------------------------------------------------------------------------------------- what freezes

def _two_convs_around(op: str, tmp_path) -> str:
    """The CLI summary of conv -> DequantizeLinear(QuantizeLinear) with `op`'s attributes -> conv."""
    b = GraphBuilder(seed=9, opset=21)
    x = b.op("Relu", [b.conv(b.input([1, 3, 8, 8]), 3, 16)])
    scale, zero_point = b.const(np.full((2, 16), 0.05, np.float32)), b.const(np.zeros((2, 16), np.int8))
    attrs = {"axis": 0, "block_size": 8} if op == "blocked" else {}
    x = b.op("DequantizeLinear", [b.op("QuantizeLinear", [x, scale, zero_point], **attrs), scale, zero_point],
             **attrs)
    onnx.save(b.model(b.conv(x, 16, 8)), tmp_path / "m.onnx")
    result = invoke(tmp_path / "m.onnx", "--ratio", "0.5", "--round-to", "1", "-o", tmp_path / "p.onnx")
    assert result.exit_code == 0, result.output
    return result.output


def test_blocked_quantization_freezes_with_the_reason(tmp_path):
    out = _two_convs_around("blocked", tmp_path)
    assert "blocked quantization (block_size): a scale covers a block of channels" in out and "0 pruned" in out


def qlinear_matmul_net() -> onnx.ModelProto:
    b = GraphBuilder(seed=10)
    s, zp, wzp = b.const(np.float32(0.02)), b.const(np.uint8(128)), b.const(np.int8(0))
    xq = b.op("QuantizeLinear", [b.input([2, 16]), s, zp])
    w = b.const(b.rng.integers(-50, 50, (16, 8)).astype(np.int8))
    return b.model(b.op("DequantizeLinear", [b.op("QLinearMatMul", [xq, s, zp, w, s, wzp, s, zp]), s, zp]))


def matmul_integer_net() -> onnx.ModelProto:
    b = GraphBuilder(seed=11)
    x = b.input([2, 16], elem_type=onnx.TensorProto.UINT8)
    w = b.const(b.rng.integers(-50, 50, (16, 8)).astype(np.int8))
    return b.model(b.op("MatMulInteger", [x, w, b.const(np.uint8(128)), b.const(np.int8(0))]))


@pytest.mark.parametrize("build, reason", [
    (qlinear_matmul_net, "QLinearMatMul (QOperator format) is not pruned: quantize with QuantFormat.QDQ"),
    (matmul_integer_net, "MatMulInteger (dynamic quantization) is not pruned: prune the float model"),
])
def test_qoperator_and_dynamic_quantization_freeze_with_the_reason(tmp_path, build, reason):
    onnx.save(build(), tmp_path / "m.onnx")
    result = invoke(tmp_path / "m.onnx", "--ratio", "0.5", "-o", tmp_path / "p.onnx")
    assert result.exit_code == 0, result.output
    assert "no prunable channel group" in result.output and f"barrier: {reason}" in result.output


# ---------------------------------------------------------------------------------------------- command line

def test_cli_prunes_a_qdq_model_end_to_end(tmp_path):
    model = quantized(conv_net(), tmp_path, per_channel=True)
    onnx.save(model, tmp_path / "q.onnx")
    result = invoke(tmp_path / "q.onnx", "--ratio", "0.5", "--round-to", "1", "-o", tmp_path / "p.onnx",
                    "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert "3 pruned" in result.output and "MACs" in result.output and "(unchanged)" not in result.output
    pruned = onnx.load(tmp_path / "p.onnx")
    check_valid(pruned)
    assert optimized_op_types(pruned, tmp_path)["QLinearConv"] == 2
