"""Masked least squares: each output row re-fitted on its kept inputs only, the zeros staying zero.

The normal equations are recovery's (`recover.NormalEquations`: F'F and F'T of the layer's inputs, with a column of
ones for the bias, against the original layer's outputs). Row o solves G[S, S] w = c[S, o] over its kept features S
(and the bias): rows with the same number of kept features are solved together, a chunk at a time.
"""
from __future__ import annotations

import numpy as np

from ..recover import NormalEquations

CHUNK_VALUES = 1 << 25  # float64 values of the gathered systems solved at once (256 MB)


def masked_refit(system: NormalEquations, current: np.ndarray, keep: np.ndarray, ridge: float) -> np.ndarray:
    """(features [+ bias], outputs): each column fitted on its kept features (the bias, the last row when
    `current` has one, always kept), zero elsewhere. A column whose fit is not finite or does not lower its error on
    the calibration data keeps its `current` values."""
    kept = _with_bias(keep, len(current) > keep.shape[1])
    damping = ridge * max(float(np.trace(system.gram)) / len(system.gram), 1e-12)
    fitted = np.zeros_like(current)
    counts = kept.sum(1)
    for count in np.unique(counts):
        rows = np.flatnonzero(counts == count)
        for chunk in np.array_split(rows, max(1, len(rows) * int(count) ** 2 // CHUNK_VALUES)):
            _solve_rows(system, kept, chunk, damping, fitted)
    better = _row_errors(system, fitted) < _row_errors(system, current)  # NaN compares false
    return np.where(better[None, :] & np.isfinite(fitted).all(0)[None, :], fitted, current)


def _with_bias(keep: np.ndarray, bias: bool) -> np.ndarray:
    return np.concatenate([keep, np.ones((len(keep), 1), bool)], axis=1) if bias else keep


def _solve_rows(system: NormalEquations, kept: np.ndarray, rows: np.ndarray, damping: float,
                fitted: np.ndarray) -> None:
    """Fit output rows `rows` (all with the same number of kept features) into `fitted`; NaN where singular."""
    features = np.stack([np.flatnonzero(kept[r]) for r in rows])  # (rows, kept)
    matrices = system.gram[features[:, :, None], features[:, None, :]]
    matrices += damping * np.eye(features.shape[1])
    targets = system.cross[features, rows[:, None]]
    try:
        solution = np.linalg.solve(matrices, targets[..., None])[..., 0]
    except np.linalg.LinAlgError:
        solution = np.full(targets.shape, np.nan)
    fitted[features, rows[:, None]] = solution


def _row_errors(system: NormalEquations, weights: np.ndarray) -> np.ndarray:
    """Per output, its squared error on the calibration data less the target's energy (the same for any weights)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.einsum("io,ij,jo->o", weights, system.gram, weights) - 2 * (weights * system.cross).sum(0)
