"""Latency reached with --target-latency 0.5 against --target-macs 0.5 on zoo CNNs.

    python tools/bench_targets.py [--models mobilenet_v2,resnet50,densenet121:dynamo] [--runs 21]
                                  [--targets target_macs,target_latency] [--round-to 16,1]

Each model (a zoo skeleton with seeded random weights; NAME:dynamo for the dynamo export) is pruned to each target with and without channel rounding,
then original and pruned run interleaved (1 thread, warm-up, median of --runs). "widths ÷ 8": pruned groups whose
width is a multiple of 8.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune import latency_pair, load_zoo  # noqa: E402

import onnxprune  # noqa: E402
from onnxprune import Options, Target  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenet_v2,resnet50")
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--targets", default="target_macs,target_latency")
    parser.add_argument("--round-to", default="16,1")
    args = parser.parse_args()
    print("| model | target | round-to | MACs kept | ORT ms before → after | latency kept | widths ÷ 8 | prune s |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in args.models.split(","):
        name, _, exporter = spec.partition(":")
        model = load_zoo(name, exporter or "ts")
        for round_to in map(int, args.round_to.split(",")):
            for target in args.targets.split(","):
                start = time.perf_counter()
                pruned, report = onnxprune.prune(model, Target(target.removeprefix("target_"), 0.5),
                                                 Options(round_to=round_to))
                seconds = time.perf_counter() - start
                before, after = latency_pair(model, pruned, args.runs)
                widths = [g["kept"] for g in report.pruned_groups]
                print(f"| {spec} | --{target.replace('_', '-')} 0.5 | {round_to} | "
                      f"{report.macs_after / report.macs_before:.1%} | {before * 1e3:.2f} → {after * 1e3:.2f} | "
                      f"{after / before:.1%} | {sum(w % 8 == 0 for w in widths)}/{len(widths)} | {seconds:.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
