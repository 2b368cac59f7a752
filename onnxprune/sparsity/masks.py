"""Which weights to keep, from one score per weight (higher = keep).

Weights are seen as rows: (outputs, features), features input-channel-major, `kernel` positions per input channel
(a Conv's (O, C, kh, kw) kernels flattened per output; a matrix layer has one position). An N:M block is `m`
consecutive input channels at one output and one kernel position.
"""
from __future__ import annotations

import numpy as np

from .spec import Pattern


def nm_keep(scores: np.ndarray, pattern: Pattern, kernel: int) -> np.ndarray:
    """The `n` highest-scoring weights of every N:M block (ties: the lower input channel)."""
    rows, features = scores.shape
    blocks = scores.reshape(rows, features // (pattern.m * kernel), pattern.m, kernel)
    order = np.argsort(-blocks, axis=2, kind="stable")
    keep = np.zeros(blocks.shape, bool)
    np.put_along_axis(keep, order[:, :, :pattern.n], True, axis=2)
    return keep.reshape(rows, features)


def unstructured_keep(scores: np.ndarray, ratio: float, per_row: bool) -> np.ndarray:
    """All but the round(ratio * size) lowest scores, compared within each row (`per_row`) or over the layer."""
    flat = scores if per_row else scores.reshape(1, -1)
    zeroed = int(round(ratio * flat.shape[1]))
    order = np.argsort(flat, axis=1, kind="stable")
    keep = np.ones(flat.shape, bool)
    np.put_along_axis(keep, order[:, :zeroed], False, axis=1)
    return keep.reshape(scores.shape)


def keep_mask(scores: np.ndarray, pattern: Pattern, ratio: float, kernel: int, per_row: bool) -> np.ndarray:
    """The kept weights: N:M blocks, or the `ratio` lowest scores zeroed."""
    return nm_keep(scores, pattern, kernel) if not pattern.unstructured else unstructured_keep(scores, ratio, per_row)


def nm_order(features: int, kernel: int) -> np.ndarray:
    """A permutation of the features that puts every N:M block's input channels next to each other (kernel position
    major): `rows[:, order]` holds the blocks as consecutive runs of m."""
    return np.arange(features).reshape(features // kernel, kernel).T.ravel()
