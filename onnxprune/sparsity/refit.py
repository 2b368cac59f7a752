"""Masked least squares: each output row re-fitted on its kept inputs only, the zeros staying zero.

The normal equations are recovery's (`least_squares.NormalEquations`: F'F and F'T of the layer's inputs, with a
column of ones for the bias, against the original layer's outputs), and so is the choice of the ridge on held-out
rows. Row o solves (G[S, S] + diag(r[S])) w = c[S, o] + diag(r[S]) w0[S] over its kept features S (and the bias),
r the ridge weights, w0 its current (masked) weights. Where that is cheap (the sum over rows of k^3, k a row's kept
count, at most DIRECT_MAX_WORK), each row's system is gathered and solved directly (rows with the same number of
kept features together, a chunk at a time): exact. Wider layers (a transformer's FFN: 1536 inputs and 384 rows, or
1536 rows) would gather and factor one k x k matrix per row at poor BLAS efficiency (207 s for one MiniLM
down-projection); there all rows are solved at once by conjugate gradients on the masked operator
P -> mask * (G P) + r P, one (features x features) @ (features x rows) product per iteration, Jacobi-preconditioned
and warm-started from the current weights.
"""
from __future__ import annotations

from functools import partial

import numpy as np

from ..least_squares import NormalEquations, Sums

CHUNK_VALUES = 1 << 25  # float64 values of the gathered systems solved at once (256 MB)
DIRECT_MAX_WORK = 4e9  # sum of k^3 over rows up to which rows are solved directly (a few seconds of factorisation)
CG_TOLERANCE = 1e-7  # relative residual ||b - A w|| / ||b|| of every row at which conjugate gradients stop
CG_MAX_ITERATIONS = 500  # a cap for ill-conditioned layers: an unconverged row is still checked against its error


def masked_refit(system: NormalEquations, current: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """(features [+ bias], outputs): each column fitted on its kept features (the bias, the last row when
    `current` has one, always kept), zero elsewhere, with the ridge chosen on held-out rows. A column whose fit is
    not finite or does not lower its error on the held-out rows keeps its `current` values."""
    kept = _with_bias(keep, len(current) > keep.shape[1])
    direct = (kept.sum(1).astype(float) ** 3).sum() <= DIRECT_MAX_WORK
    fit = system.fit(np.where(kept.T, current, 0.0), partial(_direct if direct else _conjugate_gradient, kept))
    return np.where(fit.better[None, :], np.where(kept.T, fit.weights, 0.0), current)


def _with_bias(keep: np.ndarray, bias: bool) -> np.ndarray:
    return np.concatenate([keep, np.ones((len(keep), 1), bool)], axis=1) if bias else keep


def _direct(kept: np.ndarray, sums: Sums, ridge: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Every row's gathered system solved by factorisation, rows with the same number of kept features together."""
    fitted = np.zeros_like(prior)
    counts = kept.sum(1)
    for count in np.unique(counts):
        rows = np.flatnonzero(counts == count)
        for chunk in np.array_split(rows, max(1, len(rows) * int(count) ** 2 // CHUNK_VALUES)):
            _solve_rows(sums, kept[chunk], chunk, ridge, prior, fitted)
    return fitted


def _solve_rows(sums: Sums, kept: np.ndarray, rows: np.ndarray, ridge: np.ndarray, prior: np.ndarray,
                fitted: np.ndarray) -> None:
    """Fit output rows `rows` (all with the same number of kept features) into `fitted`; NaN where singular."""
    features = np.stack([np.flatnonzero(k) for k in kept])  # (rows, kept)
    matrices = sums.gram[features[:, :, None], features[:, None, :]]
    matrices[:, np.arange(features.shape[1]), np.arange(features.shape[1])] += ridge[features]
    targets = sums.cross[features, rows[:, None]] + ridge[features] * prior[features, rows[:, None]]
    try:
        solution = np.linalg.solve(matrices, targets[..., None])[..., 0]
    except np.linalg.LinAlgError:
        solution = np.full(targets.shape, np.nan)
    fitted[features, rows[:, None]] = solution


def _conjugate_gradient(kept: np.ndarray, sums: Sums, ridge: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """All columns of (features, outputs) at once: per column, preconditioned CG on its kept features until its
    relative residual is below CG_TOLERANCE (a non-finite residual counts as stopped) or CG_MAX_ITERATIONS."""
    mask = kept.T
    diagonal = np.diag(sums.gram) + ridge
    inverse = np.where(mask, 1.0 / np.where(diagonal > 0, diagonal, 1.0)[:, None], 0.0)  # Jacobi, zero off-mask
    target = np.where(mask, sums.cross + ridge[:, None] * prior, 0.0)
    weights = np.where(mask & np.isfinite(prior), prior, 0.0)
    residual = target - _masked_product(sums.gram, mask, ridge, weights)
    limit = CG_TOLERANCE * np.linalg.norm(target, axis=0)
    preconditioned = inverse * residual
    direction, energy = preconditioned.copy(), (residual * preconditioned).sum(0)
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(CG_MAX_ITERATIONS):
            if not (np.linalg.norm(residual, axis=0) > limit).any():
                break
            product = _masked_product(sums.gram, mask, ridge, direction)
            step = _ratio(energy, (direction * product).sum(0))
            weights += step * direction
            residual -= step * product
            preconditioned = inverse * residual
            energy, previous = (residual * preconditioned).sum(0), energy
            direction = preconditioned + _ratio(energy, previous) * direction
    return weights


def _masked_product(gram: np.ndarray, mask: np.ndarray, ridge: np.ndarray, columns: np.ndarray) -> np.ndarray:
    """(G[S, S] + diag(r[S])) x for every column x (zero off its kept set S), computed as one product with G."""
    return np.where(mask, gram @ columns, 0.0) + ridge[:, None] * columns


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator where the denominator is positive, 0 elsewhere (a converged or empty column)."""
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)
