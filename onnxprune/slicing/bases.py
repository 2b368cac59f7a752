"""The principal directions of each sum of the residual stream, from a Gram matrix of its values streamed over the
calibration data (real positions only: padding that a mask input marks is left out, as everywhere in onnxprune)."""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import onnx

from ..calibrate import mask_input, padding_of, run_batch, with_outputs
from ..layers import real_positions
from ..verify import session
from .stream import Stream


def stream_rows(model: onnx.ModelProto, stream: Stream, feeds: Iterable[dict]) -> Iterator[dict[str, np.ndarray]]:
    """Per calibration batch, each sum's values at the real positions as float64 rows (positions, width)."""
    names = sorted(stream.sums)
    runner = session(with_outputs(model, names))
    mask = mask_input(model)
    for feed in feeds:
        values = run_batch(runner, names, feed)
        real = padding_of(feed, mask)
        yield {name: real_positions(value, real).reshape(-1, value.shape[-1]).astype(np.float64)
               for name, value in zip(names, values)}


def stream_grams(model: onnx.ModelProto, stream: Stream, feeds: Iterable[dict]) -> dict[str, np.ndarray]:
    """Per sum, the Gram matrix of its values along the hidden axis (mean-free rows for a centred sum)."""
    grams = {name: np.zeros((stream.width, stream.width)) for name in stream.sums}
    for rows in stream_rows(model, stream, feeds):
        for name, values in rows.items():
            grams[name] += _gram(values, stream.sums[name].centred)
    return grams


def _gram(rows: np.ndarray, centred: bool) -> np.ndarray:
    """rows: (positions, width) float64, as stream_rows gives them."""
    if centred:
        rows = rows - rows.mean(axis=1, keepdims=True)
    return rows.T @ rows


def principal_directions(gram: np.ndarray, kept: int) -> np.ndarray:
    """The `kept` leading eigenvectors of a Gram matrix, (width, kept), strongest first. With every direction kept
    the matrix is orthogonal, so rotating by it changes nothing."""
    values, vectors = np.linalg.eigh(gram)
    return vectors[:, np.argsort(values)[::-1][:kept]]

