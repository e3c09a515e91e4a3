"""Individual posterior of a patient's ETAs given a Prior and TDM levels: MAP, Laplace, importance resampling,
and forecasts with prediction intervals."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..population.focei import Problem

__all__ = ["MAPEstimate", "map_estimate", "posterior_samples", "predict_samples"]


@dataclass(frozen=True)
class MAPEstimate:
    """MAP (maximum a posteriori) ETAs of each patient with their Laplace covariance.

    ``eta`` (N, K), ``cov`` (N, K, K) Laplace covariance (inverse Hessian of -log posterior), ``objective``
    (N,) -2 log posterior at the mode (without constants), ``parameters`` DataFrame ID + individual
    parameters at the mode, ``n_levels`` observations used per patient.
    """

    prior: object = field(repr=False)
    dataset: object = field(repr=False)
    problem: object = field(repr=False)
    eta: torch.Tensor
    cov: torch.Tensor
    objective: torch.Tensor
    parameters: pd.DataFrame
    n_levels: np.ndarray

    def shrinkage(self) -> np.ndarray:
        """Per patient and ETA: 1 - posterior SD / prior SD (near 1: the data say little)."""
        post = torch.sqrt(torch.diagonal(self.cov, dim1=1, dim2=2))
        prior = torch.sqrt(torch.diagonal(self.prior.omega))
        return (1 - post / prior).numpy()


def map_estimate(prior, dataset) -> MAPEstimate:
    """MAP ETAs for every patient of ``dataset`` in one batched call (Gauss-Newton with an exact gradient and
    line search; converged to |step| < 1e-9), and their Laplace covariance from the exact Hessian."""
    prob = Problem(prior.pm, dataset)
    n, k = dataset.n_subjects, prior.pm.n_eta
    oinv = torch.linalg.inv(prior.omega)
    eta = prob.ebe(prior.theta, oinv, prior.sd, torch.zeros(n, k, dtype=torch.float64), tol=1e-10)
    obj, _, hess = prob.exact_hessian(prior.theta, oinv, prior.sd, eta)
    ok = torch.linalg.cholesky_ex(hess).info == 0
    if not bool(ok.all()):
        fo = 2 * prob.fo_hessian(prior.theta, oinv, prior.sd, eta)
        hess = torch.where(ok[:, None, None], hess, fo)
    cov = 2.0 * torch.linalg.inv(hess)
    with torch.no_grad():
        ip = prior.pm.individual(prior.theta, eta, prob.cov)
    params = pd.DataFrame({"ID": list(dataset.ids), **{k2: v.numpy() for k2, v in ip.items()}})
    return MAPEstimate(prior=prior, dataset=dataset, problem=prob, eta=eta, cov=cov, objective=obj.detach(),
                       parameters=params, n_levels=prob.obs.sum(1).numpy())


def posterior_samples(est: MAPEstimate, index: int = 0, n: int = 1000, seed: int = 0, proposal_scale: float = 1.5):
    """Draws (n, K) from the posterior of patient ``index``: sampling-importance-resampling from a widened
    Laplace approximation (multivariate t, 5 d.f.). Returns (samples, effective sample size)."""
    gen = torch.Generator().manual_seed(seed)
    prob = est.problem
    k = est.eta.shape[1]
    m = 5 * n
    mean = est.eta[index]
    chol = torch.linalg.cholesky(est.cov[index] * proposal_scale ** 2)
    z = torch.randn(m, k, generator=gen, dtype=torch.float64)
    df = 5.0
    g = torch.from_numpy(np.random.default_rng(seed).chisquare(df, m))
    t = z / torch.sqrt(g / df).unsqueeze(-1)
    draws = mean + t @ chol.T
    sub = prob.batch.select([index] * m)
    cov = {c: v[[index] * m] for c, v in prob.cov.items()}
    oinv = torch.linalg.inv(est.prior.omega)
    with torch.no_grad():
        p = est.prior.pm.individual(est.prior.theta, draws, cov)
        from ..solve import simulate

        f = simulate(est.prior.pm.structural, p, sub, throw=False).ipred
        obs = prob.obs[[index] * m]
        v = est.prior.pm.error.variance(f, est.prior.sd)
        v = torch.where(obs, v, torch.ones_like(v))
        r = torch.where(obs, prob.y[[index] * m] - f, torch.zeros_like(f))
        data = torch.where(obs, r * r / v + torch.log(v), torch.zeros_like(v)).sum(1)
        logpost = -0.5 * (data + torch.einsum("nk,kl,nl->n", draws, oinv, draws))
        # log density of the multivariate t proposal (up to a constant)
        maha = (torch.linalg.solve_triangular(chol, (draws - mean).T, upper=False) ** 2).sum(0)
        logq = -0.5 * (df + k) * torch.log1p(maha / df)
        logw = torch.nan_to_num(logpost - logq, nan=-np.inf)
        w = torch.softmax(logw, 0)
        ess = float(1.0 / (w * w).sum())
        idx = torch.multinomial(w, n, replacement=True, generator=gen)
    return draws[idx], ess


def predict_samples(prior, batch, cov: dict, eta_samples):
    """Concentrations (S, R) at the records of the one-subject ``batch`` for each ETA draw (S, K)."""
    from ..solve import simulate

    s = eta_samples.shape[0]
    sub = batch.select([0] * s)
    c = {k: v[[0] * s] for k, v in cov.items()}
    with torch.no_grad():
        p = prior.pm.individual(prior.theta, eta_samples, c)
        return simulate(prior.pm.structural, p, sub, throw=False).ipred


def to_inference_data(samples, prior, params: dict | None = None):
    """ArviZ InferenceData with the posterior draws (ETAs and individual parameters), one chain."""
    import warnings

    with warnings.catch_warnings():   # arviz announces its 1.0 refactor on import
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az

    post = {name: samples[:, j].numpy()[None, :] for j, name in enumerate(prior.pm.etas)}
    for k, v in (params or {}).items():
        post[k] = np.asarray(v)[None, :]
    return az.from_dict(posterior=post)
