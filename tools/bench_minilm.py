"""Embedding quality of the trained sentence encoder all-MiniLM-L6-v2 after pruning, by criterion, recovery and ratio.

First export the model and the tokenized sentences, in the torch venv (see tools/export_minilm.py):

    HF_HUB_OFFLINE=1 /work/venv-torch/bin/python tools/export_minilm.py        # writes /tmp/minilm/*

then bench, in the system Python (onnxprune, onnx, onnxruntime, numpy; no torch):

    python tools/bench_minilm.py [--ratios 0.25,0.5] [--criteria l1,apoz,activation,regression]
                                 [--recover none,bias,lsq] [--round-to 16] [--calib-size N] [--static]
                                 [--calib-trim] [--exclude attention]

Model /tmp/minilm/minilm.onnx (inputs input_ids, attention_mask of dynamic batch x sequence; output the mean-pooled,
L2-normalised 384-d embedding); calibration /tmp/minilm/calib.npz (256 sentences), evaluation /tmp/minilm/eval.npz
(512 sentences), both padded to 64 tokens. For each setting, on the evaluation sentences, original vs pruned:

- cos: mean cosine similarity between a sentence's original and pruned embeddings;
- top-1: retrieval agreement: each sentence's nearest neighbour among the other 511 (cosine) under the pruned model
  is the same as under the original model (chance: 1/511);
- params, and MACs at batch 1 x sequence 64. The report does not count MACs on the dynamic-sequence graph
  (report.macs_before is 0: count_macs counts a node with a symbolic size other than the batch as 0), so MACs are
  counted here with onnxprune.verify.count_macs, on onnxprune's own inferred shapes, of copies of the original and
  pruned models whose inputs are fixed to (1, 64);
- groups pruned / frozen (report.groups), and the pruning wall time (calibration and recovery included).

`--static` prunes that (1, 64)-input copy instead of the dynamic model; calibration and evaluation then run one
sentence at a time. Before onnxprune sized run-time dimensions by probe inference, only this copy had prunable
attention heads; now both get the same 13 groups (6 MLP, 6 attention-head, 1 frozen residual stream) and the same
plans for the data-free criteria.
`--calib-trim` calibrates on the same sentences in length-sorted batches of 16 cut to their longest sentence. It was
the workaround for padding (about three quarters of the 64 positions) dominating the statistics and the
least-squares fits; onnxprune now leaves positions where `attention_mask` is 0 out by itself.
`--exclude attention` freezes the attention heads (MLP neurons only).
The frozen reasons (the same for every setting of one model) are printed once after the table.
"""
from __future__ import annotations

import argparse
import logging
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxprune
from onnxprune import CalibrationSource, Options
from onnxprune.verify import count_macs

DIR = Path("/tmp/minilm")
MODEL, CALIB, EVAL = DIR / "minilm.onnx", DIR / "calib.npz", DIR / "eval.npz"


def fixed_inputs(model: onnx.ModelProto, batch: int = 1, seq: int | None = 64) -> onnx.ModelProto:
    """A copy whose (batch, sequence) inputs are fixed (only the batch for `seq` None: an image model), with the
    stale inferred shapes dropped."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.value_info[:]
    for vi in fixed.graph.input:
        dims = vi.type.tensor_type.shape.dim
        for axis, size in ((0, batch),) + (((1, seq),) if seq is not None else ()):
            dims[axis].ClearField("dim_param")
            dims[axis].dim_value = size
    for vi in fixed.graph.output:
        dims = vi.type.tensor_type.shape.dim
        dims[0].ClearField("dim_param")
        dims[0].dim_value = batch
    return fixed


def macs(model: onnx.ModelProto, seq: int) -> int:
    """MACs at batch 1 x `seq` tokens, with onnxprune's own shapes (plain onnx inference leaves the attention
    MatMuls unsized)."""
    fixed = fixed_inputs(model, 1, seq)
    return count_macs(fixed, onnxprune.analyze(fixed).index.shapes)


def trimmed_batches(data: dict[str, np.ndarray], batch: int) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Sentences sorted by length, in batches cut to their longest sentence: the padding a batch does not need is
    dropped (the embedding of a sentence does not depend on it: the mask excludes padding from attention and
    pooling)."""
    lengths = data["attention_mask"].sum(1)
    order = np.argsort(lengths, kind="stable")
    batches = []
    for i in range(0, len(order), batch):
        rows = order[i:i + batch]
        batches.append((rows, {k: v[rows, :lengths[rows].max()] for k, v in data.items()}))
    return batches


def embed(model: onnx.ModelProto, data: dict[str, np.ndarray], static: bool) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    n = len(data["input_ids"])
    batches = ([(np.arange(i, i + 1), {k: v[i:i + 1] for k, v in data.items()}) for i in range(n)] if static
               else trimmed_batches(data, 64))
    out = np.zeros((n, sess.get_outputs()[0].shape[-1]), np.float32)
    for rows, feed in batches:
        out[rows] = sess.run(None, feed)[0]
    return out / np.linalg.norm(out, axis=1, keepdims=True).clip(1e-12)


def nearest(emb: np.ndarray) -> np.ndarray:
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.25,0.5")
    parser.add_argument("--criteria", default="l1,apoz,activation,regression")
    parser.add_argument("--recover", default="none,bias,lsq")
    parser.add_argument("--round-to", type=int, default=16)
    parser.add_argument("--calib-size", type=int, default=None)
    parser.add_argument("--exclude", action="append", default=[],
                        help="freeze groups touching matching names, as onnxprune --exclude (e.g. 'attention': "
                             "MLP neurons only)")
    parser.add_argument("--static", action="store_true", help="prune the copy with inputs fixed to (1, 64)")
    parser.add_argument("--calib-trim", action="store_true",
                        help="calibrate on length-sorted batches of 16 cut to their longest sentence, not on the "
                             "npz padded to 64 tokens")
    args = parser.parse_args()
    logging.getLogger("onnxprune").setLevel(logging.ERROR)

    model = onnx.load(MODEL)
    eval_data = dict(np.load(EVAL))
    seq = eval_data["input_ids"].shape[1]
    if args.static:
        model = fixed_inputs(model, 1, seq)
    calib: object = str(CALIB)
    if args.calib_trim:
        if args.static:
            parser.error("--calib-trim needs the dynamic model")
        first = {k: v[:args.calib_size] for k, v in np.load(CALIB).items()}  # the same sentences as the npz
        calib = [feed for _, feed in trimmed_batches(first, 16)]
    criteria = args.criteria.split(",")
    if "bn" in criteria and not any(n.op_type == "BatchNormalization" for n in model.graph.node):
        print("criterion bn skipped: the graph has no BatchNormalization")
        criteria.remove("bn")

    start = time.perf_counter()
    reference = embed(model, eval_data, args.static)
    reference_nn = nearest(reference)
    eval_seconds = time.perf_counter() - start
    macs_before = macs(model, seq)
    print(f"model {MODEL}{' with inputs fixed to (1, %d)' % seq if args.static else ''}; eval {len(reference)} "
          f"sentences x {seq} tokens (original embeddings in {eval_seconds:.1f} s); calib {CALIB}"
          f"{'' if args.calib_size is None else f' (first {args.calib_size})'}"
          f"{', length-sorted batches of 16 cut to their longest sentence' if args.calib_trim else ''}; "
          f"round_to {args.round_to}{''.join(f'; --exclude {e}' for e in args.exclude)}\n")
    print("| criterion | recovery | ratio | cos | top-1 agree | params | MACs (1x64) | groups pruned / frozen | "
          "prune s |\n|---|---|---|---|---|---|---|---|---|")
    frozen = None
    for criterion in criteria:
        for recover in args.recover.split(","):
            for ratio in (float(r) for r in args.ratios.split(",")):
                start = time.perf_counter()
                options = Options(criterion=criterion, recover=recover, round_to=args.round_to,
                                  exclude=tuple(args.exclude), calib=CalibrationSource(calib, size=args.calib_size))
                pruned, report = onnxprune.prune(model, ratio, options)
                seconds = time.perf_counter() - start
                emb = embed(pruned, eval_data, args.static)
                cos = float((emb * reference).sum(1).mean())
                agree = float((nearest(emb) == reference_nn).mean())
                macs_after = macs(pruned, seq)
                if report.macs_before and report.macs_before != macs_before:
                    print(f"(report MACs {report.macs_before:,} -> {report.macs_after:,})")
                frozen = frozen or (report.frozen_reasons, len(report.groups))
                print(f"| {criterion} | {recover} | {ratio} | {cos:.4f} | {agree:.4f} | "
                      f"{report.params_before / 1e6:.2f}M -> {report.params_after / 1e6:.2f}M | "
                      f"{macs_before / 1e6:.0f}M -> {macs_after / 1e6:.0f}M ({macs_after / macs_before:.0%}) | "
                      f"{len(report.pruned_groups)} / {len(report.frozen_groups)} | {seconds:.1f} |", flush=True)
    if frozen:
        # Reasons name one node each (one per encoder layer): count them with the layer numbers blanked.
        reasons, total = frozen
        groups, channels = Counter(), Counter()
        for item in reasons:
            key = re.sub(r"(?<=layer\.)\d+", "N", item["reason"])
            groups[key] += item["groups"]
            channels[key] += item["channels"]
        print(f"\n{total} channel groups; frozen groups by first reason (layer.N: any layer):")
        for key, count in channels.most_common():
            print(f"- {groups[key]} group(s), {count} channels: {key}")


if __name__ == "__main__":
    main()
