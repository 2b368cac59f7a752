"""Unstructured and N:M sparsity (issue 12): masks exact on every layer type, the N:M pattern checked from the ONNX
weight layouts (not through onnxprune.layers), shares met, --exclude honoured, composition with channel pruning,
data-driven criteria and masked least squares doing what they claim, and the CLI end to end."""
import json
from functools import partial

import numpy as np
import onnx
import pytest
from builders import DIGITS, DIGITS_CALIB, GraphBuilder, invoke, one_line_error
from onnx import numpy_helper

import onnxprune
from onnxprune import CalibrationSource, Options, Target
from onnxprune import least_squares
from onnxprune.least_squares import NormalEquations
from onnxprune.sparsity import refit
from onnxprune.sparsity.refit import masked_refit
from onnxprune.sparsity.sparsegpt import sparsegpt
from onnxprune.sparsity.spec import Pattern
from onnxprune.verify import check_valid, io_signature, random_feeds, run


# ------------------------------------------------------------------------------------------------ models

def conv_model(cin: int = 8, group: int = 1) -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.op("Relu", [b.conv(b.input(["N", cin, 6, 6]), cin, 16, group=group)])
    return b.model(b.conv(x, 16, 8, k=1))


def conv_transpose_model() -> onnx.ModelProto:
    b = GraphBuilder()
    x = b.input(["N", 8, 5, 5])
    y = b.op("ConvTranspose", [x, b.weight(8, 12, 3, 3), b.const(np.zeros(12, np.float32))], strides=[2, 2])
    return b.model(y)


def gemm_model(trans_b: int = 1, alpha: float = 1.0) -> onnx.ModelProto:
    b = GraphBuilder()
    h = b.op("Relu", [b.gemm(b.input(["N", 16]), 16, 24, trans_b=trans_b)])
    b.nodes[-2].attribute.extend([onnx.helper.make_attribute("alpha", alpha)])
    return b.model(b.gemm(h, 24, 8))


def matmul_model(scales: np.ndarray | None = None) -> onnx.ModelProto:
    """x (N, 4, 16) [* per-channel scales] -> MatMul+Add -> Relu -> MatMul+Add."""
    b = GraphBuilder()
    x = b.input(["N", 4, 16])
    if scales is not None:
        x = b.op("Mul", [x, b.const(scales.astype(np.float32))])
    h = b.op("Relu", [b.matmul(x, 16, 32)])
    return b.model(b.matmul(h, 32, 8))


LAYERS = {"conv": conv_model, "grouped_conv": lambda: conv_model(16, group=2), "conv_transpose": conv_transpose_model,
          "gemm": gemm_model, "gemm_not_transposed": lambda: gemm_model(0, alpha=0.5), "matmul": matmul_model}


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The input-1 weight of every Conv / ConvTranspose / Gemm / MatMul, by node name."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.name: inits[n.input[1]] for n in model.graph.node
            if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and n.input[1] in inits}


def input_channel_blocks(node: onnx.NodeProto, weight: np.ndarray, m: int) -> np.ndarray:
    """The weight as (..., blocks, m): m consecutive input channels last, read from the ONNX layouts directly:
    Conv (O, C, k...) and ConvTranspose (C, O, k...) have C on axis 1 / 0; Gemm's B is (K, N), or (N, K) with
    transB; MatMul's B is (K, N)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    axis = {"Conv": 1, "ConvTranspose": 0, "MatMul": 0}.get(node.op_type, 1 if attrs.get("transB", 0) else 0)
    moved = np.moveaxis(weight, axis, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)


def follows(node: onnx.NodeProto, weight: np.ndarray, n: int, m: int) -> bool:
    return bool((np.count_nonzero(input_channel_blocks(node, weight, m), axis=-1) <= n).all())


def calibration(model: onnx.ModelProto, samples: int = 48, seed: int = 3) -> CalibrationSource:
    feeds = random_feeds(model, seed=seed, batch=samples)
    return CalibrationSource([feeds], batch_size=16)


def require_valid(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    check_valid(model)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    assert io_signature(model) == io_signature(original)
    run(model, random_feeds(model, seed=1, batch=2))


def sparsify(model: onnx.ModelProto, granularity: str, ratio: float | None = None, **options):
    target = Target.ratio(ratio) if ratio is not None else None
    return onnxprune.prune(model, target, Options(granularity=granularity, **options))


# ------------------------------------------------------------------------------------------------ masks exact

@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("granularity,ratio", [("unstructured", 0.6), ("2:4", None)])
def test_only_masked_positions_change(kind, granularity, ratio):
    model = LAYERS[kind]()
    sparse, report = sparsify(model, granularity, ratio)
    require_valid(sparse, model)
    before, after = weights(model), weights(sparse)
    for name, weight in before.items():
        changed = after[name] != weight
        assert (after[name][changed] == 0).all(), f"{name}: a kept weight changed"
        assert np.count_nonzero(after[name]) == pytest.approx(weight.size * 0.4 if ratio else weight.size / 2, abs=1)
    entries = {e["node"]: e for e in report.sparsity["layers"]}
    assert set(entries) == set(before) and all(e["zeros_after"] > e["zeros_before"] for e in entries.values())


@pytest.mark.parametrize("kind", ["conv", "gemm", "gemm_not_transposed", "matmul"])
def test_lsq_refits_only_kept_positions_and_keeps_the_mask(kind):
    model = LAYERS[kind]()
    plain, _ = sparsify(model, "2:4", criterion="wanda", calib=calibration(model))
    fitted, report = sparsify(model, "2:4", criterion="wanda", recover="lsq", calib=calibration(model))
    require_valid(fitted, model)
    first = model.graph.node[0].name  # later layers see the re-fitted ones' outputs, so their masks may differ
    assert ((weights(fitted)[first] == 0) == (weights(plain)[first] == 0)).all(), "the mask changed"
    nodes = {n.name: n for n in model.graph.node}
    for name, weight in weights(plain).items():
        refit = weights(fitted)[name]
        assert follows(nodes[name], refit, 2, 4) and np.count_nonzero(refit) == refit.size // 2
        assert not np.array_equal(refit, weight), f"{name}: nothing was re-fitted"
    assert all(e["refitted"] for e in report.sparsity["layers"])
    feeds = random_feeds(model, seed=3, batch=48)  # the calibration data: lsq must be closer to the original there
    reference = run(model, feeds)[0]
    assert error(run(fitted, feeds)[0], reference) < error(run(plain, feeds)[0], reference)


def test_lsq_gives_a_layer_without_bias_one_and_later_layers_still_run():
    """The first conv has no bias: the re-fit creates one, and the layers after it read that model."""
    b = GraphBuilder()
    x = b.op("Relu", [b.conv(b.input(["N", 8, 6, 6]), 8, 16, bias=False)])
    model = b.model(b.conv(b.op("Relu", [b.conv(x, 16, 16, bias=False)]), 16, 8, k=1))
    fitted, report = sparsify(model, "2:4", recover="lsq", calib=calibration(model))
    require_valid(fitted, model)
    assert all(e["refitted"] for e in report.sparsity["layers"])
    assert len(fitted.graph.node[0].input) == 3


def error(value: np.ndarray, reference: np.ndarray) -> float:
    return float(np.sum((value - reference) ** 2) / np.sum(reference ** 2))


# ------------------------------------------------------------------------------------------------ N:M

@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
@pytest.mark.parametrize("criterion", ["l1", "wanda", "sparsegpt"])
def test_nm_pattern_holds_on_every_layer_type(pattern, criterion):
    n, m = map(int, pattern.split(":"))
    for kind, build in LAYERS.items():
        model = build()
        sparse, report = sparsify(model, pattern, criterion=criterion, calib=calibration(model))
        nodes = {node.name: node for node in sparse.graph.node}
        for name, weight in weights(sparse).items():
            assert follows(nodes[name], weight, n, m), f"{kind} {name}"
            assert np.count_nonzero(weight) == weight.size * n // m


def test_layers_whose_input_channels_do_not_split_stay_dense_and_are_reported():
    model = conv_model(cin=6)  # 6 input channels: not a multiple of 4 (the second conv has 16)
    sparse, report = sparsify(model, "2:4")
    first = model.graph.node[0].name
    assert np.array_equal(weights(sparse)[first], weights(model)[first])
    assert report.sparsity["dense"] == [{"node": first, "op": "Conv", "weight": model.graph.node[0].input[1],
                                         "reason": "input channels not a multiple of 4"}]
    assert "  dense: input channels not a multiple of 4 (1 layer(s))" in report.summary_lines()


# ------------------------------------------------------------------------------------------------ shares

@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_unstructured_share_met_per_layer(ratio):
    model = matmul_model()
    sparse, report = sparsify(model, "unstructured", ratio, criterion="wanda", calib=calibration(model))
    for weight in weights(sparse).values():
        assert weight.size - np.count_nonzero(weight) == pytest.approx(ratio * weight.size, abs=weight.shape[1])


def test_target_params_keeps_that_fraction_of_the_non_zeros():
    model = gemm_model()
    sparse, report = onnxprune.prune(model, Target.params(0.6), Options(granularity="unstructured"))
    before, after = report.sparsity["nonzero_params_before"], report.sparsity["nonzero_params_after"]
    assert after == pytest.approx(0.6 * before, abs=2)
    total = sum(np.count_nonzero(numpy_helper.to_array(i)) for i in sparse.graph.initializer)
    assert total == after


def test_sensitivity_allocation_meets_the_share_with_different_layer_shares():
    model = matmul_model(scales=np.geomspace(0.1, 10, 16))
    sparse, report = sparsify(model, "unstructured", 0.6, allocation="sensitivity", calib=calibration(model))
    layers = report.sparsity["layers"]
    zeros, params = sum(e["zeros_after"] for e in layers), sum(e["params"] for e in layers)
    assert zeros == pytest.approx(0.6 * params, abs=len(layers))
    shares = [e["zeros_after"] / e["params"] for e in layers]
    assert max(shares) - min(shares) > 0.05


def test_exclude_leaves_a_layer_dense():
    model = matmul_model()
    first = model.graph.node[0]
    sparse, report = sparsify(model, "2:4", exclude=(first.name,))
    assert np.array_equal(weights(sparse)[first.name], weights(model)[first.name])
    assert report.sparsity["dense"][0]["reason"] == f"excluded by --exclude '{first.name}'"
    assert len(report.sparsity["layers"]) == 1


# ------------------------------------------------------------------------------------------------ composition

def test_channels_then_two_four():
    model = conv_model(cin=8)
    pruned, report = onnxprune.prune(model, 0.5, Options(round_to=4, then="2:4"))
    require_valid(pruned, model)
    assert report.params_after < report.params_before
    nodes = {n.name: n for n in pruned.graph.node}
    for name, weight in weights(pruned).items():
        assert follows(nodes[name], weight, 2, 4), name
    assert {e["node"] for e in report.sparsity["layers"]} == set(nodes) & set(weights(pruned))


# ------------------------------------------------------------------------------------------------ criteria

def test_data_criteria_beat_magnitude_where_input_scales_differ():
    """Inputs whose channels differ in scale by 100x: magnitude alone zeroes the weights of the loud channels as
    readily as those of the quiet ones; wanda and sparsegpt see the inputs and do clearly better."""
    model = matmul_model(scales=np.geomspace(0.1, 10, 16))
    feeds = random_feeds(model, seed=3, batch=48)
    reference = run(model, feeds)[0]
    errors = {c: error(run(sparsify(model, "2:4", criterion=c, calib=calibration(model))[0], feeds)[0], reference)
              for c in ("l1", "wanda", "sparsegpt")}
    assert errors["wanda"] < 0.7 * errors["l1"] and errors["sparsegpt"] < 0.5 * errors["l1"], errors


def test_sparsegpt_with_a_diagonal_hessian_is_magnitude_without_updates():
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((6, 16))
    updated, keep = sparsegpt(rows, np.eye(16), Pattern(2, 4), 0.5, kernel=1)
    blocks = np.abs(rows).reshape(6, 4, 4)
    expected = blocks >= np.sort(blocks, axis=2)[:, :, 2:3]
    assert np.array_equal(keep, expected.reshape(6, 16))
    assert np.allclose(updated[keep], rows[keep])


def test_sparsegpt_compensates_correlated_inputs():
    """With strongly correlated inputs, zeroing a weight can be made up for by its neighbours: sparsegpt's output
    error on the data is well below that of the same share zeroed by magnitude."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((512, 4)) @ rng.standard_normal((4, 16)) + 0.05 * rng.standard_normal((512, 16))
    rows = rng.standard_normal((8, 16))
    updated, keep = sparsegpt(rows, x.T @ x, Pattern(), 0.5, kernel=1)
    magnitude = rows * (np.abs(rows) >= np.median(np.abs(rows)))
    assert keep.sum() == 64
    assert np.sum((x @ (updated * keep - rows).T) ** 2) < 0.2 * np.sum((x @ (magnitude - rows).T) ** 2)


def test_masked_refit_is_least_squares_on_each_rows_kept_features():
    """Each row's target a function of its kept features alone, many more rows than unknowns: the held-out error
    falls down to the weakest ridge (1e-5 of each feature's energy), so each row's fit is its least-squares
    solution on its kept features."""
    rng = np.random.default_rng(2)
    features = np.concatenate([rng.standard_normal((400, 6)), np.ones((400, 1))], axis=1)
    keep = np.array([[1, 0, 1, 0, 1, 1], [0, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 1]], bool)
    target = features @ (rng.standard_normal((7, 3)) * np.append(keep, np.ones((3, 1), bool), axis=1).T)
    system = NormalEquations()
    system.add(features, target)
    fitted = masked_refit(system, np.zeros((7, 3)), keep)
    for row, kept in enumerate(keep):
        columns = np.append(np.flatnonzero(kept), 6)
        expected = np.linalg.lstsq(features[:, columns], target[:, row], rcond=None)[0]
        np.testing.assert_allclose(fitted[columns, row], expected, rtol=1e-3, atol=1e-6)
        assert (fitted[np.flatnonzero(~kept), row] == 0).all()


def test_batched_refit_of_a_wide_layer_matches_each_rows_direct_solve(monkeypatch):
    """The batched conjugate-gradient path (forced: this layer is small enough for the direct one) stops on a
    relative residual of CG_TOLERANCE (1e-7), which on this well-conditioned Gram matrix (condition number ~10)
    bounds each row's relative solution error far below 1e-4. One ridge only, so the expected solve is known:
    (G[S, S] + diag(r[S])) w = c[S] + r[S] w0[S], r the ridge weights, w0 the row's current weights."""
    monkeypatch.setattr(refit, "DIRECT_MAX_WORK", 0)
    monkeypatch.setattr(least_squares, "RIDGES", (1e-5,))
    rng = np.random.default_rng(3)
    features = np.concatenate([rng.standard_normal((2000, 512)), np.ones((2000, 1))], axis=1)
    target = features[:, :512] @ rng.standard_normal((512, 64)) + 0.1 * rng.standard_normal((2000, 64))
    system = NormalEquations()
    system.add(features, target)
    keep = rng.random((64, 512)) < 0.6
    start = np.concatenate([rng.standard_normal((512, 64)) * keep.T, np.zeros((1, 64))])
    fitted = masked_refit(system, start, keep)
    ridge = system.total.ridge_weights(1e-5)
    for row, kept in enumerate(keep):
        columns = np.append(np.flatnonzero(kept), 512)
        matrix = system.gram[np.ix_(columns, columns)] + np.diag(ridge[columns])
        expected = np.linalg.solve(matrix, system.cross[columns, row] + ridge[columns] * start[columns, row])
        assert np.linalg.norm(fitted[columns, row] - expected) <= 1e-4 * np.linalg.norm(expected)
        assert (fitted[np.flatnonzero(~kept), row] == 0).all()


def test_masked_refit_from_few_rows_does_not_fit_the_noise():
    """240 noisy rows for about 100 kept features per row (the dropped features add to the noise), current weights
    far from the best: the fit with the ridge chosen on held-out rows does better on fresh rows of the same layer
    than the current weights and than the weakest-ridge fit judged on the calibration rows (the old behaviour,
    which follows the noise)."""
    rng = np.random.default_rng(0)
    truth, keep = rng.standard_normal((200, 16)), rng.random((16, 200)) < 0.5

    def rows(count):
        x = rng.standard_normal((count, 200))
        return x, x @ truth + 3.0 * rng.standard_normal((count, 16))
    system = NormalEquations()
    system.add(*rows(240))
    current = (truth + rng.standard_normal((200, 16))) * keep.T
    chosen = masked_refit(system, current, keep)
    old = least_squares.fit_held_out(system.total, None, current, partial(refit._direct, keep))
    plain = np.where(old.better[None, :], np.where(keep.T, old.weights, 0.0), current)
    x, y = rows(4000)
    error = lambda weights: np.sum((x @ weights - y) ** 2)  # noqa: E731
    assert error(chosen) < 0.8 * error(current)
    assert error(chosen) < 0.9 * error(plain)


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_two_four_end_to_end(tmp_path):
    out, report = tmp_path / "sparse.onnx", tmp_path / "report.json"
    result = invoke(DIGITS, "--granularity", "2:4", "--criterion", "sparsegpt", "--recover", "lsq", "--calib",
                    DIGITS_CALIB, "--calib-size", "64", "-o", out, "--report", report)
    assert result.exit_code == 0, result.output
    assert "onnxruntime CPU runs sparse weights at dense speed" in result.output
    data = json.loads(report.read_text())["sparsity"]
    assert data["granularity"] == "2:4" and data["nonzero_params_after"] < data["nonzero_params_before"]
    model = onnx.load(out)
    nodes = {n.name: n for n in model.graph.node}
    sparse = {e["node"] for e in data["layers"]}
    assert sparse and all(follows(nodes[name], w, 2, 4) for name, w in weights(model).items() if name in sparse)
    check_valid(model)


@pytest.mark.parametrize("args,text", [
    (["--granularity", "2:4", "--ratio", "0.5"], "--ratio does not go with an N:M --granularity"),
    (["--granularity", "4:2"], "granularity must be channel, unstructured or N:M"),
    (["--ratio", "0.5", "--criterion", "wanda"], "criterion 'wanda' chooses single weights"),
    (["--granularity", "unstructured", "--ratio", "0.5", "--criterion", "regression"], "ranks channels"),
    (["--granularity", "unstructured", "--ratio", "0.5", "--criterion", "wanda"], "criterion wanda needs calibration"),
    (["--ratio", "0.5", "--then", "unstructured"], "--then takes an N:M pattern"),
    (["--target-params", "0.5"], "--target-params needs --granularity unstructured"),
    (["--granularity", "2:4", "--allocation", "sensitivity"], "takes allocation uniform"),
])
def test_cli_usage_errors(tmp_path, args, text):
    result = invoke(DIGITS, *args, "-o", tmp_path / "out.onnx")
    one_line_error(result, 2, text)
