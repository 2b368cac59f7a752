"""Sparsity verification: zeros per layer, the N:M pattern along each layer's input-channel axis (packed weights read
back from their rebuild nodes), the MACs a 2:4 engine could skip, and `onnxprune check --pattern` / `analyze
--pattern` end to end with their exit codes."""
import json
import shutil

import numpy as np
import onnx
import pytest
from builders import DIGITS, GraphBuilder, files, invoke, one_line_error
from onnx import numpy_helper

from onnxprune.errors import UsageError
from onnxprune.graph import save_model
from onnxprune.sparsity.packed import pack_model
from onnxprune.sparsity.pattern import nm_pattern, pattern_holds, sparsity_report
from onnxprune.sparsity.spec import Pattern


def two_of_four(shape: tuple[int, ...], axis: int, seed: int = 0) -> np.ndarray:
    """Random weights with exactly 2 non-zeros in every 4 consecutive channels along `axis`, chosen by hand (not
    by the code under test): positions (0, 2), (1, 3), (0, 1), ... cycling over the blocks."""
    rng = np.random.default_rng(seed)
    moved = rng.standard_normal(shape[:axis] + shape[axis + 1:] + (shape[axis],)).astype(np.float32)
    blocks = moved.reshape(-1, 4)
    pairs = np.array([[0, 2], [1, 3], [0, 1], [2, 3], [0, 3], [1, 2]])[np.arange(len(blocks)) % 6]
    keep = np.zeros(blocks.shape, bool)
    np.put_along_axis(keep, pairs, True, axis=1)
    return np.moveaxis(np.where(keep, blocks, 0).reshape(moved.shape), -1, axis)


def one_layer(op: str, weight: np.ndarray, x_shape: list, **attrs) -> onnx.ModelProto:
    b = GraphBuilder()
    return b.model(b.op(op, [b.input(x_shape), b.const(weight, "w")], **attrs))


# Each layer kind with its weight's input-channel axis: Conv (O, I, k...), ConvTranspose (I, O, k...), Gemm with
# transB 1 (O, I) and 0 (I, O), MatMul (..., I, O).
LAYERS = [("Conv", (8, 16, 3, 3), 1, [1, 16, 5, 5], {}), ("ConvTranspose", (16, 8, 3, 3), 0, [1, 16, 5, 5], {}),
          ("Gemm", (8, 16), 1, [2, 16], {"transB": 1}), ("Gemm", (16, 8), 0, [2, 16], {}),
          ("MatMul", (16, 8), 0, [2, 3, 16], {})]


@pytest.mark.parametrize("op, shape, axis, x_shape, attrs", LAYERS)
def test_pattern_is_read_along_each_layers_input_channels(op, shape, axis, x_shape, attrs):
    """2:4 along the input channels holds; the same weight read along its output channels does not (8 outputs are
    two blocks of 4, each holding 4 non-zeros somewhere); a 2:4 engine skips half of a holding layer's MACs."""
    right = sparsity_report(one_layer(op, two_of_four(shape, axis), x_shape, **attrs), Pattern(2, 4)).layers[0]
    assert right.holds and right.zeros == 0.5 and right.skippable_macs == right.macs // 2 > 0
    other = 1 - axis if len(shape) == 2 or axis == 0 else 0
    wrong = sparsity_report(one_layer(op, two_of_four(shape, other), x_shape, **attrs), Pattern(2, 4)).layers[0]
    assert wrong.holds is False and wrong.violations > 0 and wrong.skippable_macs == 0


def test_pattern_counts_blocks_over_the_limit_and_lower_n_holds_a_sparser_pattern():
    weight = two_of_four((8, 16), 1)
    assert pattern_holds(weight, 1, Pattern(2, 4)) and pattern_holds(weight, 1, Pattern(4, 8))
    assert not pattern_holds(weight, 1, Pattern(1, 4))
    weight[0, :4] = 1.0  # one block of four non-zeros
    layer = sparsity_report(one_layer("Gemm", weight, [2, 16], transB=1), Pattern(2, 4)).layers[0]
    assert layer.holds is False and layer.violations == 1


def test_negative_zero_is_a_zero_and_nan_is_not():
    weight = two_of_four((4, 8), 1)
    weight[weight == 0] = -0.0
    assert pattern_holds(weight, 1, Pattern(2, 4))
    weight[0, np.flatnonzero(weight[0] == 0)[0]] = np.nan
    assert not pattern_holds(weight, 1, Pattern(2, 4))


def test_channels_not_a_multiple_of_m_are_not_applicable_and_do_not_fail():
    report = sparsity_report(one_layer("Conv", np.zeros((8, 3, 3, 3), np.float32), [1, 3, 5, 5]), Pattern(2, 4))
    assert report.layers[0].holds is None and report.layers[0].zeros == 1.0 and report.passed
    assert report.totals()["not_applicable"] == 1


def test_packed_weights_are_read_back_and_report_as_their_dense_model():
    b = GraphBuilder(seed=1)
    x = b.op("Relu", [b.op("Conv", [b.input([1, 16, 6, 6]), b.const(two_of_four((32, 16, 3, 3), 1), "w1")],
                           pads=[1, 1, 1, 1])])
    dense = b.model(b.op("Conv", [x, b.const(two_of_four((64, 32, 1, 1), 1, seed=2), "w2")]))
    packed, storage = pack_model(dense)
    assert {w.storage for w in storage.weights} == {"2:4"}
    assert not {i.name for i in packed.graph.initializer} & {"w1", "w2"}
    assert sparsity_report(packed, Pattern(2, 4)).to_dict() == sparsity_report(dense, Pattern(2, 4)).to_dict()


def test_quantized_weights_are_read_dequantized():
    """A QDQ weight: int8 data, DequantizeLinear, Conv; the dequantized values hold the pattern."""
    weight = two_of_four((8, 16, 1, 1), 1)
    b = GraphBuilder()
    w = b.op("DequantizeLinear", [b.const(np.round(weight * 20).astype(np.int8)), b.const(np.float32(0.05))])
    report = sparsity_report(b.model(b.op("Conv", [b.input([1, 16, 4, 4]), w])), Pattern(2, 4))
    assert report.passed and report.layers[0].holds and report.layers[0].zeros >= 0.5


def test_nm_pattern_refuses_what_is_not_n_m():
    assert nm_pattern("2:4") == Pattern(2, 4)
    for text in ("4:2", "0:4", "unstructured", "channel", "2-4", ""):
        with pytest.raises(UsageError, match="--pattern must be N:M"):
            nm_pattern(text)


# ---------------------------------------------------------------------------------------------- command line

@pytest.fixture
def models(tmp_path):
    """The digits model dense (no zeros), and two sparsified copies: 2:4 along the input channels, and 50% of
    every weight by magnitude (unstructured)."""
    shutil.copy(DIGITS, tmp_path / "dense.onnx")
    for name, zeroed in (("nm", _two_four_zeros), ("unstructured", _half_zeros)):
        model = onnx.load(DIGITS)
        for init in model.graph.initializer:
            weight = numpy_helper.to_array(init)
            if weight.ndim >= 2:
                init.CopyFrom(numpy_helper.from_array(zeroed(weight, init.name), init.name))
        save_model(model, tmp_path / f"{name}.onnx")
    return tmp_path


def _two_four_zeros(weight: np.ndarray, name: str) -> np.ndarray:
    axis = 1  # digits: Conv (O, I, k, k) and Gemm transB 1 (O, I)
    return two_of_four(weight.shape, axis) if weight.shape[axis] % 4 == 0 else weight


def _half_zeros(weight: np.ndarray, name: str) -> np.ndarray:
    return np.where(np.abs(weight) > np.median(np.abs(weight)), weight, 0).astype(weight.dtype)


def test_check_pattern_passes_on_a_2_4_model_and_writes_json(models):
    result = invoke("check", models / "nm.onnx", "--pattern", "2:4", "--json", models / "s.json")
    assert result.exit_code == 0, result.output
    assert "2:4 holds on 6 of 7 layers (1 not applicable" in result.output
    assert "could skip" in result.output and "onnxruntime CPU runs sparse weights at dense speed" in result.output
    report = json.loads((models / "s.json").read_text())
    assert report["passed"] and report["failures"] == [] and report["sparsity"]["pattern"] == "2:4"
    stem = report["sparsity"]["layers"][0]
    assert stem["holds"] is None and stem["skippable_macs"] == 0
    assert report["sparsity"]["totals"]["skippable_macs"] == sum(layer["macs"] // 2
                                                                 for layer in report["sparsity"]["layers"][1:])


@pytest.mark.parametrize("model", ["unstructured", "dense"])
def test_check_pattern_fails_with_exit_1_naming_the_layers(models, model):
    result = invoke("check", models / f"{model}.onnx", "--pattern", "2:4")
    one_line_error(result, 1, "pattern 2:4 does not hold on 6 of 7 layers (/conv2/conv2.0/Conv")
    assert "FAILS" in result.output


def test_check_pattern_of_two_models_adds_it_to_the_comparison(models):
    result = invoke("check", models / "dense.onnx", models / "nm.onnx", "--pattern", "1:4", "--json",
                    models / "c.json")
    one_line_error(result, 1, "pattern 1:4 does not hold")
    report = json.loads((models / "c.json").read_text())
    assert "outputs" in report and "sparsity" in report and not report["passed"]
    assert report["failures"] == [f for f in report["failures"] if "pattern 1:4" in f]


def test_check_usage_errors(models):
    before = files(models)
    one_line_error(invoke("check", models / "nm.onnx"), 2, "one model alone takes --pattern")
    one_line_error(invoke("check", models / "nm.onnx", "--pattern", "2:4", "--min-agreement", "0.9"), 2,
                   "check compares two models")
    one_line_error(invoke("check", models / "nm.onnx", "--pattern", "5:4"), 2, "--pattern must be N:M")
    assert files(models) == before


def test_analyze_pattern_reports_and_exits_0_where_it_fails(models):
    result = invoke("analyze", models / "unstructured.onnx", "--pattern", "2:4", "--json", models / "g.json")
    assert result.exit_code == 0, result.output
    assert "6 channel groups" in result.output and "50.0% zeros, 2:4 FAILS" in result.output
    report = json.loads((models / "g.json").read_text())
    assert report["groups"] and not report["sparsity"]["passed"]


def test_prune_packed_writes_a_smaller_model_that_checks_the_same(models):
    """`--sparse-storage packed` writes the dense-sparse model's outputs bit for bit from a file at most 0.56x
    its size, and `check --pattern` reads the packed weights back."""
    dense = invoke(models / "dense.onnx", "--granularity", "2:4", "-o", models / "d.onnx", "-q")
    packed = invoke(models / "dense.onnx", "--granularity", "2:4", "--sparse-storage", "packed",
                    "-o", models / "p.onnx", "--report", models / "r.json")
    assert dense.exit_code == 0 and packed.exit_code == 0, packed.output
    assert "sparse storage packed: 6 of 7 layer weights (6 as 2:4)" in packed.output
    report = json.loads((models / "r.json").read_text())
    assert report["sparse_storage"]["stored_bytes"] < report["sparse_storage"]["dense_bytes"]
    assert (models / "p.onnx").stat().st_size <= 0.56 * (models / "d.onnx").stat().st_size
    check = invoke("check", models / "d.onnx", models / "p.onnx", "--pattern", "2:4", "--json", models / "c.json")
    assert check.exit_code == 0, check.output
    assert json.loads((models / "c.json").read_text())["outputs"][0]["max_abs_diff"] == 0.0


def test_a_model_without_layers_passes_with_nothing_to_verify(tmp_path):
    b = GraphBuilder()
    save_model(b.model(b.op("Relu", [b.input([1, 4])])), tmp_path / "m.onnx")
    result = invoke("check", tmp_path / "m.onnx", "--pattern", "2:4")
    assert result.exit_code == 0, result.output
    assert "0 of 0 layer weights" in result.output


def test_a_weight_onnxruntime_cannot_compute_stays_computed_and_the_others_are_read():
    """A Gather whose constant indices are out of range passes the checker and shape inference (values are not
    looked at) but not onnxruntime: that layer's weight stays a computed tensor (no layer to report), the packed
    weight beside it is still read back."""
    b = GraphBuilder(seed=3)
    packed_weight = b.const(two_of_four((64, 32), 0), "w")
    odd = b.op("Gather", [b.const(np.ones((4, 8), np.float32)), b.const(np.full(32, 9, np.int64))])
    model = b.model(b.op("MatMul", [b.op("MatMul", [b.input([2, 64]), packed_weight]), odd]))
    packed, storage = pack_model(model)
    assert storage.weights[0].storage == "2:4"
    report = sparsity_report(packed, Pattern(2, 4))
    assert [layer.weight for layer in report.layers] == ["w"] and report.passed
