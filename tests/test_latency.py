"""The per-layer latency table behind --target-latency. What it decides is tested with a deterministic stand-in for
the measurement (timings themselves belong to the benchmarks); the one-layer models it builds are run for real."""
import json
import logging
import math

import numpy as np
import onnx
import pytest

import builders
import onnxprune
from onnxprune import latency
from onnxprune.allocate import counts_for_target, uniform_counts
from onnxprune.api import prepare


def chain(width: int = 40) -> onnx.ModelProto:
    b = builders.GraphBuilder()
    x = b.op("Relu", [b.conv(b.input([1, 3, 8, 8]), 3, width, k=1)])
    x = b.op("Relu", [b.conv(x, width, width)])
    return b.model(b.conv(x, width, 8, k=1))


def fake_ms(aligned_bonus: bool):
    """Milliseconds proportional to MACs; with `aligned_bonus`, four times as many when a channel count is not a
    multiple of 8 (as onnxruntime's blocked kernels behave), counting only the two pruned widths here."""
    def measure(self, node, layer, shapes):
        macs = math.prod(shapes[-1]) * math.prod(shapes[1][1:])
        unaligned = any(s[1] % 8 for s in (shapes[0], shapes[-1]) if s[1] not in (3, 8))
        return macs * 1e-6 * (4 if aligned_bonus and unaligned else 1)
    return measure


@pytest.mark.parametrize("bonus, expected", [(True, 32), (False, 30)])
def test_prefer_widens_a_group_only_where_the_aligned_width_is_faster(monkeypatch, bonus, expected):
    monkeypatch.setattr(latency.LatencyTable, "_measure", fake_ms(bonus))
    prepared = prepare(chain())
    table = latency.LatencyTable(prepared.model, prepared.analysis, round_to=1)
    counts = {g.id: 30 for g in prepared.analysis.prunable}
    assert set(table.prefer(counts).values()) == {expected}


def test_latency_budget_is_met_on_the_table(monkeypatch):
    monkeypatch.setattr(latency.LatencyTable, "_measure", fake_ms(True))
    prepared = prepare(chain(64))
    table = latency.LatencyTable(prepared.model, prepared.analysis, round_to=1)
    scores = {g.id: np.ones(g.size) for g in prepared.analysis.prunable}
    for goal in (0.3, 0.5, 0.8):
        counts = counts_for_target(prepared.analysis, scores, "uniform", 1, None, (table, goal))
        assert table.cost(counts) <= goal * table.cost({})
        assert all(n % 8 == 0 for n in counts.values())  # unaligned widths cost 4x here: never chosen
        assert table.cost(counts) > 0.7 * goal * table.cost({})  # and the budget is used, not wasted


def test_unaligned_widths_predicted_slower_than_aligned(monkeypatch):
    monkeypatch.setattr(latency.LatencyTable, "_measure", fake_ms(True))
    prepared = prepare(chain(64))
    table = latency.LatencyTable(prepared.model, prepared.analysis, round_to=1)
    aligned = uniform_counts(prepared.analysis, 0.5, 16)
    assert table.cost({g: n - 1 for g, n in aligned.items()}) > table.cost(aligned)


def mixed_layers() -> onnx.ModelProto:
    """A grouped conv, a depthwise conv, a transposed conv, a MatMul on 3-D activations and a Gemm."""
    b = builders.GraphBuilder()
    x = b.op("Relu", [b.conv(b.input([1, 3, 8, 8]), 3, 32, k=1)])
    x = b.op("Relu", [b.conv(x, 32, 32, group=8)])
    x = b.op("Relu", [b.conv(x, 32, 32, group=32)])
    x = b.op("ConvTranspose", [x, b.weight(32, 16, 2, 2)], strides=[2, 2])
    x = b.op("Reshape", [x, b.const(np.array([1, 16, 256], np.int64))])
    x = b.op("Transpose", [x], perm=[0, 2, 1])
    x = b.op("Relu", [b.matmul(x, 16, 24)])
    x = b.op("ReduceMean", [x], axes=[1], keepdims=0)
    return b.model(b.gemm(x, 24, 10))


def test_one_layer_models_of_every_kind_run_at_pruned_widths():
    prepared = prepare(mixed_layers())
    table = latency.LatencyTable(prepared.model, prepared.analysis, round_to=1)
    assert {layer.node.op_type for layer in table.layers} == {"Conv", "ConvTranspose", "MatMul", "Gemm"}
    counts = uniform_counts(prepared.analysis, 0.5, 1)
    assert any(n < g.size for g in prepared.analysis.prunable for n in [counts[g.id]])
    assert table.cost(counts) > 0 and all(ms > 0 for ms in table.table.values())


def test_repeated_layers_are_measured_once(monkeypatch):
    calls = []
    monkeypatch.setattr(latency.LatencyTable, "_measure", lambda self, node, layer, shapes: calls.append(1) or 1.0)
    b = builders.GraphBuilder()
    x = b.conv(b.input([1, 3, 8, 8]), 3, 16)
    for _ in range(3):
        x = b.op("Relu", [b.conv(x, 16, 16)])
    prepared = prepare(b.model(b.conv(x, 16, 4)))
    table = latency.LatencyTable(prepared.model, prepared.analysis)
    assert len(table.layers) == 5 and len(calls) == 3  # 3->16, three identical 16->16, 16->4


def test_target_latency_reports_and_reuses_its_table(tmp_path):
    path = tmp_path / "table.json"
    model = builders.residual_block()
    pruned, first = onnxprune.prune(model, None, target_latency=0.6, round_to=1, latency_table=path)
    onnx.checker.check_model(pruned, full_check=True)
    assert set(first.target_latency) == {"target", "threads", "predicted_kept", "measured_kept", "layers",
                                         "one_layer_models", "table_entries"}
    assert first.target_latency["one_layer_models"] > 0 and "latency" in "\n".join(first.summary_lines())
    assert len(json.loads(path.read_text())["entries"]) == first.target_latency["table_entries"]
    _, second = onnxprune.prune(model, None, target_latency=0.6, round_to=1, latency_table=path)
    assert second.target_latency["one_layer_models"] == 0


def test_a_table_from_elsewhere_is_not_used(tmp_path, caplog):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"machine": "another machine", "entries": {"abc": 1.0}}))
    with caplog.at_level(logging.WARNING, logger="onnxprune"):
        _, report = onnxprune.prune(builders.residual_block(), None, target_latency=0.6, latency_table=path)
    assert "another machine" in caplog.text and report.target_latency["one_layer_models"] > 0
    path.write_text("{not json")
    with pytest.raises(onnxprune.UsageError, match="cannot read latency table"):
        onnxprune.prune(builders.residual_block(), None, target_latency=0.6, latency_table=path)


def test_budget_left_by_a_lockstep_jump_is_filled_group_by_group():
    """Equal groups switch width together under a uniform ratio; what the jump leaves of the budget is used."""
    from onnxprune.allocate import _fill

    class Sum:
        def cost(self, counts):
            return sum(counts.values())

    filled = _fill(Sum(), 60, {0: 16, 1: 16, 2: 16}, {0: 24, 1: 24, 2: 24})
    assert sorted(filled.values()) == [16, 16, 24]


def test_iterative_schedule_reaches_a_latency_target_in_steps():
    pruned, report = onnxprune.prune(builders.residual_block(), None, target_latency=0.6, round_to=1,
                                     schedule="iterative", steps=2)
    onnx.checker.check_model(pruned, full_check=True)
    assert report.target_latency["target"] == 0.6 and report.macs_after < report.macs_before
    assert 0 < report.target_latency["measured_kept"] < 1.5  # a product of the two steps' measured fractions
