"""Unstructured and N:M sparsity on trained models: the metric kept by criterion, recovery and sparsity, and the time
and peak memory of sparsegpt and lsq against the layer count (issue 12).

    python tools/bench_sparsity.py digits [--settings 0.5,0.7,2:4,4:8] [--criteria l1,wanda,sparsegpt]
                                          [--recover none,lsq] [--calib-size 256]
    python tools/bench_sparsity.py minilm ...     # needs /tmp/minilm from tools/export_minilm.py
    python tools/bench_sparsity.py ocr ...        # needs /tmp/ppocr from tools/bench_sparsity.py ocr-data
    python tools/bench_sparsity.py scaling [--layers 2,4,8,16] [--width 256]
    (any of them with --refit-times: each masked least-squares re-fit's layer shape and seconds on stderr)

A setting is an unstructured share (0.5: half of every layer's weights zeroed) or an N:M pattern. Models and
metrics, calibration and evaluation always disjoint:

- digits: models/digits_cnn.onnx, calibration models/digits_cnn.calib.npz (training split), top-1 accuracy on the
  540 held-out samples of models/digits_cnn.test.npz;
- minilm: all-MiniLM-L6-v2 (tools/export_minilm.py), calibration /tmp/minilm/calib.npz (256 sentences), on the 512
  evaluation sentences the mean cosine between the original and sparse embeddings and the retrieval agreement
  (each sentence's nearest neighbour is the same; see tools/bench_minilm.py);
- ocr: PP-OCRv4's text recogniser from the rapidocr_onnxruntime wheel, on text lines rendered here (see
  `ocr_data`): calibration 128 lines, evaluation 256 other lines; character accuracy of the greedy CTC decoding
  against the rendered text (1 - edit distance / length).
- scaling: a MatMul + Relu chain of L layers (width x width) on random data, with sparsegpt and with lsq at 2:4:
  wall time and the peak of Python-side allocations (tracemalloc: numpy arrays, not onnxruntime's arena).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

import onnxprune
from onnxprune import CalibrationSource, Options, Target
from onnxprune.check import check, load_data

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))


def options(setting: str, criterion: str, recover: str, calib: CalibrationSource) -> tuple[Target | None, Options]:
    """The target and options of one setting: a share of unstructured zeros, or an N:M pattern."""
    granularity = setting if ":" in setting else "unstructured"
    target = Target.ratio(float(setting)) if granularity == "unstructured" else None
    return target, Options(granularity=granularity, criterion=criterion, recover=recover, calib=calib)


def table(name: str, metric, model: onnx.ModelProto, calib: CalibrationSource, args) -> None:
    """One row per criterion and recovery, one cell per setting: the metric (its dense value in the header)."""
    settings = args.settings.split(",")
    print(f"\n{name}: dense {metric(model)}\n\n| criterion | recovery | " + " | ".join(settings) + " |\n|---|---|"
          + "---|" * len(settings))
    for criterion in args.criteria.split(","):
        for recover in args.recover.split(","):
            cells = []
            for setting in settings:
                start = time.perf_counter()
                sparse, _ = onnxprune.prune(model, *options(setting, criterion, recover, calib))
                cells.append(f"{metric(sparse)} ({time.perf_counter() - start:.0f} s)")
            print(f"| {criterion} | {recover} | " + " | ".join(cells) + " |", flush=True)


def digits(args) -> None:
    model = onnx.load(ROOT / "models" / "digits_cnn.onnx")
    feeds, labels = load_data(str(ROOT / "models" / "digits_cnn.test.npz"), model)
    calib = CalibrationSource(ROOT / "models" / "digits_cnn.calib.npz", size=args.calib_size)
    table("digits CNN, top-1 accuracy", lambda m: f"{check(model, m, feeds, labels).accuracy_after:.4f}", model,
          calib, args)


def minilm(args) -> None:
    from bench_minilm import CALIB, EVAL, MODEL, embed, nearest
    model = onnx.load(MODEL)
    data = dict(np.load(EVAL))
    reference = embed(model, data, static=False)
    neighbours = nearest(reference)

    def metric(m: onnx.ModelProto) -> str:
        emb = embed(m, data, static=False)
        return f"cos {float((emb * reference).sum(1).mean()):.4f}, top-1 {float((nearest(emb) == neighbours).mean()):.3f}"
    table("all-MiniLM-L6-v2, 512 sentences", metric, model, CalibrationSource(CALIB, size=args.calib_size), args)


def ocr(args) -> None:
    from ocr_lines import CALIB, MODEL, character_accuracy, load_eval
    model = onnx.load(MODEL)
    images, texts, charset = load_eval()
    table("PP-OCRv4 rec, character accuracy on 256 rendered lines",
          lambda m: f"{character_accuracy(m, images, texts, charset):.4f}", model,
          CalibrationSource(CALIB, size=args.calib_size, batch_size=8), args)


def chain(layers: int, width: int) -> onnx.ModelProto:
    """x (N, 16, width) -> [MatMul (width x width) + Add -> Relu] x layers."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for k in range(layers):
        w = (rng.standard_normal((width, width)) * np.sqrt(2 / width)).astype(np.float32)
        inits += [helper.make_tensor(f"w{k}", TensorProto.FLOAT, w.shape, w.ravel()),
                  helper.make_tensor(f"b{k}", TensorProto.FLOAT, [width], np.zeros(width, np.float32))]
        nodes += [helper.make_node("MatMul", [x, f"w{k}"], [f"m{k}"], name=f"mm{k}"),
                  helper.make_node("Add", [f"m{k}", f"b{k}"], [f"a{k}"], name=f"add{k}"),
                  helper.make_node("Relu", [f"a{k}"], [f"r{k}"], name=f"relu{k}")]
        x = f"r{k}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16, width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 16, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def scaling(args) -> None:
    print(f"\n| layers ({args.width} x {args.width}) | setting | seconds | peak MB (numpy) |\n|---|---|---|---|")
    for layers in [int(n) for n in args.layers.split(",")]:
        model = chain(layers, args.width)
        data = [{"x": np.random.default_rng(1).standard_normal((16, 16, args.width)).astype(np.float32)}
                for _ in range(8)]
        for criterion, recover in (("l1", "none"), ("sparsegpt", "none"), ("l1", "lsq"), ("sparsegpt", "lsq")):
            tracemalloc.start()
            start = time.perf_counter()
            onnxprune.prune(model, None, Options(granularity="2:4", criterion=criterion, recover=recover,
                                                 calib=CalibrationSource(data)))
            seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1] / 2 ** 20
            tracemalloc.stop()
            print(f"| {layers} | 2:4 {criterion} + {recover} | {seconds:.1f} | {peak:.0f} |", flush=True)


def time_refits() -> None:
    """Print every masked least-squares call (layer shape, largest kept count, seconds) to stderr."""
    from onnxprune.sparsity import sparsify
    inner = sparsify.masked_refit

    def timed(system, current, keep):
        start = time.perf_counter()
        fitted = inner(system, current, keep)
        print(f"refit {current.shape[0]} features x {current.shape[1]} outputs, at most {keep.sum(1).max()} kept:"
              f" {time.perf_counter() - start:.2f} s", file=sys.stderr, flush=True)
        return fitted
    sparsify.masked_refit = timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["digits", "minilm", "ocr", "ocr-data", "scaling"])
    parser.add_argument("--settings", default="0.5,0.7,2:4,4:8")
    parser.add_argument("--criteria", default="l1,wanda,sparsegpt")
    parser.add_argument("--recover", default="none,lsq")
    parser.add_argument("--calib-size", type=int, default=None)
    parser.add_argument("--layers", default="2,4,8,16")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--refit-times", action="store_true", help="time each masked least-squares call (stderr)")
    args = parser.parse_args()
    if args.refit_times:
        time_refits()
    logging.getLogger("onnxprune").setLevel(logging.ERROR)
    if args.model == "ocr-data":
        from ocr_lines import write_data
        write_data()
        return
    {"digits": digits, "minilm": minilm, "ocr": ocr, "scaling": scaling}[args.model](args)


if __name__ == "__main__":
    main()
