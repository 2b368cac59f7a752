"""Regression tests for what the property suite (tests/test_properties.py, tools/fuzz_graphs.py) and the loader
fuzzer (tools/fuzz_loader.py) found: each a focused case of one bug, fixed where it was."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune import CalibrationSource, Options, Target
from onnxprune.verify import check_valid, io_signature

from builders import DIGITS, GraphBuilder, files, invoke, one_line_error


def _tokens_mlp():
    b = GraphBuilder(seed=0)
    h = b.op("Relu", [b.matmul(b.input(["N", "S", 8]), 8, 16)])
    return b.model(b.matmul(h, 16, 4))


def test_sensitivity_allocation_with_calibration_batches_of_different_lengths():
    """sensitivity.py concatenated the outputs of all calibration batches along the batch axis, so batches of
    different sequence lengths (a valid list of feed dicts) crashed with a numpy ValueError."""
    model = _tokens_mlp()
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((2, length, 8)).astype(np.float32)} for length in (3, 5, 1)]
    options = Options(allocation="sensitivity", round_to=1, calib=CalibrationSource(feeds))
    pruned, report = onnxprune.prune(model, Target.ratio(0.5), options)
    check_valid(pruned)
    assert io_signature(pruned) == io_signature(model)
    assert report.pruned_groups


def _digits_with_bad_name(tmp_path):
    """The digits model with one byte of a node input's name made invalid UTF-8 (protobuf parses it)."""
    model = onnx.load(str(DIGITS))
    name = next(n.input[0] for n in model.graph.node if n.op_type == "Conv").encode()
    data = model.SerializeToString()
    bad = data.replace(b"\x0a" + bytes([len(name)]) + name, b"\x0a" + bytes([len(name)]) + b"\xff" + name[1:], 1)
    assert bad != data
    path = tmp_path / "bad.onnx"
    path.write_bytes(bad)
    return path


def test_a_name_that_is_not_utf8_is_a_clean_error(tmp_path):
    """protobuf hands a proto2 string that is not UTF-8 to Python as bytes: graph.normalize crashed with a
    UnicodeDecodeError writing it back. check_loadable now names the field."""
    path = _digits_with_bad_name(tmp_path)
    for args in (["analyze", path], [path, "--ratio", "0.5", "-o", tmp_path / "out.onnx"]):
        one_line_error(invoke(*args), 1, "is not UTF-8 text")
    assert files(tmp_path) == {"bad.onnx"}


@pytest.mark.parametrize("change", ["drop dim", "wrong dim", "truncate data"])
def test_a_tensor_whose_data_disagrees_with_its_shape_is_a_clean_error(tmp_path, change):
    """A weight whose dims do not match its data crashed the criteria with numpy's 'cannot reshape array' (and
    other readers in their own ways); check_loadable now compares the sizes, without converting any weight."""
    model = onnx.load(str(DIGITS))
    weight = next(i for i in model.graph.initializer if len(i.dims) == 4)
    if change == "drop dim":
        del weight.dims[-1]
    elif change == "wrong dim":
        weight.dims[0] += 1
    else:
        weight.raw_data = weight.raw_data[:-4]
    path = tmp_path / "bad.onnx"
    onnx.save(model, str(path))
    for args in (["analyze", path], [path, "--ratio", "0.5", "-o", tmp_path / "out.onnx"]):
        one_line_error(invoke(*args), 1, f"tensor '{weight.name}' holds")
    with pytest.raises(onnxprune.OnnxPruneError, match="where its shape"):
        onnxprune.prune(model, 0.5)


@pytest.mark.parametrize("group", [0, -2, 3])
def test_a_conv_group_that_breaks_the_spec_is_frozen_not_a_crash(tmp_path, group):
    """Shape inference lets a Conv with group 0 (or one not dividing its channels) through; the conv rule divided
    by it (ZeroDivisionError). It is now a barrier with the reason, and the rest of the model is pruned."""
    model = onnx.load(str(DIGITS))
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and "res" in n.name)
    next(a for a in conv.attribute if a.name == "group").i = group
    path = tmp_path / "odd.onnx"
    onnx.save(model, str(path))
    result = invoke("analyze", path)
    assert result.exit_code == 0, result.output
    assert f"group {group} does not divide" in result.output
    pruned, report = onnxprune.prune(model, 0.5)
    assert report.pruned_groups and any(f"group {group}" in b for b in report.barriers)


def test_an_unknown_element_type_on_a_declared_output_is_one_line(tmp_path):
    """A declared output of an element type ONNX does not know (a corrupt or newer file) crashed the message that
    names the declared and the computed types (TensorProto.DataType.Name raised ValueError)."""
    model = onnx.load(str(DIGITS))
    model.graph.output[0].type.tensor_type.elem_type = 99
    onnx.save(model, tmp_path / "odd.onnx")
    result = invoke(tmp_path / "odd.onnx", "--ratio", "0.5")
    one_line_error(result, 1, "declares output 'logits' as element type 99")
    assert files(tmp_path) == {"odd.onnx"}
