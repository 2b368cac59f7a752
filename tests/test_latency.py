"""Latency as a budget (--target-latency): the timing loop, the cache, the per-layer table and the whole-model
correction. What they decide is tested on a deterministic stand-in for onnxruntime (`FakeTimer`: a model's time is a
function of its graph), so the promises are checked exactly; the one-layer models are also run for real once, and one
end-to-end run goes through `onnxprune.prune` with onnxruntime."""
import copy
import json
import logging

import numpy as np
import onnx
import pytest

import builders
import onnxprune
from onnxprune import latency
from onnxprune.allocate import MacModel, Plan, _fill, counts_for_target, uniform_counts
from onnxprune.graph import infer_shapes
from onnxprune.latency import LatencyCache, LatencyModel, LayerTimer, counts_for_latency
from onnxprune.latency.correction import CORRECTIONS, fit, next_goal
from onnxprune.latency.table import TIE
from onnxprune.options import Options, Target
from onnxprune.pipeline import prepare
from onnxprune.surgery import apply_plan
from onnxprune.timing import OrtTimer, measure_latency, median_ms
from onnxprune.verify import layer_macs

LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class FakeTimer:
    """A machine where a model's milliseconds are the sum over its nodes: a layer's MACs x 1e-6 (x4 with
    `aligned_bonus` for a Conv with a channel count not a multiple of 8, as onnxruntime's blocked kernels behave; an
    image's 3 input channels left out), `other_ms` per other node. Additive, as the table assumes, except that the
    other nodes do not get cheaper when channels go."""

    threads = 1

    def __init__(self, aligned_bonus: bool = False, other_ms: float = 0.0):
        self.aligned_bonus, self.other_ms = aligned_bonus, other_ms
        self.runs: list[onnx.ModelProto] = []  # every model timed alone, in order

    def model_ms(self, model: onnx.ModelProto, feed: dict) -> float:
        self.runs.append(model)
        return self.ms(model)

    def kept(self, original: onnx.ModelProto, pruned: onnx.ModelProto, feed: dict, runs: int) -> float:
        return self.ms(pruned) / self.ms(original)

    def ms(self, model: onnx.ModelProto) -> float:
        named = copy.deepcopy(model)
        for k, node in enumerate(named.graph.node):
            node.name = f"n{k}"
        shapes, macs = infer_shapes(named), layer_macs(named)
        return sum(macs[n.name] * 1e-6 * self._slowdown(n, shapes) if n.op_type in LAYERS else self.other_ms
                   for n in named.graph.node)

    def _slowdown(self, node: onnx.NodeProto, shapes: dict) -> float:
        channels = [shapes[t][1] for t in (node.input[0], node.output[0])]
        unaligned = node.op_type == "Conv" and any(c % 8 and c != 3 for c in channels)
        return 4.0 if self.aligned_bonus and unaligned else 1.0


def chain(width: int = 40) -> onnx.ModelProto:
    b = builders.GraphBuilder()
    x = b.op("Relu", [b.conv(b.input([1, 3, 8, 8]), 3, width, k=1)])
    x = b.op("Relu", [b.conv(x, width, width)])
    return b.model(b.conv(x, width, 8, k=1))


def table_for(model: onnx.ModelProto, timer=None, cache: LatencyCache | None = None):
    prepared = prepare(model)
    layer_timer = LayerTimer(timer or FakeTimer(), cache or LatencyCache(), prepared.model)
    return prepared, LatencyModel(prepared.model, prepared.analysis, layer_timer, round_to=1)


def pruned_to(prepared, counts: dict[int, int]) -> onnx.ModelProto:
    keep = {g: np.arange(n) for g, n in counts.items() if n < prepared.analysis.groups[g].size}
    return apply_plan(copy.deepcopy(prepared.model), prepared.analysis, Plan(keep))


def uniform_search(prepared):
    scores = {g.id: np.ones(g.size) for g in prepared.analysis.prunable}
    return lambda budget: counts_for_target(prepared.analysis, scores, "uniform", 1, None, budget)


def run_target(model, target, timer, table_path=None):
    prepared = prepare(model)
    counts, outcome = counts_for_latency(prepared.model, prepared.analysis, uniform_search(prepared), target,
                                         round_to=1, threads=1, table_path=table_path, progress=False, feed=None,
                                         shapes=None, timer=timer)
    return prepared, counts, outcome


# -- the per-layer table -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bonus, expected", [(True, 32), (False, 30)])
def test_prefer_widens_a_group_only_where_the_aligned_width_is_faster(bonus, expected):
    prepared, table = table_for(chain(), FakeTimer(aligned_bonus=bonus))
    counts = {g.id: 30 for g in prepared.analysis.prunable}
    assert set(table.prefer(counts).values()) == {expected}


def test_the_table_of_an_additive_machine_predicts_it_exactly():
    """Layers timed alone (convs between context convs whose time is subtracted) plus the rest add up to the whole
    model, at any widths: the table's only error on a real machine is what is not additive."""
    timer = FakeTimer(aligned_bonus=True)
    prepared, table = table_for(chain(64), timer)
    assert table.cost({}) == pytest.approx(timer.ms(prepared.model), rel=1e-12)
    for counts in (uniform_counts(prepared.analysis, 0.5, 16), uniform_counts(prepared.analysis, 0.3, 1)):
        assert table.cost(counts) == pytest.approx(timer.ms(pruned_to(prepared, counts)), rel=1e-12)


def test_latency_budget_is_met_on_the_table():
    prepared, table = table_for(chain(64), FakeTimer(aligned_bonus=True))
    search = uniform_search(prepared)
    for goal in (0.3, 0.5, 0.8):
        counts = search((table, goal))
        assert table.cost(counts) <= goal * table.cost({})
        assert all(n % 8 == 0 for n in counts.values())  # unaligned widths cost 4x here: never chosen
        assert table.cost(counts) > 0.7 * goal * table.cost({})  # and the budget is used, not wasted


def test_unaligned_widths_predicted_slower_than_aligned():
    prepared, table = table_for(chain(64), FakeTimer(aligned_bonus=True))
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
    """On onnxruntime: a one-layer model it refused would be recorded as 0 ms."""
    prepared, table = table_for(mixed_layers(), OrtTimer(threads=1))
    assert {entry.layer.node.op_type for entry in table.layers} == {"Conv", "ConvTranspose", "MatMul", "Gemm"}
    counts = uniform_counts(prepared.analysis, 0.5, 1)
    assert any(n < g.size for g in prepared.analysis.prunable for n in [counts[g.id]])
    assert table.cost(counts) > 0 and all(ms > 0 for ms in table.layer_timer.cache.entries.values())


def test_repeated_layers_are_measured_once():
    b = builders.GraphBuilder()
    x = b.conv(b.input([1, 3, 8, 8]), 3, 16)
    for _ in range(3):
        x = b.op("Relu", [b.conv(x, 16, 16)])
    timer = FakeTimer()
    _, table = table_for(b.model(b.conv(x, 16, 4)), timer)
    assert len(table.layers) == 5 and table.measured == 3  # 3->16, three identical 16->16, 16->4
    # the whole model, then each of the three layers between context convs, and the contexts at 3, 16 and 4 channels
    assert len(timer.runs) == 1 + 3 + 3


# -- the correction loop -------------------------------------------------------------------------------------------

def test_the_outcome_is_what_was_measured_and_the_table_predicted():
    timer = FakeTimer()
    prepared, counts, outcome = run_target(builders.residual_block(), 0.6, timer)
    assert set(outcome) == {"target", "threads", "predicted_kept", "measured_kept", "layers", "one_layer_models",
                            "table_entries"}
    measured = timer.ms(pruned_to(prepared, counts)) / timer.ms(prepared.model)
    assert outcome["measured_kept"] == pytest.approx(measured, rel=1e-12)
    assert outcome["predicted_kept"] == pytest.approx(measured, rel=1e-9)  # an additive machine: the table is exact
    assert abs(outcome["measured_kept"] - 0.6) <= TIE * 0.6
    contexts = [m for m in timer.runs[1:] if len(m.graph.node) == 1 and m.graph.node[0].input[1] == "w"]
    assert outcome["layers"] == 4 and outcome["table_entries"] == len(timer.runs) - 1  # all but the whole model
    assert outcome["one_layer_models"] == len(timer.runs) - 1 - len(contexts)


def test_the_correction_meets_a_target_the_table_alone_misses():
    """Other nodes cost the same at any width here, while the table scales them with the layers' outputs: the table
    predicts too little, and the measured whole model corrects the goal."""
    timer, target = FakeTimer(other_ms=0.02), 0.6
    prepared, counts, outcome = run_target(builders.residual_block(), target, timer)
    table_only = uniform_search(prepared)((table_for(builders.residual_block(), FakeTimer(other_ms=0.02))[1], target))
    missed = timer.ms(pruned_to(prepared, table_only)) / timer.ms(prepared.model)
    assert missed > target * (1 + TIE)  # the table alone would overshoot the budget
    assert outcome["measured_kept"] <= target * (1 + TIE) and outcome["predicted_kept"] < outcome["measured_kept"]
    assert abs(outcome["measured_kept"] - target) < abs(missed - target)


def test_fit_scales_the_goal_then_interpolates():
    """A machine 1.25x slower than the table, plus a step: scaled once, then bracketed and interpolated."""
    goals, measure = [], lambda counts: 1.25 * counts[0] / 1000 + (0.05 if counts[0] > 480 else 0.0)

    def search(budget):
        goals.append(budget[1])
        return {0: round(budget[1] * 1000)}

    class Table:
        def cost(self, counts):
            return counts.get(0, 1000)

    counts, kept = fit(Table(), measure, search, 0.6)
    assert goals[:2] == [0.6, pytest.approx(0.6 * 0.6 / 0.8)]  # 0.6 measured 0.8: scaled by 0.6 / 0.8
    assert len(goals) <= CORRECTIONS and kept == measure(counts) and kept <= 0.6 * (1 + TIE)
    assert next_goal(0.5, 0.6, 0.7, (0.4, 0.5), (0.5, 0.7)) == pytest.approx(0.45)
    assert next_goal(0.5, 0.6, 0.7, (0.4, 0.5), (0.5, 0.5)) == pytest.approx(0.45)  # not increasing: midpoint


def test_iterative_schedule_measures_the_product_of_its_steps(monkeypatch):
    """Each step's fractions are of the model it started from; on a machine where time is a function of the graph,
    their product is the final model's time over the original's."""
    timer = FakeTimer()
    monkeypatch.setattr(latency, "OrtTimer", lambda threads: timer)
    model = builders.residual_block()
    pruned, report = onnxprune.prune(model, Target.latency(0.6), Options(round_to=1, schedule="iterative", steps=2))
    onnx.checker.check_model(pruned, full_check=True)
    assert report.target_latency["target"] == 0.6 and report.macs_after < report.macs_before
    assert report.target_latency["measured_kept"] == pytest.approx(timer.ms(pruned) / timer.ms(model), rel=1e-9)


# -- the cache -----------------------------------------------------------------------------------------------------

def test_a_saved_table_is_reused_and_keeps_its_format(tmp_path):
    path = tmp_path / "table.json"
    _, first_counts, first = run_target(builders.residual_block(), 0.6, FakeTimer(), path)
    data = json.loads(path.read_text())
    assert set(data) == {"machine", "entries"} and len(data["entries"]) == first["table_entries"]
    assert all(isinstance(v, float) for v in data["entries"].values())
    timer = FakeTimer()
    _, counts, second = run_target(builders.residual_block(), 0.6, timer, path)
    assert second["one_layer_models"] == 0 and len(timer.runs) == 1  # only the whole model, for the rest
    assert counts == first_counts and second["table_entries"] == first["table_entries"]


def test_a_table_from_elsewhere_is_not_used(tmp_path, caplog):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"machine": "another machine", "entries": {"abc": 1.0}}))
    with caplog.at_level(logging.WARNING, logger="onnxprune"):
        assert len(LatencyCache.load(path)) == 0
    assert "another machine" in caplog.text
    path.write_text("{not json")
    with pytest.raises(onnxprune.UsageError, match="cannot read latency table"):
        LatencyCache.load(path)
    assert len(LatencyCache.load(tmp_path / "missing.json")) == 0


def test_target_latency_on_onnxruntime_reports_and_reuses_its_table(tmp_path):
    """End to end on onnxruntime: the numbers are noisy, what is checked is where they come from."""
    path = tmp_path / "table.json"
    model = builders.residual_block()
    pruned, first = onnxprune.prune(model, Target.latency(0.6), Options(round_to=1, latency_table=path))
    onnx.checker.check_model(pruned, full_check=True)
    assert first.target_latency["one_layer_models"] > 0 and "latency" in "\n".join(first.summary_lines())
    assert len(json.loads(path.read_text())["entries"]) == first.target_latency["table_entries"]
    _, second = onnxprune.prune(model, Target.latency(0.6), Options(round_to=1, latency_table=path))
    assert second.target_latency["one_layer_models"] == 0


# -- allocation with a cost model ----------------------------------------------------------------------------------

def test_budget_left_by_a_lockstep_jump_is_filled_group_by_group():
    """Equal groups switch width together under a uniform ratio; what the jump leaves of the budget is used."""

    class Sum:
        def cost(self, counts):
            return sum(counts.values())

    filled = _fill(Sum(), 60, {0: 16, 1: 16, 2: 16}, {0: 24, 1: 24, 2: 24})
    assert sorted(filled.values()) == [16, 16, 24]


def test_the_mac_model_is_a_cost_model_that_changes_nothing():
    prepared = prepare(chain(64))
    macs = MacModel(prepared.analysis, layer_macs(prepared.model))
    counts = {g.id: 17 for g in prepared.analysis.prunable}
    assert macs.prefer(counts) == counts and macs.steps == 40 and not macs.fill_gaps


# -- the timing loop -----------------------------------------------------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeSession:
    """Each run advances the clock by `ms` and is logged under `name`."""

    def __init__(self, name: str, ms: float, clock: FakeClock, log: list[str]):
        self.name, self.ms, self.clock, self.log = name, ms, clock, log

    def run(self, outputs, feed):
        self.clock.now += self.ms / 1e3
        self.log.append(self.name)


def test_median_ms_times_a_short_run_over_a_minimum_total():
    clock, log = FakeClock(), []
    assert median_ms(FakeSession("a", 0.1, clock, log), {}, runs=5, min_total_ms=3.0, clock=clock) == \
        pytest.approx(0.1)
    assert 30 <= len(log) - 1 <= 31  # a warm-up, then runs until 3 ms were timed (to float rounding)
    log.clear()
    median_ms(FakeSession("a", 2.0, clock, log), {}, runs=5, clock=clock)
    assert len(log) == 1 + 5


@pytest.mark.parametrize("threads, expected", [(1, "ab" * 3 + "ab" * 4), (2, ("aaa" + "aa" + "bbb" + "bb") * 3)])
def test_two_models_are_timed_interleaved_or_in_alternating_blocks(threads, expected):
    clock, log, opened = FakeClock(), [], []

    def open_session(model, threads):
        opened.append(model)
        return FakeSession(model, {"a": 2.0, "b": 1.0}[model], clock, log)

    timing = measure_latency("a", "b", {}, threads, 4, open_session=open_session, clock=clock)
    assert "".join(log) == expected  # warm-up runs, then timed runs
    assert timing["runs"] == (4 if threads == 1 else 6) and timing["speedup"] == pytest.approx(2.0)
    assert timing["before_ms"]["median"] == pytest.approx(2.0) and timing["after_ms"]["p90"] == pytest.approx(1.0)
    assert "".join(opened) == ("ab" if threads == 1 else "ab" * 3)  # with threads, one session per block
