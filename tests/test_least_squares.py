"""Least squares with the ridge chosen on held-out rows (onnxprune.least_squares): exact where the rows determine
the fit, towards the current weights where they do not, and never worse than the current weights on held-out rows."""
import numpy as np

from onnxprune import least_squares
from onnxprune.least_squares import HOLDOUT_EVERY, NormalEquations


def system_of(features: np.ndarray, target: np.ndarray) -> NormalEquations:
    system = NormalEquations()
    for start in range(0, len(features), 37):  # several adds, as calibration batches come
        system.add(features[start:start + 37], target[start:start + 37])
    return system


def test_every_fourth_row_is_held_out_across_batches():
    rng = np.random.default_rng(0)
    features, target = rng.standard_normal((100, 3)), rng.standard_normal((100, 2))
    system = system_of(features, target)
    held = np.arange(100) % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    np.testing.assert_allclose(system.held.gram, features[held].T @ features[held])
    np.testing.assert_allclose(system.total.gram, features.T @ features)
    np.testing.assert_allclose(system.total.energy, (target ** 2).sum(0))


def test_rows_that_determine_the_fit_give_the_least_squares_solution():
    rng = np.random.default_rng(1)
    features = rng.standard_normal((500, 8))
    target = features @ rng.standard_normal((8, 3))
    fit = system_of(features, target).fit(np.zeros((8, 3)))
    assert fit.better.all() and fit.ridge == least_squares.RIDGES[-1]
    np.testing.assert_allclose(fit.weights, np.linalg.lstsq(features, target, rcond=None)[0], rtol=1e-3, atol=1e-6)


def test_few_noisy_rows_stay_near_the_current_weights_and_generalise():
    """300 rows for 200 unknowns and heavy noise: the weakest ridge interpolates the noise; the chosen ridge is
    stronger and does better on fresh rows than both it and the current weights."""
    rng = np.random.default_rng(2)
    truth = rng.standard_normal((200, 8))

    def rows(count):
        x = rng.standard_normal((count, 200))
        return x, x @ truth + 8.0 * rng.standard_normal((count, 8))
    system = system_of(*rows(300))
    current = truth + 0.5 * rng.standard_normal(truth.shape)
    fit = system.fit(current)
    weakest = least_squares.dense_solver(system.total, system.total.ridge_weights(1e-5), current)
    chosen = np.where(fit.better[None, :], fit.weights, current)
    x, y = rows(4000)
    error = lambda weights: np.sum((x @ weights - y) ** 2)  # noqa: E731
    assert fit.ridge > least_squares.RIDGES[-1]
    assert error(chosen) < error(current) and error(chosen) < 0.8 * error(weakest)


def test_a_fit_that_does_not_help_keeps_the_current_weights():
    """The current weights already give the target exactly: nothing to gain, nothing changes."""
    rng = np.random.default_rng(3)
    features, current = rng.standard_normal((200, 5)), rng.standard_normal((5, 2))
    fit = system_of(features, features @ current).fit(current)
    assert not fit.better.any()


def test_too_few_rows_to_hold_out_fit_on_all_of_them():
    rng = np.random.default_rng(4)
    features = rng.standard_normal((6, 2))
    target = features @ np.array([[1.0], [-2.0]])
    fit = system_of(features, target).fit(np.zeros((2, 1)))
    assert fit.better.all()
    np.testing.assert_allclose(fit.weights, [[1.0], [-2.0]], rtol=1e-3)


def test_numbered_batches_are_held_out_whole():
    rng = np.random.default_rng(5)
    system = NormalEquations()
    batches = [(rng.standard_normal((10, 3)), rng.standard_normal((10, 1))) for _ in range(8)]
    for number, (features, target) in enumerate(batches):
        system.add(features, target, number)
    held = np.concatenate([batches[3][0], batches[7][0]])
    np.testing.assert_allclose(system.held.gram, held.T @ held)
