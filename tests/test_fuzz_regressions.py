"""Regression tests for what the property suite (tests/test_properties.py, tools/fuzz_graphs.py) and the loader
fuzzer (tools/fuzz_loader.py) found: each a focused case of one bug, fixed where it was."""
from __future__ import annotations

import numpy as np

import onnxprune
from onnxprune import CalibrationSource, Options, Target
from onnxprune.verify import check_valid, io_signature

from builders import GraphBuilder


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
