"""Top-1 accuracy of the trained digits model after pruning, by criterion, recovery and ratio.

    python tools/bench_accuracy.py [--ratios 0.2,0.3,0.5] [--criteria l1,apoz,bn,activation,regression]
                                   [--recover none,bias,lsq] [--round-to 1]

Calibration: models/digits_cnn.calib.npz (256 samples of the training split); evaluation: the 540-sample held-out
split models/digits_cnn.test.npz.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import onnx

import onnxprune
from onnxprune import CalibrationSource, Options
from onnxprune.check import check, load_data

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "digits_cnn.onnx"
DATA, CALIB = ROOT / "models" / "digits_cnn.test.npz", ROOT / "models" / "digits_cnn.calib.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.2,0.3,0.5")
    parser.add_argument("--criteria", default="l1,l2,random,apoz,bn,activation,regression")
    parser.add_argument("--recover", default="none,bias,lsq")
    parser.add_argument("--round-to", type=int, default=1)
    args = parser.parse_args()
    logging.getLogger("onnxprune").setLevel(logging.ERROR)
    model = onnx.load(MODEL)
    feeds, labels = load_data(str(DATA), model)
    ratios = [float(r) for r in args.ratios.split(",")]
    header = " | ".join(f"ratio {r}" for r in ratios)
    print(f"| criterion | recovery | {header} |\n|---|---|" + "---|" * len(ratios))
    for criterion in args.criteria.split(","):
        for recover in args.recover.split(","):
            cells = []
            for ratio in ratios:
                start = time.perf_counter()
                options = Options(criterion=criterion, round_to=args.round_to, recover=recover,
                                  calib=CalibrationSource(CALIB))
                pruned, report = onnxprune.prune(model, ratio, options)
                result = check(model, pruned, feeds, labels)
                cells.append(f"{result.accuracy_after:.4f} ({report.macs_after / report.macs_before:.0%} MACs, "
                             f"{time.perf_counter() - start:.1f} s)")
            print(f"| {criterion} | {recover} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
