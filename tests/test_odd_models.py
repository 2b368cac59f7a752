"""Unusual models: float16 and bfloat16 (statistics and fits in float32/64, weights written back in the model's type,
exact on every criterion and recovery), scalar graph inputs, declared shapes that disagree with the graph, check on
models or data that do not fit, weight-free skeletons, and honest summaries for QLinearConv and Einsum models.
Every failure is one line (exit 1, or 2 for usage)."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxprune
from onnxprune import CalibrationSource, Options, Target
from onnxprune.pipeline import prepare
from onnxprune.testing.skeleton import METADATA_KEY, strip_weights
from onnxprune.graph import SKELETON_KEY
from onnxprune.verify import check_valid, io_signature, run, zero_removed_channels

from builders import GraphBuilder, conv_bn_relu_chain, files, invoke, one_line_error
from exactness import prune_exact

FP16_CRITERIA = ["l1", "l2", "bn", "random", "apoz", "activation", "regression"]


# ---------------------------------------------------------------------------------------------- models

def conv_gemm_net(elem_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """conv-bn-relu(3->16) -> conv(16->8, no bias) -> relu -> flatten -> gemm(512->10), in `elem_type`."""
    b = GraphBuilder(seed=3)
    x = b.conv_bn_relu(b.input(["N", 3, 8, 8]), 3, 16)
    x = b.op("Relu", [b.conv(x, 16, 8, bias=False)])
    return in_type(b.model(b.gemm(b.op("Flatten", [x], axis=1), 8 * 8 * 8, 10)), elem_type)


def in_type(model: onnx.ModelProto, elem_type: int) -> onnx.ModelProto:
    """The float32 model with every float32 weight, input and output in `elem_type` (float16 or bfloat16)."""
    if elem_type == TensorProto.FLOAT:
        return model
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(dtype), init.name))
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.elem_type = elem_type
    model.graph.ClearField("value_info")
    return model


def bfloat16_io_net() -> onnx.ModelProto:
    """bfloat16 in and out around a float32 conv net (onnxruntime's CPU provider computes no bfloat16 op but Cast):
    x (bf16) -> Cast -> conv-bn-relu(3->16) -> conv(16->8) -> Cast -> y (bf16)."""
    b = GraphBuilder(seed=4)
    x = b.op("Cast", [b.input(["N", 3, 8, 8], elem_type=TensorProto.BFLOAT16)], to=TensorProto.FLOAT)
    x = b.conv(b.conv_bn_relu(x, 3, 16), 16, 8)
    return b.model(b.op("Cast", [x], to=TensorProto.BFLOAT16))


def scalar_input_net() -> onnx.ModelProto:
    """x (N, 3, 8, 8) and a scalar gain s: conv(relu(conv(x)) * s)."""
    b = GraphBuilder(seed=5)
    x = b.op("Relu", [b.conv(b.input(["N", 3, 8, 8]), 3, 16)])
    return b.model(b.conv(b.op("Mul", [x, b.input([], name="s")]), 16, 8))


def images(count: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 8, 8)).astype(np.float32)


def prune_with(model: onnx.ModelProto, target, calib=None, **options):
    source = CalibrationSource(calib) if calib is not None else None
    return onnxprune.prune(model, target, Options(calib=source, round_to=1, **options))


def assert_close_fp16(got: np.ndarray, expected: np.ndarray) -> None:
    scale = float(np.abs(expected.astype(np.float32)).max())
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), atol=2e-2 * scale, rtol=2e-2)


def float_types(model: onnx.ModelProto) -> set[int]:
    return {i.data_type for i in model.graph.initializer if i.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16,
                                                                             TensorProto.BFLOAT16)}


# ---------------------------------------------------------------------------------------------- float16

@pytest.mark.parametrize("criterion", FP16_CRITERIA)
def test_float16_is_exact_on_every_criterion(criterion):
    """The plan a criterion chooses on a float16 model, applied to the model with those channels zeroed, changes
    no output (beyond float16 rounding) and keeps every weight float16."""
    model, calib = conv_gemm_net(TensorProto.FLOAT16), [{"x": images()}]
    pruned, report = prune_with(model, 0.5, calib, criterion=criterion)
    assert report.plan.keep and float_types(pruned) == {TensorProto.FLOAT16}
    assert report.criterion_fallbacks == (criterion == "bn")  # the second conv has no BatchNormalization
    prepared = prepare(model)
    zeroed = zero_removed_channels(prepared.model, prepared.analysis, report.plan)
    again, _ = prune_with(zeroed, Target.plan(report.plan))
    check_valid(again)
    assert io_signature(again) == io_signature(model)
    feeds = {"x": images(4, seed=1).astype(np.float16)}
    assert_close_fp16(run(again, feeds)[0], run(zeroed, feeds)[0])


@pytest.mark.parametrize("recover", ["bias", "lsq"])
def test_float16_recovery_keeps_a_zeroed_model_exact_and_float16(recover):
    """Recovery on a float16 model whose removed channels are zero: fitted in float64, written back as float16 (a
    bias created for the conv without one included), and the outputs stay those of the zeroed model."""
    model, calib = conv_gemm_net(TensorProto.FLOAT16), [{"x": images(600)}]  # more rows than the Gemm's inputs
    _, report = prune_with(model, 0.5, calib, criterion="activation")
    prepared = prepare(model)
    zeroed = zero_removed_channels(prepared.model, prepared.analysis, report.plan)
    pruned, recovered = prune_with(zeroed, Target.plan(report.plan), calib, recover=recover)
    check_valid(pruned)
    assert float_types(pruned) == {TensorProto.FLOAT16} and io_signature(pruned) == io_signature(model)
    feeds = {"x": images(4, seed=1).astype(np.float16)}
    assert_close_fp16(run(pruned, feeds)[0], run(zeroed, feeds)[0])


def test_float16_lsq_recovers_and_check_compares(tmp_path):
    model = conv_gemm_net(TensorProto.FLOAT16)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=images())
    result = invoke(tmp_path / "m.onnx", "--ratio", "0.5", "--round-to", "1", "--criterion", "regression",
                    "--recover", "lsq", "--calib", tmp_path / "calib.npz", "--data", tmp_path / "calib.npz",
                    "-o", tmp_path / "p.onnx", "--check")
    assert result.exit_code == 0, result.output
    assert "2 layers adjusted" in result.output and "agreement" in result.output
    checked = invoke("check", tmp_path / "m.onnx", tmp_path / "p.onnx", "--data", tmp_path / "calib.npz")
    assert checked.exit_code == 0 and "cosine" in checked.output, checked.output


# ---------------------------------------------------------------------------------------------- bfloat16

def test_bfloat16_io_model_prunes_with_data_and_lsq_and_checks(tmp_path):
    """numpy has no bfloat16: a bfloat16 input is fed as float32 and cast inside the session, a bfloat16 output or
    probe comes back as float32; the pruned model keeps its bfloat16 inputs and outputs."""
    model = bfloat16_io_net()
    pruned, report = prune_with(model, 0.5, [{"x": images()}], criterion="activation", recover="lsq")
    check_valid(pruned)
    assert io_signature(pruned) == io_signature(model) and report.recovered_layers >= 1 and report.plan.keep
    assert run(pruned, {"x": images(2)})[0].dtype == np.float32
    onnx.save(model, tmp_path / "m.onnx")
    onnx.save(pruned, tmp_path / "p.onnx")
    np.savez(tmp_path / "data.npz", x=images(6))
    for args in ([], ["--data", tmp_path / "data.npz"]):
        result = invoke("check", tmp_path / "m.onnx", tmp_path / "p.onnx", *args)
        assert result.exit_code == 0 and "cosine" in result.output, result.output


def test_bfloat16_weights_prune_without_data_and_stay_bfloat16():
    """A bfloat16 conv (opset 22) prunes by weight norms; onnxruntime's CPU provider runs no bfloat16 conv, so a
    data-driven criterion is a one-line error, not an internal one."""
    model = conv_bn_relu_chain()
    model.opset_import[0].version = 22
    model = in_type(model, TensorProto.BFLOAT16)
    pruned, report = prune_with(model, 0.5, criterion="l2")
    check_valid(pruned)
    assert report.plan.keep and float_types(pruned) == {TensorProto.BFLOAT16}
    with pytest.raises(onnxprune.errors.OnnxPruneError, match="onnxruntime cannot load the model"):
        prune_with(model, 0.5, [{"x": images()}], criterion="activation")


def test_bfloat16_conv_below_opset_22_is_refused_as_input(tmp_path):
    onnx.save(in_type(conv_bn_relu_chain(), TensorProto.BFLOAT16), tmp_path / "m.onnx")
    result = invoke(tmp_path / "m.onnx", "--ratio", "0.5", "-o", tmp_path / "p.onnx")
    one_line_error(result, 1, "model fails strict ONNX shape inference")
    assert "bfloat16" in result.stderr and files(tmp_path) == {"m.onnx"}


# ---------------------------------------------------------------------------------------------- scalar inputs

@pytest.mark.parametrize("gain", [np.linspace(0.5, 2, 24).astype(np.float32), np.float32(1.5)])
def test_scalar_input_takes_one_value_per_sample_or_one_for_all(tmp_path, gain):
    """A scalar input's calibration array holds one value per sample, (N,), or is 0-d: the same for every sample."""
    onnx.save(scalar_input_net(), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=images(), s=gain)
    result = invoke(tmp_path / "m.onnx", "--ratio", "0.5", "--round-to", "1", "--criterion", "activation",
                    "--recover", "lsq", "--calib", tmp_path / "calib.npz", "--data", tmp_path / "calib.npz",
                    "-o", tmp_path / "p.onnx")
    assert result.exit_code == 0, result.output
    assert "calibration 24 samples" in result.output and "(24 calib.npz samples)" in result.output
    for args in ([], ["--data", tmp_path / "calib.npz"]):
        checked = invoke("check", tmp_path / "m.onnx", tmp_path / "p.onnx", *args)
        assert checked.exit_code == 0 and "cosine" in checked.output, checked.output


def test_scalar_input_model_prunes_exactly():
    prune_exact(scalar_input_net(), 0.5)


def test_zero_d_array_for_a_batched_input_is_one_line(tmp_path):
    onnx.save(conv_bn_relu_chain(), tmp_path / "m.onnx")
    np.save(tmp_path / "calib.npy", np.float32(1.0))
    result = invoke(tmp_path / "m.onnx", "--ratio", "0.5", "--criterion", "activation", "--calib",
                    tmp_path / "calib.npy", "-o", tmp_path / "p.onnx")
    one_line_error(result, 1, "the array for input 'x' is 0-d; expected samples stacked on axis 0")
    np.savez(tmp_path / "data.npz", x=np.float32(1.0))
    checked = invoke("check", tmp_path / "m.onnx", tmp_path / "m.onnx", "--data", tmp_path / "data.npz")
    one_line_error(checked, 1, "is 0-d")


# ---------------------------------------------------------------------------------------------- bad models

def test_declared_output_shape_that_disagrees_is_said_of_the_input(tmp_path):
    model = conv_bn_relu_chain()
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 5  # the last conv computes 8 channels
    onnx.save(model, tmp_path / "m.onnx")
    for args in (["--ratio", "0", "-o", tmp_path / "p.onnx"], ["--ratio", "0.5", "-o", tmp_path / "p.onnx"]):
        result = invoke(tmp_path / "m.onnx", *args)
        one_line_error(result, 1, "declares output")
        assert "with shape (N, 5, 8, 8), but its nodes compute (N, 8, 8, 8)" in result.stderr.replace("?", "N")
    one_line_error(invoke("analyze", tmp_path / "m.onnx"), 1, "fails strict ONNX shape inference")
    assert files(tmp_path) == {"m.onnx"}


def test_weight_free_skeleton_is_named(tmp_path):
    assert SKELETON_KEY == METADATA_KEY
    onnx.save(strip_weights(conv_bn_relu_chain()), tmp_path / "m.onnx")
    for result in (invoke(tmp_path / "m.onnx", "--ratio", "0.5"), invoke("analyze", tmp_path / "m.onnx"),
                   invoke("check", tmp_path / "m.onnx", tmp_path / "m.onnx")):
        one_line_error(result, 1, "is a weight-free skeleton (metadata onnxprune.skeleton); materialise it first")


def last_conv_outputs(channels: int) -> onnx.ModelProto:
    b = GraphBuilder()
    return b.model(b.conv(b.input(["N", 3, 8, 8]), 3, channels))


def test_check_of_models_with_different_output_shapes_is_one_line(tmp_path):
    onnx.save(last_conv_outputs(8), tmp_path / "a.onnx")
    onnx.save(last_conv_outputs(4), tmp_path / "b.onnx")
    result = invoke("check", tmp_path / "a.onnx", tmp_path / "b.onnx")
    one_line_error(result, 1, "has shape (8, 8, 8) per sample in the first model and (4, 8, 8) in the second")


def test_check_with_zero_samples_is_one_line(tmp_path):
    onnx.save(conv_bn_relu_chain(), tmp_path / "m.onnx")
    np.savez(tmp_path / "data.npz", x=np.zeros((0, 3, 8, 8), np.float32))
    one_line_error(invoke("check", tmp_path / "m.onnx", tmp_path / "m.onnx", "--data", tmp_path / "data.npz"),
                   1, "holds no samples")
    result = invoke(tmp_path / "m.onnx", "--ratio", "0.5", "--data", tmp_path / "data.npz", "-o", tmp_path / "p.onnx")
    one_line_error(result, 1, "holds no samples")


# ---------------------------------------------------------------------------------------------- summaries

def qlinear_conv_net() -> onnx.ModelProto:
    b = GraphBuilder(seed=7)
    s, zp = b.const(np.float32(0.02)), b.const(np.uint8(128))
    w = b.const(b.rng.integers(-50, 50, (16, 3, 3, 3)).astype(np.int8))
    xq = b.op("QuantizeLinear", [b.input([1, 3, 8, 8]), s, zp])
    y = b.op("QLinearConv", [xq, s, zp, w, b.const(np.float32(0.01)), b.const(np.int8(0)), s, zp], pads=[1] * 4)
    return b.model(b.op("DequantizeLinear", [y, s, zp]))


def einsum_net() -> onnx.ModelProto:
    b = GraphBuilder(seed=8)
    h = b.op("Relu", [b.op("Einsum", [b.input([2, 16]), b.weight(16, 12)], equation="bi,ij->bj")])
    return b.model(b.op("Einsum", [h, b.weight(12, 4)], equation="bi,ij->bj"))


def summary(model: onnx.ModelProto, tmp_path, *args) -> str:
    onnx.save(model, tmp_path / "m.onnx")
    result = invoke(tmp_path / "m.onnx", "--ratio", "0.5", "--round-to", "1", "-o", tmp_path / "p.onnx", *args)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("build, barrier", [(qlinear_conv_net, "QLinearConv (QOperator format) is not pruned")])
def test_quantized_models_say_nothing_is_prunable_and_why(tmp_path, build, barrier):
    """QDQ models prune (tests/test_quantized.py); QOperator ones freeze, saying why."""
    out = summary(build(), tmp_path)
    assert "no prunable channel group" in out and f"barrier: {barrier}" in out
    assert "(unchanged)" in out and "->" not in out.split("file size")[0]  # neither params nor MACs changed
    assert "run time" not in out


def test_qlinear_conv_macs_are_not_blamed_on_run_time_sizes(tmp_path):
    out = summary(qlinear_conv_net(), tmp_path)
    assert "MACs        none counted: no Conv, ConvTranspose, Gemm or MatMul of known sizes" in out


def test_einsum_group_is_reported_when_it_is_pruned(tmp_path):
    """The Einsum's hidden channels are a prunable group (its rule couples them); the summary counts it rather
    than printing '0 channel groups' beside halved parameters. Nothing else is dropped: pruning is exact."""
    out = summary(einsum_net(), tmp_path)
    assert "3 channel groups: 1 pruned, 2 frozen" in out and "240 ->            120" in out  # like a MatMul net
    prune_exact(einsum_net(), 0.5)
