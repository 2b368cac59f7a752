"""Top-1 accuracy of the trained digits model after pruning, by criterion and ratio (no recovery).

    python tools/bench_accuracy.py [--ratios 0.1,0.2,0.3,0.5] [--round-to 1,16]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import onnx

import onnxprune
from onnxprune.verify import evaluate, load_eval_data

ROOT = Path(__file__).resolve().parent.parent
MODEL, DATA = ROOT / "models" / "digits_cnn.onnx", ROOT / "models" / "digits_cnn.test.npz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.5")
    parser.add_argument("--round-to", default="1,16")
    parser.add_argument("--criteria", default="l1,l2,random")
    args = parser.parse_args()
    model = onnx.load(MODEL)
    feeds, labels = load_eval_data(str(DATA), model)
    print("| criterion | round-to | ratio | MACs kept | top-1 (original 0.9963) |\n|---|---|---|---|---|")
    for criterion in args.criteria.split(","):
        for round_to in (int(r) for r in args.round_to.split(",")):
            for ratio in (float(r) for r in args.ratios.split(",")):
                pruned, report = onnxprune.prune(model, ratio=ratio, criterion=criterion, round_to=round_to)
                result = evaluate(model, pruned, feeds, labels)
                print(f"| {criterion} | {round_to} | {ratio} | {report.macs_after / report.macs_before:.1%} "
                      f"| {result.accuracy_after:.4f} |")


if __name__ == "__main__":
    main()
