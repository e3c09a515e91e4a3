"""Pareto-smoothed importance sampling (PSIS): Vehtari, Simpson, Gelman, Yao and Gabry, "Pareto smoothed
importance sampling", J Mach Learn Res 2024;25(72):1-58.

The same computation as ArviZ's ``psislw`` (arviz.stats, with ``reff`` 1 and normalised output), written out
here because importing ArviZ (xarray, matplotlib, dask) takes about 1.4 s, more than a whole dose
recommendation; tests/unit/test_psis.py checks it against ``arviz.psislw``. The generalized Pareto fit of the
tail is Zhang and Stephens' empirical Bayes estimate (Technometrics 2009;51:316-25) with the weakly
informative prior on the shape k of Vehtari et al."""

from __future__ import annotations

import numpy as np

__all__ = ["psis_log_weights"]


def psis_log_weights(log_weights) -> tuple[np.ndarray, float]:
    """(Smoothed and normalised log weights (S,), the Pareto shape estimate k) of the importance log weights
    (S,) of independent draws. The largest min(S/5, 3 sqrt(S)) weights are replaced by the expected order
    statistics of a generalized Pareto distribution fitted to them and truncated at the largest raw weight.
    k > 0.7 says the importance sampling is unreliable; k is inf when the tail has 4 draws or fewer (no fit,
    no smoothing)."""
    x = np.array(log_weights, dtype=float)
    n = x.shape[0]
    cutoff_ind = -int(np.ceil(min(n / 5.0, 3 * n ** 0.5))) - 1
    x -= np.max(x)
    order = np.argsort(x)
    cutoff = max(x[order[cutoff_ind]], np.log(np.finfo(float).tiny))
    exp_cutoff = np.exp(cutoff)
    (tail,) = np.where(x > cutoff)
    k = np.inf
    if tail.shape[0] > 4:
        x_tail = x[tail]
        tail_order = np.argsort(x_tail)
        excess = np.exp(x_tail) - exp_cutoff
        k, sigma = _gpd_fit(excess[tail_order])
        if np.isfinite(k):
            probs = np.arange(0.5, tail.shape[0]) / tail.shape[0]
            x[tail[tail_order]] = np.log(_gpd_quantile(probs, k, sigma) + exp_cutoff)
            x[x > 0] = 0.0
    top = np.max(x)
    x -= top + np.log(np.sum(np.exp(x - top)))
    return x, float(k)


def _gpd_fit(ary: np.ndarray) -> tuple[float, float]:
    """(shape k, scale sigma) of a generalized Pareto distribution fitted to the sorted exceedances ``ary``:
    Zhang and Stephens' posterior mean of b = -k/sigma over a grid, then k with a weak prior (Vehtari et al.)."""
    prior_bs, prior_k = 3, 10
    n = ary.shape[0]
    m = 30 + int(n ** 0.5)
    b = 1 - np.sqrt(m / (np.arange(1, m + 1, dtype=float) - 0.5))
    b /= prior_bs * ary[int(n / 4 + 0.5) - 1]
    b += 1 / ary[-1]
    k = np.log1p(-b[:, None] * ary).mean(axis=1)
    len_scale = n * (np.log(-(b / k)) - k - 1)
    weights = 1 / np.exp(len_scale - len_scale[:, None]).sum(axis=1)
    real = weights >= 10 * np.finfo(float).eps
    weights, b = weights[real], b[real]
    weights /= weights.sum()
    b_post = np.sum(b * weights)
    k_post = np.log1p(-b_post * ary).mean()
    sigma = -k_post / b_post
    return (n * k_post + prior_k * 0.5) / (n + prior_k), sigma


def _gpd_quantile(probs: np.ndarray, k: float, sigma: float) -> np.ndarray:
    """Quantiles of the generalized Pareto distribution (shape k, scale sigma) at ``probs`` in (0, 1)."""
    if sigma <= 0:
        return np.full_like(probs, np.nan)
    if abs(k) < np.finfo(float).eps:
        return -np.log1p(-probs) * sigma
    return np.expm1(-k * np.log1p(-probs)) / k * sigma
