"""The pipeline's contract: one target and one options object, checked before any work; calibration data opened
once and read by every step from there."""
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxprune
from onnxprune import CalibrationSource, Options, Target
from onnxprune import calibrate

MODELS = Path(__file__).resolve().parent.parent / "models"
DIGITS = MODELS / "digits_cnn.onnx"
DIGITS_CALIB = MODELS / "digits_cnn.calib.npz"


@pytest.mark.parametrize("target, options, message", [
    (Target.ratio(1.0), Options(), "ratio must be in"),
    (Target.macs(0.0), Options(), "target-macs must be in"),
    (Target.latency(0.5), Options(allocation="sensitivity"), "target-latency needs uniform or global"),
    (Target.ratio(0.5), Options(criterion="apoz"), "criterion apoz needs calibration data"),
    (Target.ratio(0.5), Options(recover="lsq"), "recovery needs calibration data"),
    (Target.ratio(0.5), Options(latency_table="t.json"), "--latency-table needs --target-latency"),
    (Target.ratio(0.5), Options(schedule="iterative", steps=0), "steps must be at least 1"),
    (Target.plan("p.json"), Options(schedule="iterative"), "iterative schedule chooses its own plan"),
])
def test_bad_requests_fail_before_any_work(target, options, message):
    with pytest.raises(onnxprune.UsageError, match=message):
        onnxprune.prune("no-such-model.onnx", target, options)  # the model is never opened


def test_a_number_is_a_ratio():
    model = onnx.load(DIGITS)
    short, _ = onnxprune.prune(model, 0.5)
    tagged, _ = onnxprune.prune(model, Target.ratio(0.5))
    assert short.SerializeToString() == tagged.SerializeToString()


def test_calibration_file_is_read_once_for_scoring_and_every_recovered_layer(monkeypatch):
    reads = []
    original = calibrate.load_arrays
    monkeypatch.setattr(calibrate, "load_arrays", lambda *a: reads.append(a) or original(*a))
    _, report = onnxprune.prune(onnx.load(DIGITS), 0.5, Options(criterion="activation", recover="lsq",
                                                                 calib=CalibrationSource(DIGITS_CALIB)))
    assert report.recovered_layers >= 2 and report.calibration_samples == 256
    assert len(reads) == 1


def test_a_reader_is_drawn_once_and_replayed_from_memory():
    data = np.load(DIGITS_CALIB)["input"][:64]

    class Reader:
        calls = 0

        def get_next(self):
            Reader.calls += 1
            start = (Reader.calls - 1) * 16
            return {"input": data[start:start + 16]} if start < len(data) else None

    _, report = onnxprune.prune(onnx.load(DIGITS), 0.5, Options(recover="lsq", calib=CalibrationSource(Reader())))
    assert report.recovered_layers >= 2 and report.calibration_samples == 64
    assert Reader.calls == 5  # four batches and the end


def test_sensitivity_reads_at_most_calib_size_samples():
    model = onnx.load(DIGITS)
    first = np.load(DIGITS_CALIB)["input"][:8]
    limited = onnxprune.sensitivity(model, Options(round_to=1, calib=CalibrationSource(DIGITS_CALIB, size=8)))
    only_those = onnxprune.sensitivity(model, Options(round_to=1, calib=CalibrationSource([{"input": first}])))
    everything = onnxprune.sensitivity(model, Options(round_to=1, calib=CalibrationSource(DIGITS_CALIB)))
    damage = lambda curves: [p["damage"] for g in curves["groups"] for p in g["points"]]  # noqa: E731
    assert damage(limited) == damage(only_those)
    assert damage(limited) != damage(everything)
