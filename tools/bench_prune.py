"""Benchmark analysis + surgery time and onnxruntime speed-up of pruned models.

    python tools/bench_prune.py [--models resnet50,mobilenet_v2] [--runs 15] [--out bench.json]

For each model (a zoo skeleton from models/zoo, materialised with seeded random weights: timing does not depend on
the values): the in-memory wall time of `onnxprune.prune` (first call and median of 5), the end-to-end CLI wall time
(a fresh process: imports, load, prune, save), and ORT latency with 1 thread (warm-up, then original and pruned runs
interleaved, median of --runs each) at --ratio 0.5 and at the ratio that halves MACs, with and without channel
rounding. Each row gives the MAC reduction beside the latency speed-up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

import onnxprune
from onnxprune import Options
from onnxprune.timing import measure_latency
from onnxprune.testing.skeleton import materialize
from onnxprune.verify import count_macs, random_feeds

ROOT = Path(__file__).resolve().parent.parent


def load_zoo(name: str, exporter: str = "ts") -> onnx.ModelProto:
    return materialize(onnx.load(ROOT / "models" / "zoo" / f"{name}.{exporter}.onnx"))


def prune_times(model: onnx.ModelProto, repeats: int = 5) -> tuple[float, float]:
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        onnxprune.prune(model, 0.5)
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def cli_time(model: onnx.ModelProto) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "m.onnx", Path(tmp) / "out.onnx"
        onnx.save(model, src)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "onnxprune.cli", str(src), "--ratio", "0.5", "-o", str(dst), "-q"],
                       check=True)
        return time.perf_counter() - start


def latency_pair(original: onnx.ModelProto, pruned: onnx.ModelProto, runs: int) -> tuple[float, float]:
    """Interleaved medians (seconds) of single-threaded runs, after warm-up: `onnxprune check`'s timer (timing.py)."""
    timing = measure_latency(original, pruned, random_feeds(original, seed=0), threads=1, runs=runs)
    return timing["before_ms"]["median"] / 1e3, timing["after_ms"]["median"] / 1e3


def ratio_for_half_macs(model: onnx.ModelProto, round_to: int) -> float:
    """Bisect the channel ratio so that the pruned model keeps about half the MACs."""
    total = count_macs(model)
    low, high = 0.0, 0.95
    for _ in range(12):
        mid = (low + high) / 2
        _, report = onnxprune.prune(model, mid, Options(round_to=round_to))
        if report.macs_after > total / 2:
            low = mid
        else:
            high = mid
    return high


def bench_model(name: str, runs: int, round_tos: list[int], sweep: list[float]) -> dict:
    model = load_zoo(name)
    first, median = prune_times(model)
    row = {"model": name, "prune_first_s": first, "prune_median_s": median, "cli_s": cli_time(model), "cases": []}
    for round_to in round_tos:
        cases = [("ratio 0.5", 0.5), ("half MACs", ratio_for_half_macs(model, round_to))]
        cases += [("sweep", r) for r in sweep if round_to == onnxprune.options.DEFAULT_ROUND_TO]
        for label, ratio in cases:
            row["cases"].append(latency_case(model, label, ratio, round_to, runs))
            print(json.dumps({"model": name, **row["cases"][-1]}), flush=True)
    return row


def latency_case(model: onnx.ModelProto, label: str, ratio: float, round_to: int, runs: int) -> dict:
    pruned, report = onnxprune.prune(model, ratio, Options(round_to=round_to))
    before, after = latency_pair(model, pruned, runs)
    mac_cut = report.macs_before / report.macs_after
    return {"target": label, "ratio": round(ratio, 4), "round_to": round_to, "mac_reduction": mac_cut,
            "ms_before": before * 1e3, "ms_after": after * 1e3, "speedup": before / after,
            "speedup_per_mac_reduction": before / after / mac_cut}


def markdown(rows: list[dict]) -> str:
    lines = ["| model | prune in memory (first / median) | CLI end to end |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['prune_first_s']:.3f} s / {r['prune_median_s']:.3f} s | {r['cli_s']:.2f} s |")
    lines += ["", "| model | target | ratio | round-to | MACs cut | ORT ms before → after | speed-up | speed-up / MAC cut |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for c in r["cases"]:
            lines.append(f"| {r['model']} | {c['target']} | {c['ratio']:.3f} | {c['round_to']} | {c['mac_reduction']:.2f}× "
                         f"| {c['ms_before']:.2f} → {c['ms_after']:.2f} | {c['speedup']:.2f}× "
                         f"| {c['speedup_per_mac_reduction']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,mobilenet_v2")
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--round-to", default="1,8,16", help="channel roundings to compare")
    parser.add_argument("--sweep", default="0.1,0.2,0.3,0.4,0.6,0.7,0.8",
                        help="extra ratios measured at the default rounding (never slower than the original?)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    round_tos = [int(r) for r in args.round_to.split(",")]
    sweep = [float(r) for r in args.sweep.split(",")] if args.sweep else []
    rows = [bench_model(name, args.runs, round_tos, sweep) for name in args.models.split(",")]
    print(markdown(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    np.random.seed(0)
    main()
