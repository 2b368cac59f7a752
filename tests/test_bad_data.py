"""Nothing silently wrong: NaN / Inf in calibration and check data, statistics that overflow, recovery that would
write non-finite weights, malformed plans and out-of-range options each end in one line on stderr, the right exit
code and no model written (issue 11)."""
import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import DIGITS, DIGITS_CALIB, GraphBuilder, files, invoke, one_line_error
from onnx import numpy_helper

import onnxprune
from onnxprune import least_squares
from onnxprune import recover as recover_module
from onnxprune import CalibrationSource, Options
from onnxprune.allocate import Plan
from onnxprune.calibrate import Preprocess, calibration_batches, collect_stats, reject_nonfinite
from onnxprune.errors import OnnxPruneError, UsageError
from onnxprune.pipeline import prepare
from onnxprune.recover import recover_bias, recover_lsq, refit_layers, require_finite_weights
from onnxprune.surgery import apply_plan


def digits_calib(folder: Path, name: str, change, dtype=np.float32) -> Path:
    """The digits calibration data with `change` applied to its input array, saved as `name` (.npz or .npy)."""
    x = np.load(DIGITS_CALIB)["input"].astype(dtype)
    change(x)
    path = folder / name
    np.save(path, x) if name.endswith(".npy") else np.savez(path, input=x)
    return path


def set_at(sample: int, value: float):
    def change(x: np.ndarray) -> None:
        x[sample, 0, 2, 3] = value
    return change


def prune_cli(tmp_path: Path, *args: object):
    """Prune the digits model to tmp_path/out.onnx; the result, and whether the model was written."""
    result = invoke(DIGITS, "--ratio", 0.5, "-o", tmp_path / "out.onnx", *args)
    return result, "out.onnx" in files(tmp_path)


# ------------------------------------------------------------------------------------------------ data

@pytest.mark.parametrize("options", [("--recover", "bias"), ("--recover", "lsq"), ("--criterion", "activation"),
                                     ("--criterion", "regression"), ("--allocation", "sensitivity")])
def test_nan_in_calibration_data_names_the_input_and_the_sample(tmp_path, options):
    """Sample 17 is in the second batch of 16: the index counts from the start of the data."""
    calib = digits_calib(tmp_path, "nan.npz", set_at(17, np.nan))
    result, written = prune_cli(tmp_path, "--calib", calib, *options)
    one_line_error(result, 1, "calibration input 'input' has NaN at sample 17")
    assert not written


def test_inf_in_an_npy_and_all_nan_data_are_refused(tmp_path):
    calib = digits_calib(tmp_path, "inf.npy", set_at(5, -np.inf))
    result, written = prune_cli(tmp_path, "--calib", calib, "--criterion", "apoz", "--batch-size", 4)
    one_line_error(result, 1, "calibration input 'input' has Inf at sample 5")
    calib = digits_calib(tmp_path, "nan.npz", lambda x: x.fill(np.nan))
    result, written_too = prune_cli(tmp_path, "--calib", calib, "--criterion", "activation")
    one_line_error(result, 1, "calibration input 'input' has NaN at sample 0")
    assert not written and not written_too


@pytest.mark.filterwarnings("error")
def test_float64_values_beyond_float32_are_refused_without_numpy_warnings(tmp_path):
    calib = digits_calib(tmp_path, "huge.npz", set_at(3, 1e300), dtype=np.float64)
    result, written = prune_cli(tmp_path, "--calib", calib, "--recover", "bias")
    one_line_error(result, 1, "calibration input 'input' has Inf at sample 3")
    assert not written


def test_a_python_reader_counts_samples_across_its_batches():
    x = np.load(DIGITS_CALIB)["input"][:24].copy()
    x[11, 0, 0, 0] = np.nan
    source = CalibrationSource([{"input": x[:8]}, {"input": x[8:16]}, {"input": x[16:]}])
    with pytest.raises(OnnxPruneError, match="calibration input 'input' has NaN at sample 11"):
        onnxprune.prune(onnx.load(DIGITS), 0.5, Options(criterion="activation", calib=source))


def test_check_data_with_nan_is_refused(tmp_path):
    data = digits_calib(tmp_path, "data.npz", set_at(9, np.nan))
    result = invoke("check", DIGITS, DIGITS, "--data", data)
    one_line_error(result, 1, f"data {data} input 'input' has NaN at sample 9")
    result, written = prune_cli(tmp_path, "--check", "--data", data)
    one_line_error(result, 1, "has NaN at sample 9")
    assert not written


def test_reject_nonfinite_leaves_integers_and_finite_floats_alone():
    arrays = {"ids": np.arange(6).reshape(3, 2), "x": np.ones((3, 2), np.float16)}
    assert reject_nonfinite(arrays, "calibration") is arrays
    with pytest.raises(OnnxPruneError, match="calibration input 'x' has Inf at sample 12"):
        reject_nonfinite({"x": np.array([[1.0], [np.inf]])}, "calibration", first_sample=11)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("options", [("--criterion", "activation"), ("--criterion", "regression"),
                                     ("--recover", "lsq"), ("--recover", "bias"), ("--allocation", "sensitivity")])
def test_finite_data_that_overflows_the_activations_is_refused(tmp_path, options):
    """3e38 is a float32, but the first conv's outputs are not: every path that measures on the data says so in
    one line, naming the tensor, instead of numpy warnings and statistics made of Inf and NaN."""
    calib = digits_calib(tmp_path, "big.npz", lambda x: x.fill(3e38))
    result, written = prune_cli(tmp_path, "--calib", calib, *options)
    one_line_error(result, 1, "not finite")
    assert not written


# ------------------------------------------------------------------------------------------------ recovery

def constant_channel_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """conv(3->8, 1x1) -> relu -> conv(8->4, 1x1) with calibration samples."""
    b = GraphBuilder()
    h = b.op("Relu", [b.conv(b.input(["N", 3, 6, 6]), 3, 8, k=1)])
    model = b.model(b.conv(h, 8, 4, k=1))
    return model, {"x": np.random.default_rng(0).standard_normal((16, 3, 6, 6)).astype(np.float32)}


def pruned_setup(model: onnx.ModelProto, data: dict[str, np.ndarray], with_stats: bool = True):
    """(prepared, plan, statistics of the pruned channels' tensor, original copy, pruned model)."""
    prepared = prepare(model)
    group = next(g for g in prepared.analysis.prunable if g.size == 8)
    plan = Plan({group.id: np.array([0, 1, 3, 4, 5, 7])})
    tensors = {n.input[0] for n in prepared.model.graph.node}
    stats = collect_stats(prepared.model, {m.space for m in group.members if not m.constant and m.space[0] in tensors},
                          calibration_batches(iter([data]), prepared.model)) if with_stats else None
    original = copy.deepcopy(prepared.model)
    return prepared, plan, stats, original, apply_plan(prepared.model, prepared.analysis, plan)


def test_a_nan_statistic_is_not_folded_into_a_bias():
    model, data = constant_channel_model()
    prepared, plan, stats, original, pruned = pruned_setup(model, data)
    untouched = pruned.SerializeToString()
    for channel_stats in stats.channels.values():
        channel_stats.total[:] = np.nan
    assert recover_bias(pruned, prepared.analysis, plan, stats) == 0
    assert recover_bias(pruned, prepared.analysis, plan, stats, original, lambda: iter([data])) == 0
    assert pruned.SerializeToString() == untouched


@pytest.mark.parametrize("fit", [np.nan, np.inf, 1e300])
def test_lsq_keeps_the_layer_when_the_fit_is_not_finite(monkeypatch, fit):
    """A NaN or Inf solution, or one beyond float32 (Inf once written in the model's type), is not applied."""
    model, data = constant_channel_model()
    prepared, plan, _, original, pruned = pruned_setup(model, data, with_stats=False)
    untouched = pruned.SerializeToString()
    monkeypatch.setattr(least_squares, "dense_solver", lambda sums, ridge, prior: np.full_like(prior, fit))
    assert recover_lsq(pruned, original, prepared.analysis, plan, lambda: iter([data])) == 0
    assert pruned.SerializeToString() == untouched


def test_lsq_keeps_the_layer_when_the_error_is_nan(monkeypatch):
    model, data = constant_channel_model()
    prepared, plan, _, original, pruned = pruned_setup(model, data, with_stats=False)
    monkeypatch.setattr(recover_module.NormalEquations, "error", lambda self, weights: float("nan"))
    assert recover_lsq(pruned, original, prepared.analysis, plan, lambda: iter([data])) == 0


def test_a_model_with_non_finite_recovered_weights_is_refused():
    model, data = constant_channel_model()
    prepared, plan, _, _, pruned = pruned_setup(model, data, with_stats=False)
    require_finite_weights(pruned, prepared.analysis, plan, "lsq")
    layer = refit_layers(prepared.analysis, plan)[0]
    weight = next(i for i in pruned.graph.initializer if i.name == layer.weight)
    array = numpy_helper.to_array(weight).copy()
    array.flat[0] = np.nan
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    require_finite_weights(pruned, prepared.analysis, plan, "none")  # surgery alone computes nothing
    with pytest.raises(OnnxPruneError, match=f"lsq recovery left NaN or Inf in '{layer.weight}'"):
        require_finite_weights(pruned, prepared.analysis, plan, "lsq")


# ------------------------------------------------------------------------------------------------ plans

def break_duplicate_keep(plan: dict) -> None:
    plan["groups"][0]["keep"][1] = plan["groups"][0]["keep"][0]


PLAN_DAMAGE = {
    "duplicate keep": (break_duplicate_keep, "'keep' lists channel"),
    "group twice": (lambda p: p["groups"].append(p["groups"][0]), "twice"),
    "no keep": (lambda p: p["groups"][0].pop("keep"), "group 0 has no 'keep'"),
    "no channels": (lambda p: p["groups"][0].pop("channels"), "group 0 has no 'channels'"),
    "no groups": (lambda p: p.pop("groups"), "'groups' is missing"),
    "groups not a list": (lambda p: p.update(groups={"a": 1}), "'groups' is not a list"),
    "group not an object": (lambda p: p["groups"].__setitem__(0, [1, 2]), "group 0 is not an object"),
    "keep not ints": (lambda p: p["groups"][0].update(keep=["a", 1]), "'keep' is not a list of integers"),
    "keep a number": (lambda p: p["groups"][0].update(keep=3), "'keep' is not a list of integers"),
    "keep floats": (lambda p: p["groups"][0].update(keep=[0.0, 1.0]), "'keep' is not a list of integers"),
    "keep out of range": (lambda p: p["groups"][0]["keep"].append(9999), "'keep' has channel 9999, outside"),
    "keep negative": (lambda p: p["groups"][0]["keep"].append(-1), "'keep' has channel -1, outside"),
    "weights not pairs": (lambda p: p["groups"][0].update(weights="conv"), "'weights' is not a list"),
    "weights empty": (lambda p: p["groups"][0].update(weights=[]), "'weights' is not a list"),
    "channels text": (lambda p: p["groups"][0].update(channels="32"), "'channels' is not a positive integer"),
}


@pytest.fixture(scope="module")
def digits_plan(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("plan")
    result = invoke(DIGITS, "--ratio", 0.5, "-o", folder / "p.onnx", "--plan-out", folder / "plan.json", "-q")
    assert result.exit_code == 0, result.output
    return json.loads((folder / "plan.json").read_text())


@pytest.mark.parametrize("damage", sorted(PLAN_DAMAGE))
def test_a_malformed_plan_is_one_line_naming_the_file(tmp_path, digits_plan, damage):
    change, text = PLAN_DAMAGE[damage]
    plan = copy.deepcopy(digits_plan)
    change(plan)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(plan))
    result = invoke(DIGITS, "--plan-in", path, "-o", tmp_path / "out.onnx")
    one_line_error(result, 1, text)
    assert str(path) in result.stderr and "out.onnx" not in files(tmp_path)


def test_the_undamaged_plan_still_applies(tmp_path, digits_plan):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(digits_plan))
    result = invoke(DIGITS, "--plan-in", path, "-o", tmp_path / "out.onnx", "-q")
    assert result.exit_code == 0, result.output
    assert "out.onnx" in files(tmp_path)


# ------------------------------------------------------------------------------------------------ options

@pytest.mark.parametrize("spec, text", [("resize=0", "resize=0"), ("crop=0", "crop=0"), ("crop=-5", "crop=-5"),
                                        ("scale=0", "scale=0"), ("std=0.2:0:0.2", "std of 0"),
                                        ("mean=0.5:0.5", "mean has 2 values"), ("scale=nan", "finite"),
                                        ("order=L,std=1:2:3", "std has 3 values")])
def test_preprocess_values_that_cannot_make_an_input_are_usage_errors(tmp_path, spec, text):
    with pytest.raises(UsageError, match=text):
        Preprocess.parse(spec)
    result, written = prune_cli(tmp_path, "--calib", DIGITS_CALIB, "--preprocess", spec, "--criterion", "activation")
    one_line_error(result, 2, text)
    assert not written


def test_a_negative_seed_is_a_usage_error_and_any_other_works(tmp_path):
    result, written = prune_cli(tmp_path, "--criterion", "random", "--seed", -1)
    one_line_error(result, 2, "--seed")
    assert not written
    with pytest.raises(UsageError, match="seed"):
        onnxprune.prune(onnx.load(DIGITS), 0.5, Options(criterion="random", seed=-1))
    result, written = prune_cli(tmp_path, "--criterion", "random", "--seed", 2 ** 40, "-q")
    assert result.exit_code == 0 and written, result.output
