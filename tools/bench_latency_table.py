"""How well the per-layer latency table predicts the measured latency of whole pruned models.

    python tools/bench_latency_table.py [--models mobilenet_v2,resnet50] [--runs 21]

For each zoo model (seeded random weights) and uniform ratios 0.3 / 0.5 / 0.7, three sets of widths: rounded to
multiples of 16, the same minus one channel in every group (unaligned), and unrounded. For each, the table's
predicted latency (fraction of the original's) against the measured one (original and pruned interleaved, 1 thread,
median of --runs).
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune import latency_pair, load_zoo  # noqa: E402

from onnxprune.allocate import Plan, uniform_counts  # noqa: E402
from onnxprune.pipeline import prepare  # noqa: E402
from onnxprune.latency import LatencyCache, LatencyModel, LayerTimer  # noqa: E402
from onnxprune.surgery import apply_plan  # noqa: E402
from onnxprune.timing import OrtTimer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenet_v2,resnet50")
    parser.add_argument("--ratios", default="0.3,0.5,0.7")
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    print("| model | ratio | widths | predicted | measured | error |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        prepared = prepare(load_zoo(name), ())
        start = time.perf_counter()
        table = LatencyModel(prepared.model, prepared.analysis, LayerTimer(OrtTimer(), LatencyCache(), prepared.model))
        full = table.cost({})
        for ratio in map(float, args.ratios.split(",")):
            aligned = uniform_counts(prepared.analysis, ratio, 16)
            variants = {"multiples of 16": aligned,
                        "multiples of 16, minus 1": {g: max(1, n - 1) for g, n in aligned.items()},
                        "unrounded": uniform_counts(prepared.analysis, ratio, 1)}
            for label, counts in variants.items():
                predicted = table.cost(counts) / full
                plan = Plan({g: np.arange(n) for g, n in counts.items()})
                pruned = apply_plan(copy.deepcopy(prepared.model), prepared.analysis, plan)
                before, after = latency_pair(prepared.model, pruned, args.runs)
                measured = after / before
                print(f"| {name} | {ratio} | {label} | {predicted:.1%} | {measured:.1%} | "
                      f"{predicted - measured:+.1%} |", flush=True)
        print(f"<!-- {name}: {table.measured} one-layer models measured in {time.perf_counter() - start:.1f} s "
              f"(including the whole-model measurements) -->", flush=True)


if __name__ == "__main__":
    main()
