"""Slicing the hidden width (onnxprune.slicing): on pre-LN and post-LN transformer encoders built in code
(LayerNormalization, its decomposed form, RMSNorm), nothing sliced gives the original outputs (the folded means and
affine parameters and the rotations are exact), more sliced loses more, the output is always a valid model with the
same inputs and outputs, a model without a residual stream is left as it is with the reason, and the CLI runs it
end to end."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from builders import DIGITS, DIGITS_CALIB, ROOT, GraphBuilder, invoke, one_line_error

import onnxprune
from onnxprune import CalibrationSource, Options, Target
from onnxprune.slicing import slice_hidden
from onnxprune.testing.skeleton import materialize
from onnxprune.verify import check_valid, count_macs, count_params, io_signature, random_feeds, run

WIDTH, LENGTH = 16, 6


def layer_norm(b: GraphBuilder, x: str, form: str) -> str:
    """LayerNorm over the last axis as one op or decomposed (the variance as the mean of squared deviations, or of
    squares less the squared mean; tf2onnx's form), or an RMSNorm, with a random scale and shift."""
    gamma = b.const(b.rng.uniform(0.5, 1.5, WIDTH).astype(np.float32))
    beta = b.const((b.rng.standard_normal(WIDTH) * 0.1).astype(np.float32))
    if form == "op":
        return b.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=1e-5)
    if form == "tf2onnx":  # x * s + (beta - mean * s), s = gamma / sqrt(variance + eps), means by GlobalAveragePool
        mean = b.op("GlobalAveragePool", [x])
        deviation = b.op("Sub", [x, mean])
        variance = b.op("GlobalAveragePool", [b.op("Mul", [deviation, deviation])])
        root = b.op("Sqrt", [b.op("Add", [variance, b.const(np.array(1e-5, np.float32))])])
        scale = b.op("Mul", [b.op("Reciprocal", [root]), gamma])
        shift = b.op("Add", [b.op("Mul", [b.op("Neg", [mean]), scale]), beta])
        return b.op("Add", [b.op("Mul", [x, scale]), shift])
    centred, mean = x, b.op("ReduceMean", [x], axes=[-1], keepdims=1) if form != "rms" else None
    if form in ("decomposed", "moments"):
        centred = b.op("Sub", [x, mean])
    if form == "moments":  # jax2onnx's: E[x^2] - E[x]^2, clipped at 0
        moments = b.op("Sub", [b.op("ReduceMean", [b.op("Mul", [x, x])], axes=[-1]), b.op("Mul", [mean, mean])])
        variance = b.op("Max", [moments, b.const(np.array(0.0, np.float32))])
    else:
        variance = b.op("ReduceMean", [b.op("Pow", [centred, b.const(np.array(2.0, np.float32))])], axes=[-1])
    root = b.op("Sqrt", [b.op("Add", [variance, b.const(np.array(1e-5, np.float32))])])
    scaled = b.op("Mul", [b.op("Div", [centred, root]), gamma])
    return scaled if form == "rms" else b.op("Add", [scaled, beta])


def attention(b: GraphBuilder, h: str) -> str:
    """One-head self-attention over the sequence axis, then the output projection (with bias)."""
    q, k, v = (b.matmul(h, WIDTH, WIDTH) for _ in range(3))
    scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 2, 1])])
    weights = b.op("Softmax", [b.op("Mul", [scores, b.const(np.array(WIDTH ** -0.5, np.float32))])], axis=-1)
    return b.matmul(b.op("MatMul", [weights, v]), WIDTH, WIDTH)


def mlp(b: GraphBuilder, h: str) -> str:
    return b.matmul(b.op("Relu", [b.matmul(h, WIDTH, 4 * WIDTH)]), 4 * WIDTH, WIDTH)


def post_ln_encoder(form: str = "op", layers: int = 2, seed: int = 0) -> onnx.ModelProto:
    """BERT's layout: token and position embeddings, a norm, then per block LN(x + attention(x)) and
    LN(x + mlp(x)); the last norm's output is the graph output (rebuilt at full width)."""
    b = GraphBuilder(seed)
    ids = b.input(["N", LENGTH], "ids", onnx.TensorProto.INT64)
    words = b.op("Gather", [b.weight(50, WIDTH, scale=1.0), ids], axis=0)
    positions = b.const((b.rng.standard_normal((1, LENGTH, WIDTH)) * 0.5).astype(np.float32))
    h = layer_norm(b, b.op("Add", [words, positions]), form)
    for _ in range(layers):
        h = layer_norm(b, b.op("Add", [attention(b, h), h]), form)
        h = layer_norm(b, b.op("Add", [mlp(b, h), h]), form)
    return b.model(h)


def pre_ln_encoder(form: str = "op", layers: int = 2, seed: int = 0) -> onnx.ModelProto:
    """GPT's / ViT's layout: an input projection, per block x + attention(LN(x)) and x + mlp(LN(x)), a final norm
    read by a classifier head (a folded reader, not an exit)."""
    b = GraphBuilder(seed)
    x = b.matmul(b.input(["N", LENGTH, 8]), 8, WIDTH)
    for _ in range(layers):
        x = b.op("Add", [x, attention(b, layer_norm(b, x, form))])
        x = b.op("Add", [x, mlp(b, layer_norm(b, x, form))])
    return b.model(b.matmul(layer_norm(b, x, form), WIDTH, 3))


def moved_rows_encoder(form: str = "op", seed: int = 0) -> onnx.ModelProto:
    """Pre-LN blocks whose layers see the stream through last-axis-keeping Reshapes and Transposes, as exporters
    write them: a Gemm on (N * L, width) rows (Reshape there and back) and MatMuls on a sequence-first layout
    (Transpose there and back)."""
    b = GraphBuilder(seed)
    x = b.matmul(b.input([4, LENGTH, 8]), 8, WIDTH)  # a fixed batch: MACs count the Gemm's rows
    rows = b.op("Reshape", [layer_norm(b, x, form), b.const(np.array([-1, WIDTH], np.int64))])
    hidden = b.op("Relu", [b.gemm(rows, WIDTH, 4 * WIDTH)])
    x = b.op("Add", [x, b.op("Reshape", [b.gemm(hidden, 4 * WIDTH, WIDTH), b.const(np.array([-1, LENGTH, WIDTH]))])])
    first = b.op("Transpose", [layer_norm(b, x, form)], perm=[1, 0, 2])
    x = b.op("Add", [x, b.op("Transpose", [mlp(b, first)], perm=[1, 0, 2])])
    return b.model(b.matmul(layer_norm(b, x, form), WIDTH, 3))


def shared_input_encoder(form: str = "op", seed: int = 0) -> onnx.ModelProto:
    """Norms reading the graph input (a sum of one term, projected in) and a sum that a Transpose pair also reads
    (rebuilt at full width for it) and hands back into the next sum (projected in again)."""
    b = GraphBuilder(seed)
    x = b.input(["N", LENGTH, WIDTH])
    h = b.op("Add", [x, mlp(b, layer_norm(b, x, form))])
    moved = b.op("Transpose", [b.op("Transpose", [h], perm=[0, 2, 1])], perm=[0, 2, 1])
    h = b.op("Add", [moved, mlp(b, layer_norm(b, h, form))])
    return b.model(b.matmul(layer_norm(b, h, form), WIDTH, 3))


MODELS = {f"{name}-{form}": (build, form) for name, build in (("post_ln", post_ln_encoder), ("pre_ln", pre_ln_encoder))
          for form in ("op", "decomposed", "moments", "rms", "tf2onnx")}
MODELS["moved_rows-op"] = (moved_rows_encoder, "op")
MODELS["shared_input-op"] = (shared_input_encoder, "op")


def model_named(name: str, seed: int = 0) -> onnx.ModelProto:
    build, form = MODELS[name]
    return build(form, seed=seed)


def feeds_of(model: onnx.ModelProto, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """`count` batches of 4 random samples for the model's one input (token ids, or features)."""
    rng = np.random.default_rng(seed)
    vi = model.graph.input[0]
    if vi.type.tensor_type.elem_type == onnx.TensorProto.INT64:
        return [{vi.name: rng.integers(0, 50, (4, LENGTH))} for _ in range(count)]
    features = vi.type.tensor_type.shape.dim[-1].dim_value
    return [{vi.name: rng.standard_normal((4, LENGTH, features)).astype(np.float32)} for _ in range(count)]


def relative_error(model: onnx.ModelProto, other: onnx.ModelProto, feeds: list[dict]) -> float:
    expected = np.concatenate([run(model, f)[0] for f in feeds])
    got = np.concatenate([run(other, f)[0] for f in feeds])
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


def require_valid(sliced: onnx.ModelProto, original: onnx.ModelProto) -> None:
    check_valid(sliced)
    onnx.shape_inference.infer_shapes(sliced, check_type=True, strict_mode=True)
    assert io_signature(sliced) == io_signature(original)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_nothing_sliced_gives_the_original_outputs(name):
    model = model_named(name)
    result = slice_hidden(model, lambda: feeds_of(model, 4, 0), 0.0)
    assert result.sliced and result.kept == WIDTH, result.description
    require_valid(result.model, model)
    held_out = feeds_of(model, 2, 1)
    for feed in held_out:
        np.testing.assert_allclose(run(result.model, feed)[0], run(model, feed)[0], rtol=1e-4, atol=2e-5)
    ops = {n.op_type for n in result.model.graph.node}
    assert "LayerNormalization" not in ops and "ReduceMean" not in ops  # every norm is now an RMS norm
    assert "0 projections in" in result.description or name.startswith("shared_input")  # all writers rotated


@pytest.mark.parametrize("name", ["post_ln-op", "pre_ln-decomposed", "pre_ln-rms", "moved_rows-op"])
def test_slicing_more_loses_more_and_is_smaller(name):
    model = model_named(name, seed=3)
    calibration, held_out = feeds_of(model, 8, 0), feeds_of(model, 4, 1)
    errors, macs = [], []
    for fraction in (0.0, 0.25, 0.5, 0.75):
        result = slice_hidden(model, lambda: calibration, fraction)
        require_valid(result.model, model)
        errors.append(relative_error(model, result.model, held_out))
        macs.append(count_macs(result.model))
        assert fraction == 0 or count_params(result.model) < count_params(model)
    assert errors[0] < 1e-5 and all(a < b for a, b in zip(errors, errors[1:])), errors
    assert macs[-1] < macs[1] < count_macs(model), macs


def test_gemm_with_one_bias_for_all_outputs_is_projected_not_rotated():
    """A Gemm writing the stream with a scalar C cannot have its outputs rotated: it is projected in, exactly."""
    b = GraphBuilder(0)
    x = b.input([4, LENGTH, WIDTH])
    rows = b.op("Reshape", [layer_norm(b, x, "op"), b.const(np.array([-1, WIDTH], np.int64))])
    gemm = b.op("Gemm", [rows, b.weight(WIDTH, WIDTH), b.const(np.array([0.3], np.float32))], transB=1)
    h = b.op("Add", [x, b.op("Reshape", [gemm, b.const(np.array([4, LENGTH, WIDTH], np.int64))])])
    model = b.model(b.matmul(layer_norm(b, h, "op"), WIDTH, 3))
    feeds = feeds_of(model, 3, 0)
    result = slice_hidden(model, lambda: feeds, 0.0)
    assert "2 projections in" in result.description
    require_valid(result.model, model)
    np.testing.assert_allclose(run(result.model, feeds[1])[0], run(model, feeds[1])[0], rtol=1e-4, atol=2e-5)


def test_principal_directions_of_real_positions_only():
    """Padded positions (attention_mask 0) are left out of the Gram matrices: huge values there change nothing."""
    model = post_ln_encoder()
    graph = model.graph
    graph.input.append(onnx.helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["N", LENGTH]))
    graph.output.append(onnx.helper.make_tensor_value_info("mask_out", onnx.TensorProto.INT64, None))
    graph.node.append(onnx.helper.make_node("Identity", ["attention_mask"], ["mask_out"]))
    rng = np.random.default_rng(0)
    mask = np.ones((4, LENGTH), np.int64)
    mask[:, 4:] = 0
    clean = [{"ids": rng.integers(0, 50, (4, LENGTH)), "attention_mask": mask} for _ in range(4)]
    noisy = [{"ids": np.where(mask == 1, f["ids"], 49), "attention_mask": mask} for f in clean]
    first = slice_hidden(model, lambda: clean, 0.5).model
    second = slice_hidden(model, lambda: noisy, 0.5).model
    weights = lambda m: [i for i in m.graph.initializer if i.name.startswith("slicing/")]  # noqa: E731
    for a, b in zip(weights(first), weights(second)):
        np.testing.assert_allclose(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b), atol=1e-5)


@pytest.mark.parametrize("name", ["jax_vit_encoder.jax2onnx", "keras_transformer_block.tf2onnx"])
def test_zoo_transformers_slice_valid(name):
    """Exported transformers as a new user gives them: exact with nothing sliced, valid when sliced (or left as
    they are, with the reason)."""
    model = materialize(onnx.load(ROOT / "models" / "zoo" / f"{name}.onnx"))
    feeds = [random_feeds(model, seed=s) for s in range(2)]
    exact = slice_hidden(model, lambda: feeds, 0.0)
    require_valid(exact.model, model)
    for got, expected in zip(run(exact.model, feeds[0]), run(model, feeds[0])):
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(expected).max())))
    sliced = slice_hidden(model, lambda: feeds, 0.25)
    require_valid(sliced.model, model)
    assert sliced.sliced or sliced.description.startswith("not sliced: ")


def test_model_without_a_stream_is_left_as_it_is():
    model = onnx.load(DIGITS)
    result = slice_hidden(model, lambda: [], 0.5)
    assert not result.sliced and result.description.startswith("not sliced: no LayerNormalization")
    assert count_params(result.model) == count_params(model)


def test_pipeline_slices_then_prunes_channels_to_a_mac_target():
    """--slice composes with channel pruning: the MAC target is the original's, met by both together; lsq
    recovery fits the pruned writers to the original's outputs projected into the sliced basis."""
    model = post_ln_encoder(layers=2, seed=5)
    calibration = feeds_of(model, 8, 0)
    options = Options(criterion="l1", recover="lsq", round_to=1, slice=0.25,
                      calib=CalibrationSource(calibration))
    pruned, report = onnxprune.prune(model, Target.macs(0.6), options)
    require_valid(pruned, model)
    assert report.slicing.startswith(f"hidden width {WIDTH} -> 12")
    assert report.target["met"] and report.macs_after <= 0.62 * report.macs_before, report.target
    assert report.macs_before == count_macs(model) and report.recovered_layers > 0
    assert relative_error(model, pruned, feeds_of(model, 2, 1)) < 1.0
    reasons = [item["reason"] for item in report.frozen_reasons]
    assert "the hidden width --slice sliced stays whole" in reasons, reasons  # not an --exclude the user never gave


def test_lsq_after_slicing_fits_projections_in_to_the_original():
    """A layer slicing adds (a projection into a sum) that loses input channels is re-fitted against the original's
    values projected the same way: the reference computes it too."""
    model = shared_input_encoder(seed=2)
    options = Options(recover="lsq", round_to=1, slice=0.5, calib=CalibrationSource(feeds_of(model, 4, 0)))
    pruned, report = onnxprune.prune(model, Target.ratio(0.5), options)
    require_valid(pruned, model)
    assert report.slicing.startswith("hidden width") and report.recovered_layers > 0


def test_pipeline_reads_a_python_reader_once():
    """A get_next() reader is read once: slicing keeps its batches for the channel steps and recovery."""
    model = pre_ln_encoder(layers=1)
    batches = iter(feeds_of(model, 4, 0))
    reader = type("Reader", (), {"get_next": lambda self: next(batches, None)})()
    options = Options(criterion="activation", recover="bias", round_to=1, slice=0.25, calib=CalibrationSource(reader))
    pruned, report = onnxprune.prune(model, Target.ratio(0.25), options)
    require_valid(pruned, model)
    assert report.calibration_samples == 16 and report.slicing.startswith("hidden width")


def test_cli_end_to_end(tmp_path):
    model = pre_ln_encoder(layers=1)
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((16, LENGTH, 8)).astype(np.float32))
    result = invoke(tmp_path / "m.onnx", "--ratio", 0.25, "--slice", 0.25, "--calib", tmp_path / "calib.npz",
                    "--round-to", 1, "-o", tmp_path / "out.onnx", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    assert f"slicing     hidden width {WIDTH} -> 12 at 3 norms" in result.output
    assert json.loads((tmp_path / "r.json").read_text())["slicing"].startswith("hidden width")
    require_valid(onnx.load(tmp_path / "out.onnx"), model)


def test_cli_slice_needs_calibration(tmp_path):
    onnx.save(pre_ln_encoder(layers=1), tmp_path / "m.onnx")
    one_line_error(invoke(tmp_path / "m.onnx", "--ratio", 0.25, "--slice", 0.25), 2, "--slice needs calibration")


def test_cli_model_without_stream_says_why(tmp_path):
    result = invoke(DIGITS, "--ratio", 0.25, "--slice", 0.25, "--calib", DIGITS_CALIB, "-o", tmp_path / "out.onnx")
    assert result.exit_code == 0, result.output
    assert "slicing     not sliced: no LayerNormalization" in result.output
