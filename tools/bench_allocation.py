"""Accuracy of the digits model at equal MACs: allocation (uniform / global / sensitivity) and schedule
(one-shot / iterative), each with no, bias and least-squares recovery.

    python tools/bench_allocation.py [--targets 0.5,0.3] [--criterion l1]
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import onnx

import onnxprune
from onnxprune import CalibrationSource, Options, Target
from onnxprune.check import check, load_data

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_cnn.onnx"
DATA, CALIB = ROOT / "models" / "digits_cnn.test.npz", ROOT / "models" / "digits_cnn.calib.npz"
VARIANTS = [("uniform", "oneshot"), ("global", "oneshot"), ("sensitivity", "oneshot"), ("uniform", "iterative")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="0.5,0.3")
    parser.add_argument("--criterion", default="l1")
    parser.add_argument("--recover", default="none,bias,lsq")
    args = parser.parse_args()
    logging.getLogger("onnxprune").setLevel(logging.ERROR)
    model = onnx.load(MODEL)
    feeds, labels = load_data(DATA, model)
    recoveries = args.recover.split(",")
    print("| target MACs | allocation | schedule | " + " | ".join(f"recover {r}" for r in recoveries) + " |")
    print("|---|---|---|" + "---|" * len(recoveries))
    for target in (float(t) for t in args.targets.split(",")):
        for allocation, schedule in VARIANTS:
            cells = []
            for recover in recoveries:
                options = Options(allocation=allocation, schedule=schedule, steps=3, criterion=args.criterion,
                                  round_to=1, recover=recover, calib=CalibrationSource(CALIB))
                pruned, report = onnxprune.prune(model, Target.macs(target), options)
                top1 = check(model, pruned, feeds, labels).accuracy_after
                cells.append(f"{top1:.4f} ({report.macs_after / report.macs_before:.1%})")
            print(f"| {target} | {allocation} | {schedule} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
