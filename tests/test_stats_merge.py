"""Mergeable calibration statistics (issue 13): `calibrate` writes them, `merge-stats` adds them up, `--stats` prunes
with them. Shards merged prune like one calibration on the whole data; files of another model, of other kinds, or
corrupt are refused in one line."""
import json
import sys

import numpy as np
import onnx
import pytest
from builders import conv_bn_relu_chain, files, invoke, one_line_error, padded_tokens, token_mlp
from onnx import numpy_helper

from onnxprune.distributed import shard_ranges
from onnxprune.pipeline import prepare
from onnxprune.stats_file import model_fingerprint, read_stats

MODELS = {"conv": conv_bn_relu_chain, "tokens": token_mlp}


def conv_data(n: int = 40, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)}


def token_data(n: int = 40) -> dict[str, np.ndarray]:
    parts = [padded_tokens(seed) for seed in range(n // 10)]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


DATA = {"conv": conv_data, "tokens": token_data}


def saved(tmp_path, kind: str) -> tuple:
    """The model and its calibration data as files."""
    model, data = tmp_path / f"{kind}.onnx", tmp_path / f"{kind}.calib.npz"
    onnx.save(MODELS[kind](), model)
    np.savez(data, **DATA[kind]())
    return model, data


def calibrate(model, data, out, *args) -> None:
    result = invoke("calibrate", model, "--calib", data, "--batch-size", 8, "-o", out, "-q", *args)
    assert result.exit_code == 0, result.output
    assert out.exists()


def weights(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def prune(model, out, *args) -> dict:
    """The report, with the kept channels as 'plan' (the --plan-out file)."""
    report, plan = out.with_suffix(".json"), out.with_suffix(".plan.json")
    result = invoke(model, "--ratio", 0.5, "--round-to", 1, "--batch-size", 8, "-o", out, "--report", report,
                    "--plan-out", plan, "-q", *args)
    assert result.exit_code == 0, result.output
    return {**json.loads(report.read_text()), "plan": json.loads(plan.read_text())}


def same_statistics(a, b) -> None:
    assert (a.samples, a.batches, a.fingerprint, a.reads) == (b.samples, b.batches, b.fingerprint, b.reads)
    assert a.channels.keys() == b.channels.keys() and a.grams.keys() == b.grams.keys()
    for space, stats in a.channels.items():
        assert stats.count == b.channels[space].count
        for name in ("zeros", "total", "abs_total", "squares"):
            np.testing.assert_allclose(getattr(stats, name), getattr(b.channels[space], name), rtol=1e-12, atol=1e-9)
    for gid, gram in a.grams.items():
        np.testing.assert_allclose(gram, b.grams[gid], rtol=1e-12, atol=1e-9 * np.abs(gram).max())


@pytest.mark.parametrize("total,step,shards", [(40, 8, 2), (41, 8, 3), (5, 1, 5), (16, 8, 4), (7, 16, 2)])
def test_shard_ranges_are_contiguous_whole_batches(total, step, shards):
    ranges = shard_ranges(total, step, shards)
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(stop == start for (_, stop), (start, _) in zip(ranges, ranges[1:]))
    assert all(start % step == 0 and stop > start for start, stop in ranges)
    assert len(ranges) == min(shards, -(-total // step))


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("criterion", ["apoz", "activation", "fluctuation", "regression"])
def test_two_halves_merged_prune_like_one_calibration(tmp_path, kind, criterion):
    """Same statistics to float64 rounding, same kept channels, same weights (bias recovery included)."""
    model, data = saved(tmp_path, kind)
    args = ("--criterion", criterion, "--recover", "bias")
    for part in ("1/2", "2/2"):
        calibrate(model, data, tmp_path / f"half{part[0]}.npz", *args, "--shard", part)
    calibrate(model, data, tmp_path / "whole.npz", *args)
    assert invoke("merge-stats", tmp_path / "half1.npz", tmp_path / "half2.npz", "-o", tmp_path / "all.npz",
                  "-q").exit_code == 0
    same_statistics(read_stats(tmp_path / "all.npz"), read_stats(tmp_path / "whole.npz"))
    merged = prune(model, tmp_path / "merged.onnx", *args, "--stats", tmp_path / "all.npz", "--calib", data)
    whole = prune(model, tmp_path / "whole.onnx", *args, "--calib", data)
    assert merged["plan"] == whole["plan"] and merged["recovered_layers"] == whole["recovered_layers"]
    assert merged["calibration_samples"] == whole["calibration_samples"] == 40
    expected = weights(tmp_path / "whole.onnx")
    for name, value in weights(tmp_path / "merged.onnx").items():
        np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6)


def test_files_of_split_data_merge_to_the_whole_and_in_any_order(tmp_path):
    """Channel statistics of data split into three files, each calibrated alone, merged in two orders."""
    model, data = saved(tmp_path, "conv")
    whole = conv_data()
    for index, (start, stop) in enumerate([(0, 8), (8, 24), (24, 40)]):
        np.savez(tmp_path / f"d{index}.npz", x=whole["x"][start:stop])
        calibrate(model, tmp_path / f"d{index}.npz", tmp_path / f"s{index}.npz", "--criterion", "activation")
    calibrate(model, data, tmp_path / "whole.npz", "--criterion", "activation")
    s0, s1, s2 = (tmp_path / f"s{i}.npz" for i in range(3))
    assert invoke("merge-stats", s0, s1, "-o", tmp_path / "s01.npz").exit_code == 0
    assert invoke("merge-stats", tmp_path / "s01.npz", s2, "-o", tmp_path / "left.npz").exit_code == 0
    assert invoke("merge-stats", s2, s1, s0, "-o", tmp_path / "right.npz").exit_code == 0
    for merged in ("left.npz", "right.npz"):
        same_statistics(read_stats(tmp_path / merged), read_stats(tmp_path / "whole.npz"))


def test_stats_alone_serve_the_criterion_and_bias_recovery(tmp_path):
    """No --calib at prune time: the criterion's scores and bias recovery come from the file (bias recovery then
    keeps its change without comparing outputs on data)."""
    model, data = saved(tmp_path, "conv")
    calibrate(model, data, tmp_path / "s.npz", "--criterion", "apoz", "--recover", "bias")
    alone = prune(model, tmp_path / "alone.onnx", "--criterion", "apoz", "--recover", "bias",
                  "--stats", tmp_path / "s.npz")
    scored = prune(model, tmp_path / "scored.onnx", "--criterion", "apoz", "--calib", data)
    assert alone["plan"] == scored["plan"] and alone["recovered_layers"] > 0
    assert alone["calibration_samples"] == 40
    onnx.checker.check_model(onnx.load(tmp_path / "alone.onnx"), full_check=True)


def test_fingerprint_follows_graph_and_weights_not_doc_strings():
    model = conv_bn_relu_chain()
    first = model_fingerprint(prepare(model).model)
    model.doc_string, model.graph.node[0].doc_string = "changed", "changed"
    assert model_fingerprint(prepare(model).model) == first
    weight = model.graph.initializer[0]
    array = numpy_helper.to_array(weight).copy()
    array.flat[0] += 1
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    assert model_fingerprint(prepare(model).model) != first


def test_fingerprint_is_the_same_with_weights_on_disk_or_in_memory(tmp_path):
    """An external-data model left on disk (lazy_tensors) and read into memory: one fingerprint, so statistics from
    `calibrate` serve a prune whichever way each opened it."""
    onnx.save(conv_bn_relu_chain(), tmp_path / "m.onnx", save_as_external_data=True, location="m.data",
              size_threshold=0)
    on_disk, in_memory = prepare(tmp_path / "m.onnx", lazy=True).model, prepare(tmp_path / "m.onnx").model
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in on_disk.graph.initializer)
    assert model_fingerprint(on_disk) == model_fingerprint(in_memory) == model_fingerprint(
        prepare(conv_bn_relu_chain()).model)


def test_stats_of_another_model_are_refused(tmp_path):
    model, data = saved(tmp_path, "conv")
    calibrate(model, data, tmp_path / "s.npz", "--criterion", "apoz")
    other = conv_bn_relu_chain()
    other.graph.initializer[0].CopyFrom(numpy_helper.from_array(
        numpy_helper.to_array(other.graph.initializer[0]) * 2, other.graph.initializer[0].name))
    onnx.save(other, tmp_path / "other.onnx")
    result = invoke(tmp_path / "other.onnx", "--ratio", 0.5, "--criterion", "apoz", "--stats", tmp_path / "s.npz",
                    "-o", tmp_path / "out.onnx")
    one_line_error(result, 1, "collected on another model")
    assert not (tmp_path / "out.onnx").exists()
    calibrate(tmp_path / "other.onnx", data, tmp_path / "o.npz", "--criterion", "apoz")
    one_line_error(invoke("merge-stats", tmp_path / "s.npz", tmp_path / "o.npz", "-o", tmp_path / "m.npz"), 1,
                   "another model")


def test_stats_of_other_kinds_are_refused(tmp_path):
    model, data = saved(tmp_path, "conv")
    calibrate(model, data, tmp_path / "apoz.npz", "--criterion", "apoz")
    calibrate(model, data, tmp_path / "regr.npz", "--criterion", "regression")
    (tmp_path / "m.npz").write_bytes(b"old")
    one_line_error(invoke("merge-stats", tmp_path / "apoz.npz", tmp_path / "regr.npz", "-o", tmp_path / "m.npz"), 1,
                   "other statistics")
    assert (tmp_path / "m.npz").read_bytes() == b"old"  # a refused merge leaves the output as it was
    result = invoke(model, "--ratio", 0.5, "--criterion", "regression", "--stats", tmp_path / "apoz.npz",
                    "-o", tmp_path / "out.onnx")
    one_line_error(result, 1, "calibrate for this criterion")


def test_corrupt_or_foreign_files_are_refused(tmp_path):
    model, data = saved(tmp_path, "conv")
    calibrate(model, data, tmp_path / "s.npz", "--criterion", "apoz")
    good = (tmp_path / "s.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(good[:len(good) // 2])
    np.savez(tmp_path / "foreign.npz", x=np.zeros(3))
    with np.load(tmp_path / "s.npz") as loaded:
        arrays = dict(loaded)
    arrays["c0.total"] = arrays["c0.total"][:-1]
    np.savez(tmp_path / "short.npz", **arrays)
    for name, text in [("cut.npz", "is corrupt"), ("foreign.npz", "not an onnxprune statistics file"),
                       ("short.npz", "is corrupt: array 'c0.total'"), ("missing.npz", "not found")]:
        one_line_error(invoke("merge-stats", tmp_path / "s.npz", tmp_path / name, "-o", tmp_path / "m.npz"), 1, text)
        result = invoke(model, "--ratio", 0.5, "--criterion", "apoz", "--stats", tmp_path / name)
        one_line_error(result, 1, text)
    assert "m.npz" not in files(tmp_path)


@pytest.mark.parametrize("args,text", [
    (("--criterion", "l1"), "this run reads none"),
    (("--criterion", "apoz", "--recover", "lsq"), "--recover lsq runs the model on calibration data"),
    (("--criterion", "apoz", "--allocation", "sensitivity"), "allocation sensitivity runs the model"),
    (("--criterion", "apoz", "--schedule", "iterative"), "iterative schedule"),
])
def test_what_stats_cannot_serve_is_said(tmp_path, args, text):
    model, data = saved(tmp_path, "conv")
    calibrate(model, data, tmp_path / "s.npz", "--criterion", "apoz")
    one_line_error(invoke(model, "--ratio", 0.5, "--stats", tmp_path / "s.npz", *args), 2, text)


def test_calibrate_and_merge_usage_errors(tmp_path, monkeypatch):
    model, data = saved(tmp_path, "conv")
    calibrate(model, data, tmp_path / "s.npz", "--criterion", "apoz")
    s = tmp_path / "s.npz"
    cases = [
        (("merge-stats", s, tmp_path / "t.npz", "-o", s), "-o would overwrite"),
        (("merge-stats", s, s, "-o", tmp_path / "m.npz"), "the same file"),
        (("merge-stats", s, "-o", tmp_path / "m.npz"), "two or more"),
        (("calibrate", model, "--criterion", "apoz", "-o", tmp_path / "c.npz"), "needs calibration data"),
        (("calibrate", model, "--calib", data, "--criterion", "l1", "-o", tmp_path / "c.npz"), "nothing to calibrate"),
        (("calibrate", model, "--calib", data, "--criterion", "apoz", "--shard", "3/2", "-o", tmp_path / "c.npz"),
         "between 1 and 2"),
        (("calibrate", model, "--calib", data, "--criterion", "apoz", "--shard", "x", "-o", tmp_path / "c.npz"),
         "--shard takes I/N"),
        (("calibrate", model, "--calib", data, "--criterion", "apoz", "--scheduler", "tcp://h:1", "-o",
          tmp_path / "c.npz"), "--scheduler needs --workers"),
        (("calibrate", model, "--calib", data, "--criterion", "apoz", "-o", data), "-o would overwrite --calib"),
    ]
    for args, text in cases:
        one_line_error(invoke(*args), 2, text)
    monkeypatch.setitem(sys.modules, "dask", None)  # as without the distributed extra
    monkeypatch.setitem(sys.modules, "dask.distributed", None)
    result = invoke("calibrate", model, "--calib", data, "--criterion", "apoz", "--workers", 2, "-o", tmp_path / "c.npz")
    one_line_error(result, 2, "pip install 'onnxprune[distributed]'")
    assert "c.npz" not in files(tmp_path)


def test_a_shard_names_bad_samples_by_their_place_in_the_whole_data(tmp_path):
    model, _ = saved(tmp_path, "conv")
    data = conv_data()
    data["x"][30, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", **data)
    calibrate(model, tmp_path / "nan.npz", tmp_path / "first.npz", "--criterion", "apoz", "--shard", "1/2")
    result = invoke("calibrate", model, "--calib", tmp_path / "nan.npz", "--criterion", "apoz", "--batch-size", 8,
                    "--shard", "2/2", "-o", tmp_path / "second.npz")
    one_line_error(result, 1, "input 'x' has NaN at sample 30")
    assert "second.npz" not in files(tmp_path)
