"""Issue 10 (part E): inputs onnxruntime accepts are accepted, small groups prune at the ratio asked, targets that
are not met say so, unreachable targets do not wreck what is reachable, and analyze reports the prunable share."""
import numpy as np
import onnxruntime as ort
import pytest
from builders import GraphBuilder

import onnxprune
from onnxprune import CalibrationSource, Options, Target
from onnxprune.calibrate import check_feed, input_specs
from onnxprune.errors import OnnxPruneError


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
