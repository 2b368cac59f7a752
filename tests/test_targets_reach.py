"""Issue 10 (part E): inputs onnxruntime accepts are accepted, small groups prune at the ratio asked, targets that
are not met say so, unreachable targets do not wreck what is reachable, and analyze reports the prunable share."""
import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import GraphBuilder, invoke
from exactness import prune_exact
from onnx import TensorProto

import onnxprune
from onnxprune import CalibrationSource, Options, Target
from onnxprune.allocate import TARGET_TOLERANCE, keep_count
from onnxprune.calibrate import check_feed, input_specs
from onnxprune.errors import OnnxPruneError
from onnxprune.groups import Group, Member
from onnxprune.report import PruneReport, target_outcome
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


# ------------------------------------------------------------------------------------------ alignment per group

def small_net():
    """A small network, 10, 16 and 32 channels wide: with a fixed block of 16, 10 and 16 would stay whole."""
    b = GraphBuilder()
    x = b.conv_bn_relu(b.input(["N", 3, 8, 8]), 3, 10)
    x = b.conv_bn_relu(x, 10, 16)
    x = b.conv_bn_relu(x, 16, 32)
    return b.model(b.conv(x, 32, 4))


def test_small_groups_take_the_widest_block_that_reaches_the_ratio():
    _, report = onnxprune.prune(small_net(), 0.5)  # default --round-to 16
    kept = {g["channels"]: g["kept"] for g in report.groups if g["prunable"]}
    assert kept == {10: 4, 16: 8, 32: 16}
    assert report.macs_after / report.macs_before < 0.3 and report.target["met"]
    prune_exact(small_net(), 0.5, round_to=16)


@pytest.mark.parametrize("size,ratio,expected", [
    (64, 0.5, 32), (48, 0.5, 32), (24, 0.5, 16), (96, 0.3, 64), (256, 0.1, 224),  # 16 reaches: unchanged
    (16, 0.5, 8), (10, 0.5, 4), (20, 0.5, 8), (64, 0.1, 56), (12, 0.1, 11),       # it does not: a smaller block
    (100, 0.0, 100),                                                              # nothing asked, nothing cut
])
def test_alignment_per_group(size, ratio, expected):
    assert keep_count(Group(0, size, [Member(("w", 0), 0, 1, "w_out", True)]), ratio, 16) == expected


def test_a_ratio_the_floor_stops_is_reported_not_met():
    _, report = onnxprune.prune(small_net(), 0.9)
    assert report.target["kind"] == "ratio" and not report.target["met"]
    assert report.target["reached"] < 0.9 - TARGET_TOLERANCE and "block" in report.target["reason"]
    assert any(line.startswith("target      NOT MET") for line in report.summary_lines())


# ------------------------------------------------------------------------------------------ unreachable targets

def mostly_frozen():
    """A 3 -> 1024 conv straight from the input to an output (frozen: 63% of the MACs) beside a prunable
    3 -> 256 -> 4 branch: with the 256 group at its floor of 16, 65% of the MACs remain."""
    b = GraphBuilder()
    x = b.input(["N", 3, 8, 8])
    frozen = b.conv(x, 3, 1024)
    branch = b.conv(b.op("Relu", [b.conv(x, 3, 256)]), 256, 4)
    return b.model(frozen, branch)


def branch_kept(report) -> int:
    return next(g["kept"] for g in report.groups if g["prunable"] and g["channels"] == 256)


def test_an_unreachable_mac_target_is_said_up_front_and_caps_every_cut(caplog):
    with caplog.at_level(logging.WARNING, logger="onnxprune"):
        _, report = onnxprune.prune(mostly_frozen(), Target.macs(0.5))
    first = caplog.records[0].getMessage()
    assert first.startswith("target-macs 0.5 cannot be met") and "reachable minimum" in first
    assert "target not met" in caplog.records[-1].getMessage()
    assert branch_kept(report) == 128  # as --ratio 0.5 would cut it, not the floor of 16
    assert report.target["met"] is False and report.target["reached"] > 0.5 + TARGET_TOLERANCE
    assert report.mac_reach.minimum == pytest.approx(report.to_dict()["mac_reach"]["reachable_minimum"])
    assert 0.6 < report.mac_reach.minimum < 0.7 and 0.35 < report.mac_reach.share < 0.4


def test_a_reachable_mac_target_is_met_without_cap(caplog):
    with caplog.at_level(logging.WARNING, logger="onnxprune"):
        _, report = onnxprune.prune(mostly_frozen(), Target.macs(0.7))
    assert report.target["met"] and report.target["reached"] <= 0.7 + TARGET_TOLERANCE
    assert branch_kept(report) < 128 and not caplog.records


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


# ------------------------------------------------------------------------------------------ the command line

def test_cli_says_when_a_target_is_not_met_and_strict_target_exits_3(tmp_path, caplog):
    path = tmp_path / "m.onnx"
    onnx.save(mostly_frozen(), path)
    result = invoke(path, "--target-macs", 0.5, "--report", tmp_path / "r.json")
    assert result.exit_code == 0 and "target not met" in caplog.text and "NOT MET" in result.stdout
    assert json.loads((tmp_path / "r.json").read_text())["target"]["met"] is False
    out = tmp_path / "strict.onnx"
    strict = invoke(path, "--target-macs", 0.5, "--strict-target", "-o", out, "--report", tmp_path / "s.json")
    assert strict.exit_code == 3 and not out.exists()
    assert [line for line in strict.stderr.splitlines() if line.startswith("onnxprune: error: target not met")]
    assert json.loads((tmp_path / "s.json").read_text())["target"]["reason"].startswith("37% of the MACs")
    met = invoke(path, "--target-macs", 0.7, "--strict-target", "-o", out)
    assert met.exit_code == 0 and out.exists() and "NOT MET" not in met.stdout


def test_analyze_reports_the_share_of_macs_in_prunable_groups(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(mostly_frozen(), path)
    result = invoke("analyze", path, "--json", tmp_path / "g.json")
    assert result.exit_code == 0 and "prunable MACs: 37% (of" in result.stdout
    reach = json.loads((tmp_path / "g.json").read_text())["mac_reach"]
    assert reach["prunable_share"] == pytest.approx(onnxprune.analyze(mostly_frozen()).mac_reach.share)


def test_an_iterative_schedule_reports_the_whole_run_against_the_target():
    options = Options(schedule="iterative", steps=2)
    _, report = onnxprune.prune(mostly_frozen(), Target.macs(0.5), options)
    assert report.target["asked"] == 0.5 and report.target["met"] is False
    assert report.target["reached"] == pytest.approx(report.macs_after / report.macs_before)
    assert report.mac_reach.total == report.macs_before
    _, stepped = onnxprune.prune(small_net(), 0.5, Options(schedule="iterative", steps=3))
    _, one_shot = onnxprune.prune(small_net(), 0.5)
    assert [g["kept"] for g in stepped.groups] == [g["kept"] for g in one_shot.groups]  # aligned as one-shot
    assert stepped.target == one_shot.target and one_shot.target["met"]


def report_with(**fields) -> PruneReport:
    base = dict(ratio=None, criterion="l1", round_to=16, params_before=10, params_after=5, macs_before=100,
                macs_after=60, weight_bytes_before=40, weight_bytes_after=20)
    return PruneReport(**{**base, **fields})


@pytest.mark.parametrize("fields,kind,asked,met,reason", [
    ({"target_latency": {"measured_kept": 0.8, "predicted_kept": 0.7}}, "latency", 0.7, False, "table predicted 70.0%"),
    ({"target_latency": {"measured_kept": 0.71, "predicted_kept": 0.7}}, "latency", 0.7, True, None),
    ({"macs_before": 0, "macs_after": 0}, "macs", 0.5, False, "no MACs counted"),
    ({}, "macs", 0.59, True, None),
    ({"groups": []}, "ratio", 0.5, False, "no prunable channel group"),
    ({"groups": []}, "ratio", 0.0, True, None),
    ({}, "plan", 0.5, None, None),
])
def test_target_outcome_of_each_kind(fields, kind, asked, met, reason):
    outcome = target_outcome(report_with(**fields), kind, asked)
    if met is None:
        assert outcome is None
        return
    assert outcome["met"] is met and (outcome["reason"] is None if reason is None else reason in outcome["reason"])
