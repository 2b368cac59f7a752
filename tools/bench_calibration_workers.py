"""Calibration time in one process vs shards on a Dask LocalCluster (issue 13), and that both give the same statistics.

    python tools/bench_calibration_workers.py --model digits --samples 16384 --criterion regression --workers 2
    python tools/bench_calibration_workers.py --model mobilenet_v2 --samples 64 --criterion activation --workers 2

`digits` is models/digits_cnn.onnx with its calibration set tiled to --samples; a zoo name is that skeleton
materialised with seeded random weights and fed seeded normal images. One process runs once with onnxruntime's
default threads (what `onnxprune calibrate` does) and once with one intra-op thread (what each worker gets on a
2-core machine). Times are wall clock of
`onnxprune.distributed.calibrate` end to end (model load and normalisation, sessions, every batch, for the workers
also starting and closing the LocalCluster of worker processes, whose start is timed alone as well), with the
machine's 1-minute load average before and after (on a shared machine the figures follow it). Needs the
`distributed` extra.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from onnxprune.calibrate import CalibrationSource
from onnxprune.distributed import CalibrationRequest, calibrate, calibrate_range
from onnxprune.testing.skeleton import materialize

ROOT = Path(__file__).resolve().parent.parent


def model_and_data(name: str, samples: int, folder: Path) -> tuple[Path, Path]:
    """The model and `samples` calibration samples, as files the workers open."""
    data = folder / "calib.npz"
    if name == "digits":
        calib = np.load(ROOT / "models" / "digits_cnn.calib.npz")["input"]
        np.savez(data, input=np.resize(calib, (samples, *calib.shape[1:])))
        return ROOT / "models" / "digits_cnn.onnx", data
    model = materialize(onnx.load(ROOT / "models" / "zoo" / f"{name}.ts.onnx"))
    onnx.save(model, folder / "model.onnx")
    first = model.graph.input[0]
    shape = [samples] + [d.dim_value for d in first.type.tensor_type.shape.dim[1:]]
    np.savez(data, **{first.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)})
    return folder / "model.onnx", data


def timed(run) -> tuple[float, object]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def cluster_start(workers: int) -> float:
    from dask.distributed import Client, LocalCluster
    start = time.perf_counter()
    with LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None) as cluster:
        with Client(cluster):
            return time.perf_counter() - start


def largest_difference(a, b) -> float:
    """The largest difference between two statistics files' sums, relative to each array's largest value."""
    pairs = [(x.total, b.channels[space].total) for space, x in a.channels.items()]
    pairs += [(a.grams[g], b.grams[g]) for g in a.grams]
    return max((float(np.abs(x - y).max() / max(np.abs(x).max(), 1e-30)) for x, y in pairs), default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("--criterion", default="regression")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        model, data = model_and_data(args.model, args.samples, Path(folder))
        request = CalibrationRequest(model, CalibrationSource(data, batch_size=args.batch_size), args.criterion)
        single_s, single = timed(lambda: calibrate(request))
        one_thread_s, _ = timed(lambda: calibrate_range(request, None, None, threads=1))
        start_s = cluster_start(args.workers)
        sharded_s, sharded = timed(lambda: calibrate(request, workers=args.workers))
    print(json.dumps({"model": args.model, "samples": single.samples, "criterion": args.criterion,
                      "single_s": round(single_s, 2), "single_one_thread_s": round(one_thread_s, 2),
                      "workers": args.workers, "workers_s": round(sharded_s, 2),
                      "cluster_start_s": round(start_s, 2), "speed_up": round(single_s / sharded_s, 2),
                      "largest_relative_difference": largest_difference(single, sharded),
                      "load_average": [round(load, 1), round(os.getloadavg()[0], 1)], "cores": os.cpu_count()}))


if __name__ == "__main__":
    main()
