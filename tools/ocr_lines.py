"""Text lines rendered here for PP-OCRv4's recogniser (tools/bench_sparsity.py ocr), fully offline.

    pip download rapidocr_onnxruntime==1.4.4 --no-deps -d /tmp/ppocr
    python tools/bench_sparsity.py ocr-data          # writes /tmp/ppocr/rec.onnx, calib.npz, eval.npz, eval.txt

The model is `ch_PP-OCRv4_rec_infer.onnx` from the wheel (its character list is in the model's metadata). Lines
are two or three words drawn (seeded) from Python's own names (builtins and standard-library module names) and
numbers, rendered in DejaVu Sans at 32 px, black on white, resized to height 48 and padded to width 320 as
RapidOCR prepares them ((x / 255 - 0.5) / 0.5, padding 0). Calibration: 128 lines; evaluation: 256 other lines.
"""
from __future__ import annotations

import builtins
import math
import sys
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

DIR = Path("/tmp/ppocr")
MODEL, CALIB, EVAL = DIR / "rec.onnx", DIR / "calib.npz", DIR / "eval.npz"
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
HEIGHT, WIDTH = 48, 320


def vocabulary() -> list[str]:
    names = set(dir(builtins)) | set(sys.stdlib_module_names)
    return sorted(n for n in names if n.isalpha() and 3 <= len(n) <= 9)


def lines(count: int, seed: int, avoid: set[str] = frozenset()) -> list[str]:
    rng, words, found = np.random.default_rng(seed), vocabulary(), []
    while len(found) < count:
        parts = [words[i] for i in rng.choice(len(words), rng.integers(2, 4))]
        if rng.random() < 0.4:
            parts.insert(int(rng.integers(0, len(parts))), str(int(rng.integers(0, 10000))))
        line = " ".join(parts)
        if line not in avoid and line not in found and len(line) <= 22:
            found.append(line)
    return found


def render(text: str) -> np.ndarray:
    """(3, 48, 320) float32, as RapidOCR feeds the recogniser."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.truetype(FONT, 32)
    left, top, right, bottom = font.getbbox(text)
    image = Image.new("RGB", (right - left + 16, bottom - top + 16), "white")
    ImageDraw.Draw(image).text((8 - left, 8 - top), text, font=font, fill="black")
    width = min(WIDTH, math.ceil(HEIGHT * image.width / image.height))
    pixels = np.asarray(image.resize((width, HEIGHT)), np.float32).transpose(2, 0, 1) / 255
    out = np.zeros((3, HEIGHT, WIDTH), np.float32)
    out[:, :, :width] = (pixels - 0.5) / 0.5
    return out


def write_data() -> None:
    wheel = next(DIR.glob("rapidocr_onnxruntime-*.whl"))
    MODEL.write_bytes(zipfile.ZipFile(wheel).read("rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"))
    calib = lines(128, seed=0)
    evaluation = lines(256, seed=1, avoid=set(calib))
    np.savez(CALIB, x=np.stack([render(t) for t in calib]))
    np.savez(EVAL, x=np.stack([render(t) for t in evaluation]))
    (DIR / "eval.txt").write_text("\n".join(evaluation) + "\n")
    print(f"wrote {MODEL}, {CALIB} (128 lines), {EVAL} (256 lines)")


def load_eval() -> tuple[np.ndarray, list[str], list[str]]:
    """Evaluation images, their texts, and the model's characters (index 0 is the CTC blank)."""
    model = onnx.load(MODEL, load_external_data=False)
    characters = next(p.value for p in model.metadata_props if p.key == "character").splitlines()
    return np.load(EVAL)["x"], (DIR / "eval.txt").read_text().splitlines(), ["blank", *characters, " "]


def decode(probabilities: np.ndarray, charset: list[str]) -> list[str]:
    """Greedy CTC: argmax per step, repeats collapsed, blanks dropped."""
    best = probabilities.argmax(-1)
    return ["".join(charset[i] for k, i in enumerate(row) if i != 0 and (k == 0 or i != row[k - 1])) for row in best]


def edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def character_accuracy(model: onnx.ModelProto, images: np.ndarray, texts: list[str], charset: list[str]) -> float:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    predicted = []
    for start in range(0, len(images), 32):
        predicted += decode(session.run(None, {"x": images[start:start + 32]})[0], charset)
    return float(np.mean([max(0.0, 1 - edit_distance(p, t) / len(t)) for p, t in zip(predicted, texts)]))
