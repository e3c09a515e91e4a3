"""hybridpk's Pareto-smoothed importance sampling (population.psis) against ArviZ's psislw, which it replaces in the
dosing path (ArviZ's import takes longer than a dose recommendation): the smoothed, normalised log weights and the
Pareto shape k agree to rounding on light and heavy tails, with and without a fitted tail."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from hybridpk.population.psis import psis_log_weights


def arviz_psislw(logw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz as az

        smoothed, k = az.psislw(np.array(logw, dtype=float), reff=1.0)
    return np.asarray(smoothed, dtype=float), float(np.asarray(k))


def log_weights(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":            # a proposal close to the target: light tail, k < 0.5
        return rng.normal(0.0, 0.3, n)
    if kind == "student":           # heavy tail: k near or above 0.7
        return np.log(np.abs(rng.standard_t(1.5, n)) + 1e-3) * 3.0
    if kind == "spike":             # one dominating weight, the rest flat
        x = rng.normal(0.0, 0.1, n)
        x[rng.integers(n)] += 40.0
        return x
    return rng.normal(0.0, 1.0, n) - 1e3     # far from 0: the shift to the maximum


@pytest.mark.parametrize("kind", ["normal", "student", "spike", "offset"])
@pytest.mark.parametrize("n", [12, 300, 2500])
def test_the_same_smoothed_weights_and_k_as_arviz(kind, n):
    for seed in range(3):
        logw = log_weights(kind, n, seed)
        ours, k = psis_log_weights(logw)
        theirs, k_az = arviz_psislw(logw)
        assert ours.shape == logw.shape
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
        if np.isfinite(k_az):
            assert k == pytest.approx(k_az, rel=1e-12, abs=1e-14)
        else:
            assert not np.isfinite(k)
        assert np.exp(ours).sum() == pytest.approx(1.0, rel=1e-12)


def test_a_tail_of_four_draws_or_fewer_is_not_smoothed():
    logw = np.linspace(-2.0, 0.0, 12)        # 12 draws: a tail of ceil(12/5) = 3 draws, no fit
    ours, k = psis_log_weights(logw)
    assert not np.isfinite(k)
    np.testing.assert_allclose(ours, logw - np.log(np.exp(logw).sum()), rtol=1e-13)


def test_the_input_is_not_changed():
    logw = log_weights("student", 300, 1)
    kept = logw.copy()
    psis_log_weights(logw)
    np.testing.assert_array_equal(logw, kept)
