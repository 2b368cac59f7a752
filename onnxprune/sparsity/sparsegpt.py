"""SparseGPT (Frantar & Alistarh, 2023): choose the weights to zero and update the others with the inverse Hessian
of the layer's inputs, one column at a time (optimal brain surgeon), in blocks of columns.

H is the Gram matrix X'X of the layer's inputs on calibration data (the features least-squares recovery collects).
Each column's error (w - q) / [H^-1]_cc is spread over the columns after it through the upper Cholesky factor of
H^-1, so the layer's outputs on the calibration data move as little as the mask allows.
"""
from __future__ import annotations

import numpy as np

from .masks import nm_order
from .spec import Pattern

BLOCK = 128  # columns per block: where the unstructured mask is chosen, and where updates are batched
DAMPING = 0.01  # of the mean diagonal, added to H so that it is invertible


def sparsegpt(rows: np.ndarray, gram: np.ndarray, pattern: Pattern, ratio: float,
              kernel: int) -> tuple[np.ndarray, np.ndarray]:
    """(updated rows, kept mask), both (outputs, features). N:M blocks are made consecutive columns first."""
    order = nm_order(rows.shape[1], kernel) if not pattern.unstructured else np.arange(rows.shape[1])
    back = np.argsort(order)
    updated, keep = _sparsegpt(rows[:, order], gram[np.ix_(order, order)], pattern, ratio)
    return updated[:, back], keep[:, back]


def inverse_factor(gram: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor U of (H + damping)^-1 = U'U. Features never seen (a zero diagonal) get a unit one,
    so their weights are neither chosen by a meaningless score nor moved."""
    hessian = gram.copy()
    dead = np.diag(hessian) <= 0
    hessian[dead, dead] = 1.0
    hessian += DAMPING * float(np.mean(np.diag(hessian))) * np.eye(len(hessian))
    return np.linalg.cholesky(np.linalg.inv(hessian)).T


def _sparsegpt(weights: np.ndarray, gram: np.ndarray, pattern: Pattern, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    weights, factor = weights.astype(np.float64).copy(), inverse_factor(gram)
    keep = np.ones(weights.shape, bool)
    step = BLOCK if pattern.unstructured else pattern.m * -(-BLOCK // pattern.m)
    for start in range(0, weights.shape[1], step):
        stop = min(start + step, weights.shape[1])
        errors = _block(weights, factor, keep, start, stop, pattern, ratio)
        weights[:, stop:] -= errors @ factor[start:stop, stop:]
    return weights, keep


def _block(weights: np.ndarray, factor: np.ndarray, keep: np.ndarray, start: int, stop: int, pattern: Pattern,
           ratio: float) -> np.ndarray:
    """Zero and compensate columns start..stop in place; the scaled errors, for the columns after the block."""
    block, inverse = weights[:, start:stop], factor[start:stop, start:stop]
    diagonal = np.diag(inverse)
    if pattern.unstructured:
        keep[:, start:stop] = _saliency_keep(block ** 2 / diagonal ** 2, ratio)
    errors = np.zeros_like(block)
    for column in range(stop - start):
        if not pattern.unstructured and column % pattern.m == 0:
            run = slice(column, column + pattern.m)
            saliency = block[:, run] ** 2 / diagonal[run] ** 2
            order = np.argsort(-saliency, axis=1, kind="stable")
            kept = np.zeros(saliency.shape, bool)
            np.put_along_axis(kept, order[:, :pattern.n], True, axis=1)
            keep[:, start + column:start + column + pattern.m] = kept
        value = block[:, column]
        quantised = np.where(keep[:, start + column], value, 0.0)
        errors[:, column] = (value - quantised) / diagonal[column]
        block[:, column:] -= errors[:, column:column + 1] * inverse[column, column:][None, :]
        block[:, column] = quantised
    return errors


def _saliency_keep(saliency: np.ndarray, ratio: float) -> np.ndarray:
    """The block's round(ratio * size) least salient weights zeroed, compared over the whole block."""
    order = np.argsort(saliency, axis=None, kind="stable")[:int(round(ratio * saliency.size))]
    keep = np.ones(saliency.size, bool)
    keep[order] = False
    return keep.reshape(saliency.shape)
