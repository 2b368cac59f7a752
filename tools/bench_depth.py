"""Least-squares recovery time against depth (issue 13): a chain of N Conv 3x3 + Relu layers built in code, pruned
at --ratio 0.5 with --recover lsq on random calibration data.

    python tools/bench_depth.py [--layers 50,100,200,400,5000] [--channels 16] [--size 8] [--samples 32]
                                [--batch-size 16] [--round-to 8] [--timeout 600]

Each depth runs in its own process (`--child`), so that its peak RSS is its own: the table gives the whole prune's
wall time, the recovery step's (pipeline.recover, timed inside the child), the share of the recovery time against
the first depth's, and the child's peak RSS. A depth that does not finish within --timeout is shown as such.
Run it at another revision with PYTHONPATH=<that tree> (the child imports onnxprune from there).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def chain_model(layers: int, channels: int, size: int, seed: int = 0) -> onnx.ModelProto:
    """x -> (Conv 3x3, padding 1, bias -> Relu) x layers; He-initialised so the activations keep their scale."""
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    scale = np.sqrt(2.0 / (channels * 9))
    for i in range(layers):
        weight = (rng.standard_normal((channels, channels, 3, 3)) * scale).astype(np.float32)
        bias = (rng.standard_normal(channels) * 0.05).astype(np.float32)
        inits += [numpy_helper.from_array(weight, f"w{i}"), numpy_helper.from_array(bias, f"b{i}")]
        nodes.append(helper.make_node("Conv", [current, f"w{i}", f"b{i}"], [f"conv{i}"], name=f"conv_{i}",
                                      pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu_{i}"))
        current = f"relu{i}"
    shape = ["N", channels, size, size]
    graph = helper.make_graph(nodes, f"chain{layers}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def child(args) -> None:
    """Prune the model at args.model with lsq recovery; print the wall times as JSON."""
    import onnxprune
    from onnxprune import pipeline
    spent = {"recover": 0.0}
    timed = pipeline.recover

    def recover(*a, **k):
        start = time.perf_counter()
        try:
            return timed(*a, **k)
        finally:
            spent["recover"] += time.perf_counter() - start

    pipeline.recover = recover
    start = time.perf_counter()
    calib = onnxprune.CalibrationSource(args.calib, batch_size=args.batch_size)
    options = onnxprune.Options(recover="lsq", round_to=args.round_to, calib=calib)
    _, report = onnxprune.prune(args.model, onnxprune.Target.ratio(0.5), options)
    print(json.dumps({"total": time.perf_counter() - start, "recover": spent["recover"],
                      "recovered": report.recovered_layers, "package": os.path.dirname(onnxprune.__file__)}))


def run_depth(layers: int, args, folder: Path) -> dict:
    """One depth in a child process: its times, peak RSS (MiB) and whether it finished."""
    model, calib = folder / f"chain{layers}.onnx", folder / "calib.npz"
    onnx.save(chain_model(layers, args.channels, args.size), model)
    command = [sys.executable, __file__, "--child", "--model", str(model), "--calib", str(calib),
               "--batch-size", str(args.batch_size), "--round-to", str(args.round_to)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    timer = threading.Timer(args.timeout, proc.kill)
    timer.start()
    _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak RSS, which Popen.wait would not give
    timer.cancel()
    out, peak = proc.stdout.read(), usage.ru_maxrss / 1024
    if status != 0 or not out.strip():
        return {"layers": layers, "finished": False, "peak_mib": peak}
    return {"layers": layers, "finished": True, "peak_mib": peak, **json.loads(out.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="50,100,200,400")
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--calib", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    table(args)


def table(args) -> None:
    print(f"chain of Conv 3x3 + Relu, {args.channels} channels, {args.size}x{args.size}, {args.samples} calibration "
          f"samples in batches of {args.batch_size}, --ratio 0.5 --round-to {args.round_to} --recover lsq\n")
    print("| layers | layers re-fitted | prune (s) | recovery (s) | recovery vs first | peak RSS (MiB) |\n"
          "|---|---|---|---|---|---|")
    first = None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = np.random.default_rng(1).standard_normal((args.samples, args.channels, args.size, args.size))
        np.savez(folder / "calib.npz", x=data.astype(np.float32))
        for layers in (int(n) for n in args.layers.split(",")):
            row = run_depth(layers, args, folder)
            if not row["finished"]:
                print(f"| {layers} | | did not finish in {args.timeout:.0f} s | | | {row['peak_mib']:.0f} |",
                      flush=True)
                continue
            first = first or row["recover"]
            print(f"| {layers} | {row['recovered']} | {row['total']:.1f} | {row['recover']:.1f} | "
                  f"{row['recover'] / first:.1f}x | {row['peak_mib']:.0f} |", flush=True)
        print(f"\nonnxprune from {row.get('package', '?')}")


if __name__ == "__main__":
    main()
