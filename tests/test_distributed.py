"""Calibration shards on a real Dask LocalCluster (issue 13): two workers' statistics, added by the client, equal one
process's. Skipped without the optional `distributed` extra (pip install 'onnxprune[distributed]')."""
import numpy as np
import onnx
import pytest
from builders import conv_bn_relu_chain

from onnxprune.calibrate import CalibrationSource
from onnxprune.distributed import CalibrationRequest, calibrate
from onnxprune.errors import OnnxPruneError

pytest.importorskip("distributed")


@pytest.mark.parametrize("criterion", ["activation", "regression"])
def test_two_local_workers_equal_one_process(tmp_path, criterion):
    """Worker threads (processes=False): a cluster of worker processes computes the same, but starting it (each
    process imports onnxruntime) took about 20 s per test here instead of 2."""
    onnx.save(conv_bn_relu_chain(), tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).standard_normal((36, 3, 8, 8)).astype(np.float32))
    request = CalibrationRequest(tmp_path / "m.onnx", CalibrationSource(tmp_path / "d.npz", batch_size=8),
                                 criterion, recover="bias")
    single = calibrate(request)
    sharded = calibrate(request, workers=2, processes=False)
    assert (sharded.samples, sharded.batches, sharded.fingerprint) == (single.samples, single.batches,
                                                                       single.fingerprint) == (36, 5, single.fingerprint)
    assert sharded.channels.keys() == single.channels.keys() and sharded.grams.keys() == single.grams.keys()
    for space, stats in single.channels.items():
        np.testing.assert_allclose(sharded.channels[space].squares, stats.squares, rtol=1e-12)
        np.testing.assert_array_equal(sharded.channels[space].zeros, stats.zeros)
    for gid, gram in single.grams.items():
        np.testing.assert_allclose(sharded.grams[gid], gram, rtol=1e-12, atol=1e-12 * np.abs(gram).max())


def test_an_error_on_a_worker_is_the_one_line_error_of_one_process(tmp_path):
    onnx.save(conv_bn_relu_chain(), tmp_path / "m.onnx")
    data = np.random.default_rng(0).standard_normal((36, 3, 8, 8)).astype(np.float32)
    data[30, 1] = np.inf
    np.savez(tmp_path / "d.npz", x=data)
    request = CalibrationRequest(tmp_path / "m.onnx", CalibrationSource(tmp_path / "d.npz", batch_size=8), "apoz")
    with pytest.raises(OnnxPruneError, match="input 'x' has Inf at sample 30"):
        calibrate(request, workers=2, processes=False)
