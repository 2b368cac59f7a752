"""Sampling layer inputs the way a layer sees them: im2col patches of a Conv at sampled output positions, rows of
a Gemm / MatMul input. Shared by least-squares recovery and the regression criterion."""
from __future__ import annotations

import math

import numpy as np
import onnx


def conv_geometry(node: onnx.NodeProto, in_hw: tuple[int, int]) -> tuple[list[int], list[int], list[int], list[int]]:
    """kernel, strides, dilations and pads (top, left, bottom, right) of a 2-D Conv, auto_pad resolved."""
    ints = {a.name: list(a.ints) for a in node.attribute if a.ints}
    kernel = ints.get("kernel_shape", [1, 1])[-2:]
    strides = ints.get("strides", [1, 1])[-2:]
    dilations = ints.get("dilations", [1, 1])[-2:]
    auto_pad = next((a.s.decode() for a in node.attribute if a.name == "auto_pad"), "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        totals = [max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
                  for n, s, k, d in zip(in_hw, strides, kernel, dilations)]
        small = [t // 2 for t in totals]
        begin = small if auto_pad == "SAME_UPPER" else [t - b for t, b in zip(totals, small)]
        pads = begin + [t - b for t, b in zip(totals, begin)]
    elif auto_pad == "VALID":
        pads = [0, 0, 0, 0]
    else:
        pads = ints.get("pads", [0, 0, 0, 0])
    return kernel, strides, dilations, pads


def conv_patches(node: onnx.NodeProto, x: np.ndarray, rng: np.random.Generator, positions: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Patches (rows, C, kh, kw) at up to `positions` random output positions per image, and for each row its image
    index and output coordinates."""
    (kh, kw), (sh, sw), (dh, dw), pads = conv_geometry(node, x.shape[2:4])
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    out_h = (padded.shape[2] - dh * (kh - 1) - 1) // sh + 1
    out_w = (padded.shape[3] - dw * (kw - 1) - 1) // sw + 1
    count = min(positions, out_h * out_w)
    flat = np.stack([rng.choice(out_h * out_w, count, replace=False) for _ in range(len(x))]).reshape(-1)
    images = np.repeat(np.arange(len(x)), count)
    oy, ox = flat // out_w, flat % out_w
    iy = oy[:, None] * sh + np.arange(kh) * dh
    ix = ox[:, None] * sw + np.arange(kw) * dw
    channels = np.arange(x.shape[1])
    patches = padded[images[:, None, None, None], channels[None, :, None, None], iy[:, None, :, None],
                     ix[:, None, None, :]]
    return patches, images, oy, ox


def input_rows(x: np.ndarray, rng: np.random.Generator, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a Gemm / MatMul input (leading axes flattened), at most `limit` of them, and which rows they are."""
    rows = x.reshape(-1, x.shape[-1])
    pick = rng.choice(len(rows), limit, replace=False) if len(rows) > limit else np.arange(len(rows))
    return rows[pick], pick
