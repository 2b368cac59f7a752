"""Calibration readers, streaming statistics, data-driven criteria and bias recovery."""
import numpy as np
import onnx
import pytest
from builders import DIGITS, GraphBuilder, one_line_error, padded_tokens, token_mlp
from click.testing import CliRunner

import onnxprune
from onnxprune import CalibrationSource, Options
from onnxprune.allocate import Plan
from onnxprune.pipeline import prepare
from onnxprune.calibrate import ChannelStats, calibration_batches, collect_stats
from onnxprune.cli import cli
from onnxprune.criteria import ScoringContext, get_criterion
from onnxprune.verify import run


def relu_chain(dead: tuple[int, ...] = ()) -> onnx.ModelProto:
    """conv(3->8)+bias -> relu -> conv(8->4); channels in `dead` have zero weights and a negative bias: always 0."""
    b = GraphBuilder()
    x = b.input(["N", 3, 6, 6])
    w = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
    bias = np.full(8, 0.1, np.float32)
    for c in dead:
        w[c], bias[c] = 0, -1.0
    h = b.op("Relu", [b.op("Conv", [x, b.const(w), b.const(bias)], kernel_shape=[3, 3], pads=[1] * 4)])
    return b.model(b.conv(h, 8, 4))


def samples(n: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 6, 6)).astype(np.float32)}


def test_statistics_equal_numpy_reference():
    model = relu_chain()
    data = samples()
    prepared = prepare(model)
    relu_out = next(n.output[0] for n in prepared.model.graph.node if n.op_type == "Relu")
    stats = collect_stats(prepared.model, {(relu_out, 1)}, calibration_batches(iter([data]), prepared.model))
    probed = onnx.ModelProto()
    probed.CopyFrom(prepared.model)
    probed.graph.output.append(onnx.helper.make_tensor_value_info(relu_out, onnx.TensorProto.FLOAT, None))
    activation = run(probed, data)[1]
    per_channel = np.moveaxis(activation, 1, 0).reshape(8, -1)
    s = stats.channels[(relu_out, 1)]
    np.testing.assert_allclose(s.mean, per_channel.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.mean_abs, np.abs(per_channel).mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.zero_fraction, (per_channel == 0).mean(1))


def test_batches_and_readers_agree(tmp_path):
    model = relu_chain()
    data = samples(20)
    np.savez(tmp_path / "c.npz", x=data["x"])
    np.save(tmp_path / "c.npy", data["x"])

    class Reader:  # onnxruntime.quantization.CalibrationDataReader protocol
        def __init__(self):
            self.batches = iter([{"x": data["x"][:10]}, {"x": data["x"][10:]}])

        def get_next(self):
            return next(self.batches, None)

    prepared = prepare(model)
    probe = {(prepared.model.graph.node[0].output[0], 1)}
    means = [collect_stats(prepared.model, probe, calibration_batches(src, prepared.model, batch_size=7))
             .channels[next(iter(probe))].mean for src in (tmp_path / "c.npz", tmp_path / "c.npy", Reader(),
                                                           [{"x": data["x"]}])]
    for m in means[1:]:
        np.testing.assert_allclose(m, means[0], rtol=1e-5)


def test_statistics_memory_does_not_grow_with_batches():
    stats = ChannelStats()
    rng = np.random.default_rng(0)
    stats.update(rng.standard_normal((4, 8, 5, 5)), 1)
    sizes = [a.nbytes for a in (stats.zeros, stats.total, stats.abs_total, stats.squares)]
    for _ in range(50):
        stats.update(rng.standard_normal((4, 8, 5, 5)), 1)
    assert [a.nbytes for a in (stats.zeros, stats.total, stats.abs_total, stats.squares)] == sizes
    assert stats.count == 51 * 4 * 25


def test_apoz_ranks_an_always_zero_channel_first():
    model = relu_chain(dead=(5,))
    _, report = onnxprune.prune(model, 0.125, Options(criterion="apoz", round_to=1,
                                                      calib=CalibrationSource(iter([samples()]))))
    (group,) = report.plan.keep.values()
    assert 5 not in group and len(group) == 7


def test_bn_criterion_uses_gamma_and_falls_back_where_folded(caplog):
    import builders
    model = builders.conv_bn_relu_chain()
    prepared = prepare(model)
    context = ScoringContext(prepared.analysis.index)
    for group in prepared.analysis.prunable:
        scores = get_criterion("bn")(group, context)
        gamma = next(m for m in group.members if m.role == "scale")
        np.testing.assert_allclose(scores, np.abs(prepared.analysis.index.array(gamma.space[0])))
    assert not context.fallbacks
    _, report = onnxprune.prune(builders.matmul_mlp(), 0.5, Options(criterion="bn"))
    assert report.criterion_fallbacks == 2 and "ranked by l1" in caplog.text


def test_bias_recovery_is_exact_when_removed_channels_are_constant():
    """A dead ReLU channel with a positive bias and zero weights outputs a constant: folding it into the next
    layer's bias loses nothing. Means that would make the outputs worse are not folded in."""
    import copy

    b = GraphBuilder()
    x = b.input(["N", 3, 6, 6])
    w = np.random.default_rng(0).standard_normal((8, 3, 1, 1)).astype(np.float32)
    bias = np.full(8, 0.1, np.float32)
    w[[2, 6]], bias[[2, 6]] = 0, [0.7, 1.3]  # constant 0.7 and 1.3 after the ReLU
    h = b.op("Relu", [b.op("Conv", [x, b.const(w), b.const(bias)], kernel_shape=[1, 1])])
    model = b.model(b.conv(h, 8, 4, k=1))
    data = samples()
    prepared = prepare(model)
    group = next(g for g in prepared.analysis.prunable if g.size == 8)
    plan = Plan({group.id: np.array([0, 1, 3, 4, 5, 7])})
    from onnxprune.recover import recover_bias
    from onnxprune.surgery import apply_plan
    stats = collect_stats(prepared.model, {m.space for m in group.members if not m.constant and
                                           m.space[0] in {n.input[0] for n in prepared.model.graph.node}},
                          calibration_batches(iter([data]), prepared.model))
    original = copy.deepcopy(prepared.model)
    pruned = apply_plan(prepared.model, prepared.analysis, plan)
    assert not np.allclose(run(pruned, data)[0], run(model, data)[0], atol=1e-3)  # pruning alone loses them
    untouched = pruned.SerializeToString()
    for channel_stats in stats.channels.values():
        channel_stats.total = channel_stats.total * -50  # means that would make things worse: left out
    assert recover_bias(pruned, prepared.analysis, plan, stats, original, lambda: iter([data])) == 0
    assert pruned.SerializeToString() == untouched
    for channel_stats in stats.channels.values():
        channel_stats.total = channel_stats.total / -50
    assert recover_bias(pruned, prepared.analysis, plan, stats, original, lambda: iter([data])) == 1
    onnx.checker.check_model(pruned, full_check=True)
    np.testing.assert_allclose(run(pruned, data)[0], run(model, data)[0], atol=1e-5)


def test_bias_recovery_improves_the_trained_model():
    from onnxprune.check import check, load_data
    model = onnx.load(DIGITS)
    feeds, labels = load_data(str(DIGITS.with_suffix("").with_suffix(".test.npz")), model)
    calib = DIGITS.with_suffix("").with_suffix(".calib.npz")
    plain, _ = onnxprune.prune(model, 0.2, Options(round_to=1))
    recovered, report = onnxprune.prune(model, 0.2, Options(round_to=1, recover="bias", calib=CalibrationSource(calib)))
    assert report.recovered_layers >= 4
    assert check(model, recovered, feeds, labels).accuracy_after > check(model, plain, feeds, labels).accuracy_after + 0.3


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def calib_dir(tmp_path):
    return tmp_path


def prune_with(calib, *extra):
    return CliRunner().invoke(cli, [str(DIGITS), "--ratio", "0.5", "-c", "apoz", "--calib", str(calib),
                                    "-o", str(calib.parent / "out.onnx"), *extra])


def test_calibration_errors_are_one_line(calib_dir):
    np.savez(calib_dir / "wrong_name.npz", image=np.zeros((4, 1, 8, 8), np.float32), other=np.zeros(4))
    one_line_error(prune_with(calib_dir / "wrong_name.npz"), 1, "no array for input 'input'")
    np.savez(calib_dir / "wrong_shape.npz", input=np.zeros((4, 1, 7, 7), np.float32))
    one_line_error(prune_with(calib_dir / "wrong_shape.npz"), 1, "expected (N, 1, 8, 8)")
    np.savez(calib_dir / "wrong_type.npz", input=np.zeros((4, 1, 8, 8), np.int64))
    one_line_error(prune_with(calib_dir / "wrong_type.npz"), 1, "'input' is int64, expected float32")
    np.savez(calib_dir / "empty.npz", input=np.zeros((0, 1, 8, 8), np.float32))
    one_line_error(prune_with(calib_dir / "empty.npz"), 1, "no samples")
    one_line_error(prune_with(calib_dir / "missing.npz"), 1, "not found")
    (calib_dir / "model.onnx").write_bytes(DIGITS.read_bytes())
    one_line_error(prune_with(calib_dir / "model.onnx"), 1, "not an .npz or .npy")
    one_line_error(CliRunner().invoke(cli, [str(DIGITS), "--ratio", "0.5", "-c", "apoz"]), 2, "needs calibration")
    assert not (calib_dir / "out.onnx").exists()


def linear_pair(redundant: dict[int, dict[int, float]]) -> onnx.ModelProto:
    """conv(3->8, linear) -> conv(8->4); channel c in `redundant` is a linear combination of kept channels."""
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    b1 = rng.standard_normal(8).astype(np.float32)
    for c, mix in redundant.items():
        w1[c] = sum(k * w1[j] for j, k in mix.items())
        b1[c] = sum(k * b1[j] for j, k in mix.items())
    b = GraphBuilder()
    h = b.op("Conv", [b.input(["N", 3, 6, 6]), b.const(w1), b.const(b1)], kernel_shape=[3, 3], pads=[1] * 4)
    return b.model(b.conv(h, 8, 4))


def test_lsq_recovery_is_exact_when_removed_channels_are_combinations_of_kept_ones():
    import copy

    from onnxprune.recover import recover_lsq
    from onnxprune.surgery import apply_plan
    model = linear_pair({2: {0: 1.0, 1: -0.5}, 5: {3: 2.0}, 6: {4: 0.3, 7: 0.7}})
    prepared = prepare(model)
    group = next(g for g in prepared.analysis.prunable if g.size == 8)
    plan = Plan({group.id: np.array([0, 1, 3, 4, 7])})
    original = copy.deepcopy(prepared.model)
    pruned = apply_plan(prepared.model, prepared.analysis, plan)
    test = samples(8, seed=99)
    assert not np.allclose(run(pruned, test)[0], run(model, test)[0], atol=1e-2)  # pruning alone loses them
    data = [samples(16, seed) for seed in range(4)]
    assert recover_lsq(pruned, original, prepared.analysis, plan, lambda: iter(data)) == 1
    onnx.checker.check_model(pruned, full_check=True)
    np.testing.assert_allclose(run(pruned, test)[0], run(model, test)[0], atol=1e-3, rtol=1e-3)


def test_lsq_survives_degenerate_calibration_data():
    """All-zero inputs make every feature but the bias constant: the ridge keeps the solve finite, and a fit that is
    no better than the current layer leaves it alone."""
    model = relu_chain()
    data = [{"x": np.zeros((4, 3, 6, 6), np.float32)}]
    pruned, report = onnxprune.prune(model, 0.5, Options(round_to=1, recover="lsq", calib=CalibrationSource(data)))
    onnx.checker.check_model(pruned, full_check=True)
    assert all(np.all(np.isfinite(onnx.numpy_helper.to_array(i))) for i in pruned.graph.initializer)
    assert np.all(np.isfinite(run(pruned, samples(4))[0]))


def test_lsq_recovers_the_trained_model():
    from onnxprune.check import check, load_data
    model = onnx.load(DIGITS)
    feeds, labels = load_data(str(DIGITS.with_suffix("").with_suffix(".test.npz")), model)
    calib = DIGITS.with_suffix("").with_suffix(".calib.npz")
    recovered, report = onnxprune.prune(model, 0.5, Options(recover="lsq", calib=CalibrationSource(calib)))
    assert report.macs_after < 0.3 * report.macs_before
    assert check(model, recovered, feeds, labels).accuracy_after >= 0.95


def test_removal_order_prefers_channels_that_cancel():
    from onnxprune.regression import removal_order
    # Channels 0 and 1 contribute opposite signals (together nothing); 2 is small but alone; 3 is large.
    z = np.random.default_rng(0).standard_normal((500, 1))
    contributions = np.hstack([z, -z, 0.3 * np.random.default_rng(1).standard_normal((500, 1)),
                               3 * np.random.default_rng(2).standard_normal((500, 1))])
    gram = contributions.T @ contributions
    order = list(np.argsort(removal_order(gram)))
    assert order[3] == 3  # the large one is removed last
    assert order[0] == 2  # the smallest alone goes first ...
    assert set(order[1:3]) == {0, 1}  # ... then the pair that cancels, before the large one
    scores = removal_order(gram)  # scores are errors: removing everything costs the whole output energy
    np.testing.assert_allclose(scores.max(), gram.sum(), rtol=1e-6)
    np.testing.assert_allclose(removal_order(4 * gram), 4 * scores, rtol=1e-6)


def test_regression_ranks_a_channel_without_contribution_first():
    model = relu_chain()
    consumer = [i for i in model.graph.initializer if list(i.dims) == [4, 8, 3, 3]][0]
    w = onnx.numpy_helper.to_array(consumer).copy()
    w[:, 3] *= 1e-4  # channel 3 barely reaches the consumer's output
    consumer.CopyFrom(onnx.numpy_helper.from_array(w, consumer.name))
    _, report = onnxprune.prune(model, 0.125, Options(criterion="regression", round_to=1,
                                                      calib=CalibrationSource([samples()])))
    (kept,) = report.plan.keep.values()
    assert 3 not in kept and report.criterion_fallbacks == 0


def test_a_folder_of_images_reads_like_the_same_arrays(tmp_path):
    from PIL import Image

    from onnxprune.calibrate import Preprocess
    arrays = np.load(DIGITS.with_suffix("").with_suffix(".calib.npz"))["input"][:20]
    pixels = np.round(arrays[:, 0] * 255).astype(np.uint8)
    for k, image in enumerate(pixels):
        Image.fromarray(image, mode="L").save(tmp_path / f"{k:03d}.png")
    model = onnx.load(DIGITS)
    from_images = list(calibration_batches(tmp_path, model, batch_size=8, preprocess=Preprocess.parse("order=L")))
    assert [len(b["input"]) for b in from_images] == [8, 8, 4]
    np.testing.assert_allclose(np.concatenate([b["input"] for b in from_images]),
                               pixels[:, None].astype(np.float32) / 255, atol=1e-6)
    _, report = onnxprune.prune(model, 0.5, Options(criterion="apoz",
                                                    calib=CalibrationSource(tmp_path, preprocess="order=L")))
    assert report.calibration_samples == 20


def test_image_preprocessing_resize_crop_normalise_layout(tmp_path):
    from PIL import Image

    from onnxprune.calibrate import InputSpec, Preprocess, _image
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    Image.fromarray(rgb).save(tmp_path / "red.png")
    spec = InputSpec("x", np.dtype(np.float32), ("N", 3, 16, 16))
    pre = Preprocess.parse("resize=20,crop=16,mean=0.5:0.5:0.5,std=0.5:0.5:0.5,order=BGR")
    out = _image(tmp_path / "red.png", spec, pre)
    assert out.shape == (3, 16, 16)
    np.testing.assert_allclose(out[:, 8, 8], [-1.0, -1.0, 1.0])  # BGR: red comes last; (1 - 0.5) / 0.5 = 1
    nhwc = InputSpec("x", np.dtype(np.float32), ("N", 16, 16, 3))
    assert _image(tmp_path / "red.png", nhwc, Preprocess.parse("layout=NHWC")).shape == (16, 16, 3)


def test_image_folder_errors(tmp_path):
    one_line_error(prune_with(tmp_path), 1, "no images")
    one_line_error(CliRunner().invoke(cli, [str(DIGITS), "--ratio", "0.5", "-c", "apoz", "--calib", str(tmp_path),
                                            "--preprocess", "size=3"]), 2, "bad --preprocess item 'size=3'")


def test_padding_positions_are_left_out_of_the_statistics():
    prepared = prepare(token_mlp())
    relu_out = next(n.output[0] for n in prepared.model.graph.node if n.op_type == "Relu")
    data = padded_tokens()
    stats = collect_stats(prepared.model, {(relu_out, 2)}, calibration_batches(iter([data]), prepared.model))
    probed = onnx.ModelProto()
    probed.CopyFrom(prepared.model)
    probed.graph.output.append(onnx.helper.make_tensor_value_info(relu_out, onnx.TensorProto.FLOAT, None))
    hidden = run(probed, data)[1]
    real = hidden[data["attention_mask"] == 1]  # (real positions, 16)
    assert stats.mask == "attention_mask" and stats.channels[(relu_out, 2)].count == len(real)
    np.testing.assert_allclose(stats.channels[(relu_out, 2)].mean, real.mean(0), rtol=1e-5, atol=1e-6)


def test_least_squares_rows_are_real_positions_only():
    from onnxprune.layers import describe
    from onnxprune.recover import _rows
    prepared = prepare(token_mlp())
    matmul = describe(next(n for n in prepared.model.graph.node if n.op_type == "MatMul"), prepared.analysis.index)
    data = padded_tokens()
    real = data["attention_mask"] == 1
    target = np.random.default_rng(1).standard_normal((10, 6, 16))
    features, targets = _rows(matmul, data["x"], target, np.random.default_rng(0), 64, real)
    np.testing.assert_array_equal(features[:, :-1], data["x"][real])
    np.testing.assert_array_equal(targets, target[real])
    assert not np.any(features == 50.0)


def test_the_report_names_the_padding_mask():
    calib = CalibrationSource([padded_tokens(seed) for seed in range(3)])
    pruned, report = onnxprune.prune(token_mlp(), 0.5, Options(round_to=1, criterion="activation", recover="lsq",
                                                               calib=calib))
    onnx.checker.check_model(pruned, full_check=True)
    assert report.padding_mask == "attention_mask" and report.to_dict()["padding_mask"] == "attention_mask"
    assert "positions where 'attention_mask' is 0 left out" in "\n".join(report.summary_lines())
    _, plain = onnxprune.prune(relu_chain(), 0.5, Options(criterion="activation", calib=CalibrationSource([samples()])))
    assert plain.padding_mask is None


def matmul_bias_mlp(seed: int = 0) -> onnx.ModelProto:
    """x (N, 8) -> MatMul + Add -> Relu -> MatMul + Add(bias about 10): biases in Adds after the MatMuls."""
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    b = GraphBuilder()
    hidden = b.op("Relu", [b.op("Add", [b.op("MatMul", [b.input(["N", 8]), b.const(f32(8, 16))]),
                                        b.const(f32(16))])])
    out = b.op("MatMul", [hidden, b.const(f32(16, 4))])
    return b.model(b.op("Add", [out, b.const(10 + f32(4))]))


@pytest.mark.parametrize("how", ["channels", "unstructured"])
def test_lsq_keeps_the_bias_an_add_after_a_matmul_holds(how):
    """The fit's target is the MatMul's output, without the bias the Add after it adds: the fitted bias row is an
    offset added to that bias, not the bias itself (which once replaced it, and the outputs lost about 10)."""
    model = matmul_bias_mlp()
    rng = np.random.default_rng(1)
    calib = CalibrationSource([{"x": rng.standard_normal((64, 8)).astype(np.float32)} for _ in range(8)])
    options = Options(round_to=1, recover="lsq", calib=calib, granularity="channel" if how == "channels" else how)
    pruned, report = onnxprune.prune(model, 0.25, options)
    test = {"x": rng.standard_normal((256, 8)).astype(np.float32)}
    before, after = run(model, test)[0], run(pruned, test)[0]
    assert report.recovered_layers >= 1 or how == "unstructured"  # the sparsity step does not count them
    np.testing.assert_allclose(after.mean(0), before.mean(0), atol=1.0)


def three_matmuls() -> onnx.ModelProto:
    """x (N, 8) -> A (8 -> 16) -> Relu -> B (16 -> 16) -> Relu -> C (16 -> 4), each MatMul + Add."""
    rng = np.random.default_rng(3)
    b = GraphBuilder()
    h = b.input(["N", 8])
    for name, (i, o) in zip("ABC", [(8, 16), (16, 16), (16, 4)]):
        h = b.op("Add", [b.op("MatMul", [h, b.const(rng.standard_normal((i, o)).astype(np.float32))]),
                         b.const(rng.standard_normal(o).astype(np.float32))])
        h = b.op("Relu", [h]) if name != "C" else h
    return b.model(h)


def test_lsq_also_refits_the_layers_whose_inputs_drift(monkeypatch):
    """Pruning A's outputs changes B's inputs (it lost channels) and, through B's imperfect fit, C's: both are
    re-fitted, A is not; fitting C too brings the outputs closer than fitting B alone."""
    import copy

    from onnxprune import recover
    from onnxprune.surgery import apply_plan
    model = three_matmuls()
    prepared = prepare(model)
    matmuls = [n for n in prepared.model.graph.node if n.op_type == "MatMul"]
    group = next(g for g in prepared.analysis.prunable if any(m.space[0] == matmuls[0].input[1] for m in g.members))
    plan = Plan({group.id: np.arange(0, 16, 2)})
    names = [layer.node.name for layer in recover.refit_layers(prepared.analysis, plan)]
    assert names == [n.name for n in matmuls[1:]]
    rng = np.random.default_rng(4)
    data = [{"x": rng.standard_normal((64, 8)).astype(np.float32)} for _ in range(8)]
    test = {"x": rng.standard_normal((256, 8)).astype(np.float32)}
    errors = []
    for drift in (False, True):
        if not drift:
            monkeypatch.setattr(recover, "_downstream_of_removals", lambda analysis, plan: set())
        pruned = apply_plan(copy.deepcopy(prepared.model), prepared.analysis, plan)
        assert recover.recover_lsq(pruned, prepared.model, prepared.analysis, plan, lambda: iter(data)) == 1 + drift
        errors.append(float(np.sum((run(pruned, test)[0] - run(model, test)[0]) ** 2)))
        monkeypatch.undo()
    assert errors[1] < errors[0]
