"""Slicing the hidden width of all-MiniLM-L6-v2 (--slice, onnxprune/slicing), alone and before head / MLP pruning.

    python tools/bench_slicing.py [--slices 0.1,0.2,0.3] [--targets 0.67,0.5] [--combined-slices 0.1,0.2]
                                  [--criterion regression] [--allocation uniform] [--recover bias,lsq]
                                  [--calib-size 64] [--eval-size 128]

Model, data and metrics as tools/bench_minilm.py (export them first, see there): calibration on the first
`--calib-size` sentences of /tmp/minilm/calib.npz, evaluation on the first `--eval-size` of /tmp/minilm/eval.npz
(disjoint); `cos` is the mean cosine between original and pruned embeddings, `top-1` the retrieval agreement
(each sentence's nearest neighbour among the evaluation sentences is the same), MACs at batch 1 x 64 tokens. Rows:
slicing alone at each share of `--slices`; then, for each MAC target, head / MLP pruning alone and after slicing
each share of `--combined-slices`, with each recovery of `--recover` (the target counts the original's MACs).
"""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import onnx

import onnxprune
from onnxprune import CalibrationSource, Options, Target

from bench_minilm import CALIB, EVAL, MODEL, embed, macs, nearest


def evaluate(model: onnx.ModelProto, eval_data: dict, reference: np.ndarray, reference_nn: np.ndarray,
             macs_before: int, seq: int) -> tuple[float, float, float]:
    emb = embed(model, eval_data, False)
    return (float((emb * reference).sum(1).mean()), float((nearest(emb) == reference_nn).mean()),
            macs(model, seq) / macs_before)


def row(label: str, options: Options, target: Target, context: tuple) -> None:
    start = time.perf_counter()
    pruned, report = onnxprune.prune(context[0], target, options)
    seconds = time.perf_counter() - start
    cos, agree, kept = evaluate(pruned, *context[1:])
    print(f"| {label} | {options.slice or '-'} | {options.recover} | {cos:.4f} | {agree:.4f} | {kept:.1%} | "
          f"{report.params_after / 1e6:.2f}M | {seconds:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", default="0.1,0.2,0.3")
    parser.add_argument("--targets", default="0.67,0.5")
    parser.add_argument("--combined-slices", default="0.1,0.2")
    parser.add_argument("--criterion", default="regression")
    parser.add_argument("--allocation", default="uniform")
    parser.add_argument("--recover", default="bias,lsq")
    parser.add_argument("--calib-size", type=int, default=64)
    parser.add_argument("--eval-size", type=int, default=128)
    args = parser.parse_args()
    logging.getLogger("onnxprune").setLevel(logging.ERROR)

    model = onnx.load(MODEL)
    eval_data = {k: v[:args.eval_size] for k, v in np.load(EVAL).items()}
    seq = eval_data["input_ids"].shape[1]
    reference = embed(model, eval_data, False)
    context = (model, eval_data, reference, nearest(reference), macs(model, seq), seq)
    calib = CalibrationSource(str(CALIB), size=args.calib_size)
    print(f"model {MODEL}; calibration {args.calib_size} sentences, evaluation {args.eval_size} (disjoint); MACs at "
          f"1 x {seq} tokens: {context[4] / 1e6:.0f}M\n")
    print("| setting | slice | recovery | cos | top-1 agree | MACs kept | params | s |")
    print("|---|---|---|---|---|---|---|---|")
    for share in (float(s) for s in args.slices.split(",") if s):
        row("slicing alone", Options(slice=share, calib=calib), Target.ratio(0.0), context)
    for budget in (float(t) for t in args.targets.split(",") if t):
        for recover in args.recover.split(","):
            for share in [0.0, *(float(s) for s in args.combined_slices.split(",") if s)]:
                options = Options(criterion=args.criterion, allocation=args.allocation, recover=recover,
                                  slice=share, calib=calib)
                row(f"{args.criterion}/{args.allocation} to {budget} MACs", options, Target.macs(budget), context)


if __name__ == "__main__":
    main()
