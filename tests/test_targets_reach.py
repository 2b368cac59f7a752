"""Issue 10 (part E): inputs onnxruntime accepts are accepted, small groups prune at the ratio asked, targets that
are not met say so, unreachable targets do not wreck what is reachable, and analyze reports the prunable share."""
import numpy as np
import onnxruntime as ort
import pytest
from builders import GraphBuilder
from exactness import prune_exact
from onnx import TensorProto

import onnxprune
from onnxprune import CalibrationSource, Options, Target
from onnxprune.calibrate import check_feed, input_specs
from onnxprune.errors import OnnxPruneError
from onnxprune.rules.compare import ONE_HOT


def paddle_style(height=None, width=None):
    """An input declared as Paddle exports it: batch -1, height and width both '?' (or the sizes given)."""
    b = GraphBuilder()
    x = b.conv_bn_relu(b.input([-1, 3, height or "?", width or "?"]), 3, 32)
    return b.model(b.conv(x, 32, 8))


def test_repeated_question_mark_dims_take_what_onnxruntime_runs():
    model = paddle_style()
    data = np.random.default_rng(0).standard_normal((2, 3, 48, 192)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(None, {"x": data})[0].shape == (2, 8, 48, 192)  # onnxruntime enforces neither -1 nor '?'
    assert check_feed({"x": data}, input_specs(model))["x"].shape == data.shape
    _, report = onnxprune.prune(model, 0.5, Options(criterion="activation", calib=CalibrationSource([{"x": data}])))
    assert report.macs_before == 3 * 9 * 32 * 48 * 192 + 32 * 9 * 8 * 48 * 192  # one sample: batch -1 is a batch


def test_static_dims_and_rank_are_still_enforced_as_onnxruntime_does():
    specs = input_specs(paddle_style(48, 192))
    with pytest.raises(OnnxPruneError, match=r"expected \(N, 3, 48, 192\)"):
        check_feed({"x": np.zeros((1, 3, 48, 190), np.float32)}, specs)
    with pytest.raises(OnnxPruneError, match="has shape"):
        check_feed({"x": np.zeros((1, 3, 48), np.float32)}, specs)
    assert check_feed({"x": np.zeros((5, 3, 48, 192), np.float32)}, specs)["x"].shape[0] == 5


# ------------------------------------------------------------------------------------------ one-hot of the input

def byte_embedding():
    """Bytes (N, S) -> one-hot over 257 values (Equal against a constant range) -> Cast -> MatMul: an embedding
    whose 257 rows are data, then a learned 32-wide MLP."""
    b = GraphBuilder()
    x = b.input(["N", 6], elem_type=TensorProto.INT64)
    spread = b.op("Unsqueeze", [x, b.const(np.array([2], np.int64))])
    hot = b.op("Equal", [spread, b.const(np.arange(257, dtype=np.int64))])
    h = b.op("Relu", [b.matmul(b.op("Cast", [hot], to=TensorProto.FLOAT), 257, 32)])
    return b.model(b.matmul(h, 32, 8))


def test_a_one_hot_of_the_input_is_data_not_a_learned_channel():
    analysis = onnxprune.analyze(byte_embedding())
    embedding = next(g for g in analysis.groups if g.size == 257)
    assert embedding.frozen[0].endswith(ONE_HOT) and not embedding.prunable
    assert any(g.prunable and g.size == 32 for g in analysis.groups)
    prune_exact(byte_embedding(), 0.5)


def test_a_comparison_of_activations_still_couples_the_channels():
    b = GraphBuilder()
    h = b.conv(b.input(["N", 3, 8, 8]), 3, 16)
    leaky = b.op("Where", [b.op("Greater", [h, b.const(np.float32(0))]), h, b.op("Mul", [h, b.const(np.float32(0.1))])])
    model = b.model(b.conv(leaky, 16, 4))
    assert [g.size for g in onnxprune.analyze(model).groups if g.prunable] == [16]
    prune_exact(model, 0.5)
