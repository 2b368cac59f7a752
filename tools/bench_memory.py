"""Peak memory of pruning a model past RAM (issue 13).

Builds a chain of MatMuls with external data, tensor by tensor (the default, nine 8192 x 8192 float32 weights, is a
2.4 GB model), prunes it with the command line in a subprocess, and reports that process's peak resident set
(getrusage of the finished child, ru_maxrss: memory-mapped weight pages it touched count too) against the model
size, with the wall time and the output's size. The model is deleted afterwards (unless --keep).

    python tools/bench_memory.py                         # 9 x 8192 x 8192, --ratio 0.5
    python tools/bench_memory.py --width 4096 --check    # also run both models in onnxruntime (--check)
    python tools/bench_memory.py --source /tmp/before    # an older onnxprune tree (git archive COMMIT | tar -x)
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROWS_AT_A_TIME = 1024  # rows of a weight generated and written at once, so building needs little memory


def build(folder: Path, width: int, layers: int, seed: int = 0) -> Path:
    """x (N, width) -> [MatMul -> Relu] x (layers - 1) -> MatMul; weights in `chain.onnx.data`, written row block by
    row block; returns the model's path."""
    rng, data, nodes, inits = np.random.default_rng(seed), folder / "chain.onnx.data", [], []
    with open(data, "wb") as handle:
        for k in range(layers):
            offset = handle.tell()
            for start in range(0, width, ROWS_AT_A_TIME):
                rows = min(ROWS_AT_A_TIME, width - start)
                handle.write((rng.standard_normal((rows, width), np.float32) / np.float32(np.sqrt(width))).tobytes())
            inits.append(_external(f"w{k}", width, data.name, offset, handle.tell() - offset))
            nodes.append(helper.make_node("MatMul", [f"h{k}", f"w{k}"], [f"m{k}"], name=f"matmul{k}"))
            nodes.append(helper.make_node("Relu", [f"m{k}"], [f"h{k + 1}"], name=f"relu{k}"))
    nodes[-1] = helper.make_node("Identity", [f"m{layers - 1}"], ["y"], name="out")
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["N", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "chain.onnx"
    onnx.save_model(model, path)
    return path


def _external(name: str, width: int, location: str, offset: int, length: int) -> TensorProto:
    """A width x width float32 initializer whose data is `length` bytes at `offset` of `location`."""
    proto = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[width, width])
    proto.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        proto.external_data.add(key=key, value=value)
    return proto


def prune(model: Path, output: Path, ratio: float, check: bool, source: str | None) -> tuple[int, float, int]:
    """Run the command line on `model`: (its exit status, wall seconds, peak RSS in bytes)."""
    env = dict(os.environ, PYTHONPATH=source) if source else None  # run from there too: `-c` puts the working
    command = [sys.executable, "-c", "from onnxprune.cli import main; main()", str(model), "--ratio", str(ratio),
               "-o", str(output), "--quiet"] + (["--check"] if check else [])
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, cwd=source)  # folder first on sys.path
    _, status, usage = os.wait4(child.pid, 0)
    return os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss * 1024


def folder_bytes(folder: Path, prefix: str) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith(prefix))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=9)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--check", action="store_true", help="also compare both models in onnxruntime (--check)")
    parser.add_argument("--source", help="PYTHONPATH of the onnxprune tree to measure (default: the installed one)")
    parser.add_argument("--folder", type=Path, help="where to build the model (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the model and the output")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="bench-memory-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        model = build(folder, args.width, args.layers)
        code, seconds, peak = prune(model, folder / "pruned.onnx", args.ratio, args.check, args.source)
        size, largest = folder_bytes(folder, "chain.onnx"), args.width * args.width * 4
        print(f"{args.layers} x {args.width}x{args.width} float32: model {size / 2**30:.2f} GiB, largest tensor "
              f"{largest / 2**20:.0f} MiB; --ratio {args.ratio}{' --check' if args.check else ''}: exit {code}, "
              f"{seconds:.1f} s, peak RSS {peak / 2**20:.0f} MiB ({peak / largest:.1f}x the largest tensor), "
              f"output {folder_bytes(folder, 'pruned.onnx') / 2**20:.0f} MiB")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
