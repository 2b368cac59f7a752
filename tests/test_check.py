"""`onnxprune check` and `prune --check`: the accuracy gate's numbers, thresholds, exit codes and JSON."""
import json
import shutil

import numpy as np
import onnx
import pytest
from builders import DIGITS, DIGITS_DATA, GraphBuilder, files, invoke, one_line_error, padded_tokens, token_mlp

import onnxprune
from onnxprune import CalibrationSource, Options
from onnxprune.check import check
from onnxprune.verify import run

REPORT_KEYS = {"samples", "data", "outputs", "accuracy_before", "accuracy_after", "latency", "model", "thresholds",
               "failures", "passed"}


@pytest.fixture
def pair(tmp_path):
    shutil.copy(DIGITS, tmp_path / "m.onnx")
    calib = CalibrationSource(DIGITS.with_suffix("").with_suffix(".calib.npz"))
    pruned, _ = onnxprune.prune(onnx.load(DIGITS), 0.5, Options(recover="lsq", calib=calib))
    onnx.save(pruned, tmp_path / "p.onnx")
    return tmp_path


def test_check_passes_within_thresholds_and_writes_json(pair):
    result = invoke("check", pair / "m.onnx", pair / "p.onnx", "--data", DIGITS_DATA, "--max-drop", "0.02",
                    "--min-agreement", "0.95", "--latency", "--json", pair / "c.json")
    assert result.exit_code == 0, result.output
    assert "top-1 accuracy  0.9963 ->" in result.output and "latency" in result.output
    report = json.loads((pair / "c.json").read_text())
    assert set(report) == REPORT_KEYS and report["passed"]
    assert set(report["outputs"][0]) == {"name", "agreement", "cosine", "max_abs_diff", "mean_abs_diff"}
    assert set(report["latency"]) == {"threads", "runs", "before_ms", "after_ms", "speedup"}
    assert report["model"]["macs"][1] < report["model"]["macs"][0]


def test_check_fails_naming_the_threshold(pair):
    one_line_error(invoke("check", pair / "m.onnx", pair / "p.onnx", "--data", DIGITS_DATA, "--min-agreement", "1"),
                   1, "--min-agreement 1")
    plain, _ = onnxprune.prune(onnx.load(DIGITS), 0.5)
    onnx.save(plain, pair / "bad.onnx")
    one_line_error(invoke("check", pair / "m.onnx", pair / "bad.onnx", "--data", DIGITS_DATA, "--max-drop", "0.05"),
                   1, "--max-drop 0.05")


def test_check_usage_errors(pair):
    one_line_error(invoke("check", pair / "m.onnx", pair / "p.onnx", "--max-drop", "0.1"), 2, "needs labels")
    one_line_error(invoke("check", pair / "m.onnx", pair / "p.onnx", "--min-agreement", "2"), 2, "min-agreement")
    one_line_error(invoke("check", pair / "m.onnx"), 2, "PRUNED")


def test_prune_check_failure_writes_nothing(pair):
    before = files(pair)
    one_line_error(invoke(pair / "m.onnx", "--ratio", "0.5", "--check", "--data", DIGITS_DATA, "--max-drop", "0.01",
                          "-o", pair / "out.onnx", "--report", pair / "r.json"), 1, "no model written")
    assert files(pair) == before | {"r.json"}
    assert json.loads((pair / "r.json").read_text())["check"]["passed"] is False


def test_prune_check_shares_the_schema(pair):
    result = invoke(pair / "m.onnx", "--ratio", "0.25", "--check", "-o", pair / "out.onnx", "--report", pair / "r.json")
    assert result.exit_code == 0, result.output
    assert set(json.loads((pair / "r.json").read_text())["check"]) == REPORT_KEYS


def test_multi_input_multi_output_integer_inputs_and_dynamic_batch():
    b = GraphBuilder()
    x = b.input(["N", 3, 8, 8])
    ids = b.input(["N", 4], name="ids", elem_type=onnx.TensorProto.INT64)
    table = b.const(np.random.default_rng(0).standard_normal((10, 16)).astype(np.float32))
    embedded = b.op("ReduceMean", [b.op("Gather", [table, ids], axis=0)], axes=[1], keepdims=0)
    features = b.op("Flatten", [b.op("GlobalAveragePool", [b.conv_bn_relu(x, 3, 16)])])
    joint = b.op("Relu", [b.op("Add", [features, embedded])])
    model = b.model(b.gemm(joint, 16, 5), b.op("ArgMax", [joint], axis=1, keepdims=0))
    pruned, _ = onnxprune.prune(model, 0.5, Options(round_to=1))
    feeds = {"x": np.random.default_rng(1).standard_normal((6, 3, 8, 8)).astype(np.float32),
             "ids": np.random.default_rng(2).integers(0, 10, (6, 4))}
    report = check(model, pruned, feeds)
    assert [o.name for o in report.outputs] == [o.name for o in model.graph.output]
    before, after = run(model, feeds), run(pruned, feeds)
    assert report.samples == 6
    assert report.outputs[0].agreement == np.mean(before[0].argmax(1) == after[0].argmax(1))  # top-1 over axis 1
    assert report.outputs[1].agreement == np.mean(before[1] == after[1])  # integer output: equality
    same = check(model, model, feeds).outputs
    assert same[0].cosine == pytest.approx(1.0) and same[0].agreement == same[1].agreement == 1.0


def test_macs_of_a_model_with_a_run_time_length_are_counted_at_the_data():
    model = token_mlp()
    pruned, _ = onnxprune.prune(model, 0.5, Options(round_to=1))
    report = check(model, pruned, padded_tokens())
    assert report.model["macs"] == [6 * (8 * 16 + 16 * 4), 6 * (8 * 8 + 8 * 4)]  # one sample of 6 tokens


def test_latency_with_several_threads_runs_in_blocks():
    from onnxprune.check import measure_latency
    from onnxprune.verify import random_feeds
    model = onnx.load(DIGITS)
    timing = measure_latency(model, model, random_feeds(model), threads=2, runs=4)
    assert timing["threads"] == 2 and timing["runs"] == 6  # 3 blocks of 2 runs per model
    assert timing["before_ms"]["median"] > 0 and timing["after_ms"]["median"] > 0
