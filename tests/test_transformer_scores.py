"""Transformer head and neuron scores (issue 14): FLAP's fluctuation criterion against a direct numpy computation,
the standardised allocation (z-scores within each kind of group ranked across groups), and the padding the
sensitivity curves cut from their samples."""
import copy
import sys

import builders
import numpy as np
import onnx
import pytest
from builders import GraphBuilder, padded_tokens, token_mlp

from onnxprune import CalibrationSource, Options, Target
from onnxprune.allocate import Plan, counts_for_target, standardised_scores
from onnxprune.calibrate import ChannelStats, without_padding
from onnxprune.pipeline import choose, open_inputs, prepare
from onnxprune.sensitivity import ZeroedRuns, model_outputs
from onnxprune.verify import run


def heads_model() -> onnx.ModelProto:
    """(N, S, 8) tokens and an attention_mask: 4 'heads' of 4 channels (a Reshape to (N, S, 4, 4), a ReLU, back),
    read by an output projection W (16, 8) with a bias."""
    b = GraphBuilder(seed=3)
    x = b.input(["N", "S", 8])
    mask = b.input(["N", "S"], name="attention_mask", elem_type=onnx.TensorProto.INT64)
    h = b.op("Reshape", [b.matmul(x, 8, 16), b.const(np.array([0, 0, 4, 4], np.int64))])
    h = b.op("Reshape", [b.op("Relu", [h]), b.const(np.array([0, 0, 16], np.int64))])
    keep = b.op("Unsqueeze", [b.op("Cast", [mask], to=onnx.TensorProto.FLOAT), b.const(np.array([2], np.int64))])
    return b.model(b.op("Mul", [b.matmul(h, 16, 8), keep]))


def scores_of(model: onnx.ModelProto, data: dict, criterion: str = "fluctuation") -> dict[int, np.ndarray]:
    target, options = Target.ratio(0.5), Options(criterion=criterion, calib=CalibrationSource([data]), round_to=1)
    return choose(open_inputs(model, target, options), target, options).scores.values


def hidden_and_projection(model: onnx.ModelProto, data: dict) -> tuple[np.ndarray, np.ndarray]:
    """What the output projection reads at the real positions (rows, 16), and its weight (16, 8)."""
    projection = [n for n in model.graph.node if n.op_type == "MatMul"][-1]
    probed = onnx.ModelProto()
    probed.CopyFrom(model)
    probed.graph.output.append(onnx.helper.make_tensor_value_info(projection.input[0], onnx.TensorProto.FLOAT, None))
    hidden = run(probed, data)[1]
    weight = next(onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.name == projection.input[1])
    return hidden[data["attention_mask"] == 1], weight


def test_fluctuation_is_the_variance_at_real_positions_times_the_weight_column_energy_summed_per_head():
    model, data = heads_model(), padded_tokens()
    (scores,) = scores_of(model, data).values()
    hidden, weight = hidden_and_projection(model, data)
    per_feature = hidden.astype(np.float64).var(0, ddof=1) * np.square(weight.astype(np.float64)).sum(1)
    np.testing.assert_allclose(scores, per_feature.reshape(4, 4).sum(1), rtol=1e-5)


def test_fluctuation_on_a_conv_sums_the_kernel_taps():
    b = GraphBuilder(seed=1)
    h = b.op("Relu", [b.conv(b.input(["N", 3, 6, 6]), 3, 8)])
    model = b.model(b.conv(h, 8, 4))
    data = {"x": np.random.default_rng(0).standard_normal((6, 3, 6, 6)).astype(np.float32)}
    (scores,) = scores_of(model, data).values()
    probed = onnx.ModelProto()
    probed.CopyFrom(model)
    probed.graph.output.append(onnx.helper.make_tensor_value_info(h, onnx.TensorProto.FLOAT, None))
    activation = np.moveaxis(run(probed, data)[1], 1, 0).reshape(8, -1).astype(np.float64)
    weight = onnx.numpy_helper.to_array(model.graph.initializer[-2]).astype(np.float64)  # (4, 8, 3, 3)
    expected = activation.var(1, ddof=1) * np.square(weight).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(scores, expected, rtol=1e-5)


def test_channel_variance_streams_and_merges_like_the_other_sums():
    values = np.random.default_rng(2).standard_normal((3, 5, 40)) * np.arange(1, 6)[None, :, None] + 7.0
    whole, parts = ChannelStats(), ChannelStats()
    whole.update(values, 1)
    for part in np.split(values, 3):
        parts.update(part, 1)
    expected = np.moveaxis(values, 1, 0).reshape(5, -1).var(1, ddof=1)
    np.testing.assert_allclose(whole.variance, expected, rtol=1e-9)
    np.testing.assert_allclose(parts.variance, expected, rtol=1e-9)


class Group:
    """What the allocation reads of a group: its id, size and members (none: every count is allowed)."""

    def __init__(self, gid: int, size: int):
        self.id, self.size, self.members = gid, size, []


class Analysis:
    def __init__(self, *groups: Group):
        self.prunable = list(groups)


def test_standardised_scores_are_z_scores_within_each_kind_of_group():
    scores = {1: np.array([1.0, 2.0, 3.0, 4.0]), 2: np.array([10.0, 20.0, 30.0, 40.0]), 3: np.array([1e3, 1e3 + 1]),
              4: np.full(3, 7.0)}
    ranked = standardised_scores(scores, {1: "a", 2: "a", 3: "b", 4: "c"})
    pooled = np.concatenate([scores[1], scores[2]])
    z = (pooled - pooled.mean()) / pooled.std()
    np.testing.assert_allclose(np.concatenate([ranked[1], ranked[2]]) - ranked[1][0], z - z[0])
    np.testing.assert_allclose(ranked[3] - ranked[3][0], [0.0, 2.0])  # z = -1, 1
    np.testing.assert_allclose(ranked[4], ranked[4][0])  # all equal: z = 0
    assert min(v.min() for v in ranked.values()) == pytest.approx(1.0)


def test_standardised_allocation_compares_layers_of_a_kind_by_score_and_kinds_by_z_score():
    """Two of ten channels go. Groups 1 and 2 are one kind (4 channels): by score / group mean they look alike and
    each gives one; standardised together, group 2's channels all score higher, so group 1 gives, along with the
    lowest channel of group 3, another kind whose scores are on another scale."""
    scores = {1: np.array([1.0, 2.0, 3.0, 4.0]), 2: np.array([10.0, 20.0, 30.0, 40.0]), 3: np.array([1e3, 1e3 + 1])}
    analysis = Analysis(Group(1, 4), Group(2, 4), Group(3, 2))
    assert counts_for_target(analysis, scores, "global", 1, 0.2) == {1: 3, 2: 3, 3: 2}
    assert counts_for_target(analysis, scores, "standardised", 1, 0.2) == {1: 3, 2: 4, 3: 1}


def test_padding_is_cut_from_sorted_batches_and_real_positions_keep_their_outputs():
    model, data = token_mlp(), padded_tokens()
    feeds = [{k: v[i:i + 4] for k, v in data.items()} for i in range(0, 10, 4)]
    cut = without_padding(model, feeds)
    assert [len(f["x"]) for f in cut] == [4, 4, 2]
    reach = [int(f["attention_mask"].sum(1).max()) for f in cut]
    assert [f["x"].shape[1] for f in cut] == reach == sorted(reach) and sum(reach) < 3 * 6
    lengths = data["attention_mask"].sum(1)
    rows = np.argsort(lengths, kind="stable")
    got = np.concatenate([run(model, f)[0][f["attention_mask"] == 1] for f in cut])
    expected = run(model, {k: v[rows] for k, v in data.items()})[0][data["attention_mask"][rows] == 1]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_padding_is_kept_without_a_mask_or_with_a_fixed_sequence():
    feeds = [{"x": np.zeros((2, 5, 16), np.float32)}]
    assert without_padding(builders.matmul_mlp(), feeds) is feeds
    fixed = token_mlp()
    for vi in fixed.graph.input:
        vi.type.tensor_type.shape.dim[1].dim_value = 6
    feeds = [padded_tokens()]
    assert without_padding(fixed, feeds) is feeds


def layer_norm_mlp() -> onnx.ModelProto:
    """matmul -> LayerNormalization (its 16 channels: an inexact group) -> matmul -> relu (24: exact) -> matmul."""
    b = GraphBuilder(seed=4)
    h = b.matmul(b.input(["N", 5, 16]), 16, 16)
    h = b.op("LayerNormalization", [h, b.const(np.ones(16, np.float32)), b.const(np.zeros(16, np.float32))], axis=-1)
    return b.model(b.matmul(b.op("Relu", [b.matmul(h, 16, 24)]), 24, 8))


def test_one_session_with_zeroed_constants_gives_the_pruned_outputs_and_inexact_groups_are_pruned(monkeypatch):
    prepared = prepare(layer_norm_mlp())
    analysis = prepared.analysis
    feeds = [{"x": np.random.default_rng(s).standard_normal((3, 5, 16)).astype(np.float32)} for s in range(2)]
    runs = ZeroedRuns(prepared.model, analysis)
    sensitivity = sys.modules["onnxprune.sensitivity"]  # onnxprune.sensitivity is also the API's function
    real_prune = sensitivity.apply_plan
    pruned_groups = []
    monkeypatch.setattr(sensitivity, "apply_plan", lambda m, a, plan: pruned_groups.append(*plan.keep) or
                        real_prune(m, a, plan))
    for group in analysis.prunable:
        for kept in (1, group.size // 2, group.size - 1):
            plan = Plan({group.id: np.arange(group.size)[::-1][:kept][::-1].copy()})
            expected = model_outputs(real_prune(copy.deepcopy(prepared.model), analysis, plan), feeds)
            for got, want in zip(runs.outputs(group, plan, feeds), expected):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    inexact = [g.id for g in analysis.prunable if g.inexact]
    assert inexact and set(pruned_groups) == set(inexact) and len(pruned_groups) == 3 * len(inexact)
