"""Least squares from streamed normal equations, with the ridge chosen on held-out rows.

Recovery re-fits a layer so that its outputs on the calibration data match the original model's. Where the rows are
few against the unknowns (a transformer's MLP projection: 1,536 inputs per output, a few thousand calibration tokens)
the plain solution interpolates the calibration rows and generalises badly: on all-MiniLM-L6-v2 it made embeddings
worse than no re-fit at all. So one calibration batch in HOLDOUT_EVERY is held out (one sampled row in
HOLDOUT_EVERY where there are fewer batches; rows of one sample are alike, so a split by batch judges more honestly). Each ridge of RIDGES, strongest first,
is fitted on the other rows and judged on the held-out ones, until the held-out error stops falling; the ridge that
judged best is then fitted on all rows. The ridge pulls each weight towards its current value, not towards zero, in
proportion to its feature's energy (so it does not depend on the features' scales): a strong ridge means "keep the
layer as it is", and an output whose best fit does not beat its current weights on the held-out rows keeps them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

HOLDOUT_EVERY = 4  # every fourth batch (or row) is held out to choose the ridge and judge the fit
RIDGES = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5)  # tried in this order, each times every feature's own energy
FLOOR = 1e-3  # a feature's ridge weight is its energy plus this share of the mean energy (constant features too)
ROUNDING = 1e-9  # a fit must lower an output's error by more than this share of its energy (not a round-off gain)


@dataclass
class Sums:
    """F^T F, F^T T and each target column's energy over some rows."""

    gram: np.ndarray
    cross: np.ndarray
    energy: np.ndarray

    @classmethod
    def empty(cls, features: int, outputs: int) -> "Sums":
        return cls(np.zeros((features, features)), np.zeros((features, outputs)), np.zeros(outputs))

    def add(self, features: np.ndarray, target: np.ndarray) -> None:
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow leaves an Inf, refused by `finite`
            self.gram += features.T @ features
            self.cross += features.T @ target
            self.energy += (target ** 2).sum(0)

    def minus(self, other: "Sums") -> "Sums":
        return Sums(self.gram - other.gram, self.cross - other.cross, self.energy - other.energy)

    def without_last_feature(self) -> "Sums":
        return Sums(self.gram[:-1, :-1], self.cross[:-1], self.energy)

    def column_errors(self, weights: np.ndarray) -> np.ndarray:
        """Each output's squared error over these rows with `weights` (features x outputs)."""
        with np.errstate(over="ignore", invalid="ignore"):
            return ((self.gram @ weights) * weights).sum(0) - 2 * (weights * self.cross).sum(0) + self.energy

    def ridge_weights(self, ridge: float) -> np.ndarray:
        """Per feature, how strongly `ridge` pulls its weight towards the current value."""
        energy = np.maximum(np.diag(self.gram), 0.0)
        return ridge * (energy + FLOOR * max(float(energy.mean()), 1e-12))


# solve(sums, per-feature ridge weights, prior weights) -> weights (features x outputs), NaN where it failed
Solver = Callable[[Sums, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class Fit:
    """The weights fitted on all rows with the chosen ridge, and which outputs they improve on held-out rows."""

    weights: np.ndarray
    better: np.ndarray  # (outputs,) bool
    ridge: float


def dense_solver(sums: Sums, ridge: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """(G + diag(ridge)) W = C + diag(ridge) prior, every output at once."""
    with np.errstate(over="ignore", invalid="ignore"):
        try:
            return np.linalg.solve(sums.gram + np.diag(ridge), sums.cross + ridge[:, None] * prior)
        except np.linalg.LinAlgError:
            return np.full_like(prior, np.nan)


def fit_held_out(total: Sums, held: Sums | None, prior: np.ndarray, solve: Solver) -> Fit:
    """Choose the ridge on `held` rows (fitting on `total` less them), then fit on `total`. Without held-out rows
    (too few samples) the weakest ridge is fitted and judged on all rows."""
    if held is None:
        weights = solve(total, total.ridge_weights(RIDGES[-1]), prior)
        return Fit(weights, _improves(total, weights, prior), RIDGES[-1])
    fitting = total.minus(held)
    ridge, fitted = _best_ridge(fitting, held, prior, solve)
    better = _improves(held, fitted, prior)
    weights = solve(total, total.ridge_weights(ridge), prior) if better.any() else prior
    return Fit(weights, better & np.isfinite(weights).all(0), ridge)


def _best_ridge(fitting: Sums, held: Sums, prior: np.ndarray, solve: Solver) -> tuple[float, np.ndarray]:
    """The ridge whose fit on `fitting` has the lowest total error on `held` (descending until it rises)."""
    best, best_error, best_fit = RIDGES[0], np.inf, prior
    for ridge in RIDGES:
        fitted = solve(fitting, fitting.ridge_weights(ridge), prior)
        error = float(np.sum(held.column_errors(fitted)))
        if not error < best_error:  # a rise, or NaN
            break
        best, best_error, best_fit = ridge, error, fitted
    return best, best_fit


def _improves(rows: Sums, fitted: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Per output: the fit is finite and lowers its error on `rows` (false for NaN)."""
    finite = np.isfinite(fitted).all(0)
    after, before = rows.column_errors(np.where(finite, fitted, prior)), rows.column_errors(prior)
    with np.errstate(invalid="ignore"):
        return finite & (after < before - ROUNDING * rows.energy)


class NormalEquations:
    """Running sums of a layer's rows (features with a column of ones for the bias, against the original's outputs),
    all rows and the held-out ones apart: memory fixed by the layer's size, not by the samples."""

    def __init__(self) -> None:
        self.total: Sums | None = None
        self.held: Sums | None = None
        self.rows = 0

    def add(self, features: np.ndarray, target: np.ndarray, batch: int | None = None) -> None:
        """Rows of calibration batch number `batch` (all held out or none), or of unnumbered data (every
        HOLDOUT_EVERY-th row held out)."""
        if self.total is None:
            self.total = Sums.empty(features.shape[1], target.shape[1])
            self.held = Sums.empty(features.shape[1], target.shape[1])
        held = (self.rows + np.arange(len(features)) if batch is None else np.full(len(features), batch))
        held = held % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
        self.total.add(features, target)
        self.held.add(features[held], target[held])
        self.rows += len(features)

    @property
    def gram(self) -> np.ndarray | None:
        return None if self.total is None else self.total.gram

    @property
    def cross(self) -> np.ndarray | None:
        return None if self.total is None else self.total.cross

    @property
    def finite(self) -> bool:
        """Nothing seen, or sums without NaN or Inf."""
        return self.total is None or bool(np.isfinite(self.total.gram).all() and np.isfinite(self.total.cross).all()
                                          and np.isfinite(self.total.energy).all())

    def drop_bias(self) -> None:
        self.total, self.held = self.total.without_last_feature(), self.held.without_last_feature()

    def error(self, weights: np.ndarray) -> float:
        """Squared error of `weights` (features x outputs) on all rows seen."""
        return float(np.sum(self.total.column_errors(weights)))

    def fit(self, prior: np.ndarray, solve: Solver | None = None) -> Fit:
        """Weights fitted from `prior` (features x outputs) with the ridge chosen on the held-out rows; `solve`
        defaults to one dense solve of all outputs (every output reads every feature)."""
        enough = 0 < np.trace(self.held.gram) < np.trace(self.total.gram)  # rows on both sides
        return fit_held_out(self.total, self.held if enough else None, prior.astype(np.float64),
                            solve or dense_solver)
