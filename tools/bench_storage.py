"""File size, load time and latency of packed sparse storage against dense storage (issue 12).

    python tools/bench_storage.py [--models digits,resnet18,mobilenet_v2] [--runs 40] [--loads 5] [--out s.json]

For each model (the digits CNN; zoo skeletons from models/zoo materialised with seeded random weights: sizes and
timings do not depend on the values) and each sparsity (50% unstructured, 2:4), the dense-sparse model is made by
`onnxprune.prune` with that granularity (l1, no data) and packed by `sparsity.packed.pack_model`. Reported:

- raw and gzip (level 9) bytes of the dense original, the dense-sparse file and the packed file; packed / dense-sparse;
- whether the packed model's onnxruntime outputs equal the dense-sparse model's bit for bit (random input);
- session creation time (from the file's bytes, median of --loads, the three models alternating): the packed
  model's rebuild nodes are folded there, once;
- single-thread latency of the dense-sparse and the packed model as a fraction of the dense original's (the three
  sessions interleaved run by run after a warm-up, median of --runs each);
- whether onnxruntime's optimised graph of the packed model has the same nodes as the dense-sparse model's (no
  rebuild node left, the same fusions): the same kernels then run the same weights, whatever the timing noise.
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
import tempfile
import time
from pathlib import Path

import onnx
import onnxruntime as ort

import onnxprune
from onnxprune import Options, Target
from onnxprune.sparsity.packed import pack_model
from onnxprune.testing.skeleton import load_materialized
from onnxprune.timing import timed_run, warm_up
from onnxprune.verify import numpy_io, random_feeds, session

ROOT = Path(__file__).resolve().parent.parent
SPARSITIES = {"unstructured 50%": ("unstructured", 0.5), "2:4": ("2:4", 0.5)}


def load(name: str) -> onnx.ModelProto:
    if name == "digits":
        return onnx.load(ROOT / "models" / "digits_cnn.onnx")
    return load_materialized(ROOT / "models" / "zoo" / f"{name}.ts.onnx")


def sizes(data: bytes) -> dict:
    return {"raw": len(data), "gzip": len(gzip.compress(data, compresslevel=9))}


def creation_ms(files: list[bytes], loads: int) -> list[float]:
    """Median milliseconds to create an onnxruntime session from each file's bytes, the files alternating."""
    times: list[list[float]] = [[] for _ in files]
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = 1, 3
    for _ in range(loads):
        for data, acc in zip(files, times):
            start = time.perf_counter()
            ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            acc.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def optimised_ops(data: bytes) -> list[str]:
    """The op types of the graph onnxruntime runs (after its optimisations, at the default level)."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath, options.log_severity_level = str(Path(tmp) / "optimised.onnx"), 3
        ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node]


def latency_ms(models: list[onnx.ModelProto], feed: dict, runs: int) -> list[float]:
    """Median single-thread milliseconds of each model, the sessions interleaved run by run."""
    sessions = [session(m, threads=1) for m in models]
    warm_up(sessions, feed)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(runs):
        for sess, acc in zip(sessions, times):
            acc.append(timed_run(sess, feed))
    return [statistics.median(t) for t in times]


def bench(name: str, original: onnx.ModelProto, sparsity: str, runs: int, loads: int) -> dict:
    granularity, ratio = SPARSITIES[sparsity]
    sparse, _ = onnxprune.prune(original, Target.ratio(ratio), Options(granularity=granularity, quiet=True))
    packed, storage = pack_model(sparse)
    files = [numpy_io(m).SerializeToString() for m in (original, sparse, packed)]
    feed = random_feeds(original, seed=1)
    same = all(a.tobytes() == b.tobytes() for a, b in zip(session(sparse).run(None, feed),
                                                          session(packed).run(None, feed)))
    created = creation_ms(files, loads)
    latency = latency_ms([original, sparse, packed], feed, runs)
    row = {"model": name, "sparsity": sparsity, "bit_exact": same,
           "same_optimised_graph": optimised_ops(files[1]) == optimised_ops(files[2]), "weights_packed": sum(
        w.storage != "dense" for w in storage.weights), "layer_weights": len(storage.weights)}
    for key, data in zip(("original", "dense_sparse", "packed"), files):
        row[f"{key}_bytes"] = sizes(data)
    row["packed_over_dense"] = {k: row["packed_bytes"][k] / row["dense_sparse_bytes"][k] for k in ("raw", "gzip")}
    row["session_ms"] = dict(zip(("original", "dense_sparse", "packed"), created))
    row["latency_ms"] = dict(zip(("original", "dense_sparse", "packed"), latency))
    row["latency_vs_original"] = {"dense_sparse": latency[1] / latency[0], "packed": latency[2] / latency[0]}
    return row


def line(row: dict) -> str:
    d, p, s, lat = row["dense_sparse_bytes"], row["packed_bytes"], row["session_ms"], row["latency_vs_original"]
    return (f"{row['model']:<13} {row['sparsity']:<17} raw {d['raw'] / 1e6:8.2f} -> {p['raw'] / 1e6:8.2f} MB "
            f"({row['packed_over_dense']['raw']:.3f}x)  gzip {d['gzip'] / 1e6:7.2f} -> {p['gzip'] / 1e6:7.2f} MB "
            f"({row['packed_over_dense']['gzip']:.3f}x)  session {s['original']:7.1f} / {s['dense_sparse']:7.1f} / "
            f"{s['packed']:7.1f} ms  latency vs original {lat['dense_sparse']:.3f} / {lat['packed']:.3f}  "
            f"bit-exact {row['bit_exact']}  same graph run {row['same_optimised_graph']}  "
            f"packed {row['weights_packed']}/{row['layer_weights']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,resnet18,mobilenet_v2")
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        original = load(name)
        for sparsity in SPARSITIES:
            rows.append(bench(name, original, sparsity, args.runs, args.loads))
            print(line(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
