"""Individual estimates under a fitted population model: MAP ETAs (NONMEM's EBEs, the POSTHOC step) with
their Laplace covariance, and draws from each patient's posterior by importance resampling."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .focei import Problem

__all__ = ["IndividualEstimates", "map_estimate", "posterior_draws", "importance_resample"]


@dataclass(frozen=True)
class IndividualEstimates:
    """MAP (maximum a posteriori) ETAs of each patient with their Laplace covariance.

    ``eta`` (N, K); ``cov`` (N, K, K) the Laplace covariance (inverse Hessian of -log posterior);
    ``objective`` (N,) -2 log posterior at the mode (without constants); ``parameters`` DataFrame of ID and
    the individual parameters at the mode (natural scale); ``n_levels`` (N,) observations used per patient;
    ``model`` the FittedPopulation they come from, ``problem`` its objective bound to ``dataset``.
    """

    model: object = field(repr=False)
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
        prior = torch.sqrt(torch.diagonal(self.model.omega.tensor()))
        return (1 - post / prior).numpy()

    def patient(self, index: int) -> "IndividualEstimates":
        """The estimate of patient ``index`` alone (its records, MAP and covariance; a Problem of its own), as
        :func:`map_estimate` on that patient gives it (the batched Newton steps are per patient)."""
        from dataclasses import replace

        sub = self.dataset.subset([self.dataset.ids[index]])
        prob = self.problem
        one = Problem(prob.pm, sub, method=prob.method, rtol=prob.rtol, atol=prob.atol, estimation=prob.estimation)
        part = slice(index, index + 1)
        return replace(self, dataset=sub, problem=one, eta=self.eta[part], cov=self.cov[part],
                       objective=self.objective[part], parameters=self.parameters.iloc[part].reset_index(drop=True),
                       n_levels=self.n_levels[part])

    def posterior(self, index: int = 0, n: int = 1000, seed: int = 0):
        """(draws (n, K), effective sample size) from the posterior of patient ``index``; see
        :func:`posterior_draws`."""
        return posterior_draws(self, index, n, seed)


def map_estimate(model, dataset, estimation: str = "FOCE-I") -> IndividualEstimates:
    """MAP ETAs of every patient of ``dataset`` under the FittedPopulation ``model``, in one batched call:
    Newton's method with the exact Hessian and per-patient line search, from ETA = 0, to |step| < 1e-10
    (the same EBE code as the FOCE-I fit), and their Laplace covariance from the exact Hessian.
    ``estimation`` "FOCE" or "FO": the modes of the objective without interaction (the residual variance at
    ETA = 0), as NONMEM reports the EBEs of such a run; the posterior itself is the FOCE-I default."""
    pm = model.model
    theta, omega, sd = model.theta.tensors(), model.omega.tensor(), model.sigma.sd_tensors()
    prob = Problem(pm, dataset, estimation=estimation)
    prob.require_positive_variance(theta, sd)
    n, k = dataset.n_subjects, pm.n_eta
    zeros = torch.zeros(n, k, dtype=torch.float64)
    if k:
        oinv = torch.linalg.inv(omega)
        eta = prob.ebe(theta, oinv, sd, zeros, tol=1e-10)
        obj, _, hess = prob.exact_hessian(theta, oinv, sd, eta)
        ok = torch.linalg.cholesky_ex(hess).info == 0
        if not bool(ok.all()):
            fo = 2 * prob.fo_hessian(theta, oinv, sd, eta)
            hess = torch.where(ok[:, None, None], hess, fo)
        cov = 2.0 * torch.linalg.inv(hess)
    else:   # no IIV: the individual prediction is the population one
        eta, cov = zeros, torch.zeros(n, 0, 0, dtype=torch.float64)
        with torch.no_grad():
            obj = prob.objective(theta, omega, sd, eta)
    with torch.no_grad():
        ip = pm.parameters(theta, eta, prob.batch)
    # one row per patient: a parameter that changes between records is reported at the first record
    params = pd.DataFrame({"ID": list(dataset.ids), **{k2: (v[:, 0] if v.dim() == 2 else v).numpy()
                                                      for k2, v in ip.items()}})
    return IndividualEstimates(model=model, dataset=dataset, problem=prob, eta=eta, cov=cov, objective=obj.detach(),
                               parameters=params, n_levels=prob.obs.sum(1).numpy())


def posterior_draws(est: IndividualEstimates, index: int = 0, n: int = 1000, seed: int = 0,
                    proposal_scale: float = 1.5):
    """Draws (n, K) from the posterior of patient ``index``: sampling-importance-resampling from a widened
    Laplace approximation (multivariate t, 5 d.f.; :func:`importance_resample`). Returns (draws, effective
    sample size)."""
    model = est.model
    pm = model.model
    prob = est.problem
    oinv = torch.linalg.inv(model.omega.tensor())
    sd = model.sigma.sd_tensors()
    theta = model.theta.tensors()

    def log_post(draws):
        m = draws.shape[0]
        f = model.concentrations(prob.batch.select([index] * m), draws)
        if pm.error.ltbs:   # the likelihood is on the log scale (prob.y holds log DV)
            f = torch.log(f.clamp(min=1e-30))
        obs = prob.obs[[index] * m]
        v = pm.residual_variance(theta, draws, prob.batch.select([index] * m), f, sd)
        v = torch.where(obs, v, torch.ones_like(v))
        r = torch.where(obs, prob.y[[index] * m] - f, torch.zeros_like(f))
        data = torch.where(obs, r * r / v + torch.log(v), torch.zeros_like(v)).sum(1)
        return -0.5 * (data + torch.einsum("nk,kl,nl->n", draws, oinv, draws))

    limit = PRIOR_SD_LIMIT * torch.sqrt(torch.diagonal(model.omega.tensor()))
    return importance_resample(est.eta[index], est.cov[index], log_post, n, seed, proposal_scale, limit=limit)


#: proposals with an ETA beyond this many prior SDs (sqrt OMEGA) are not evaluated (see importance_resample)
PRIOR_SD_LIMIT = 6.0


def importance_resample(mean, cov, log_post, n: int = 1000, seed: int = 0, proposal_scale: float = 1.5,
                        limit=None):
    """Sampling-importance-resampling (Rubin 1988) of ``n`` draws from a posterior known up to a constant,
    ``log_post(draws (M, K)) -> (M,)``: 5 n proposals from a multivariate t (5 d.f.) centred at ``mean`` (K,)
    with scale ``proposal_scale``^2 ``cov`` (the Laplace covariance, widened so the tails are covered), then
    resampled with their importance weights. Returns (draws (n, K), the weights' effective sample size
    1 / sum w^2). Seeded (torch CPU generator and numpy).

    ``limit`` (K,): proposals with |draw_k| > limit_k get weight 0 without evaluating ``log_post``: the t's tails
    reach ETAs whose parameters no solver integrates in reasonable time (KA e^10), and beyond 6 prior SDs the
    prior density is below e^-18 of its mode, so the posterior mass dropped is negligible unless the
    likelihood outweighs that, in which case the mode would lie there. The limit is never closer to ``mean`` than 6
    proposal SDs (a mode far out in the population keeps its neighbourhood)."""
    gen = torch.Generator().manual_seed(seed)
    k = mean.shape[0]
    m = 5 * n
    chol = torch.linalg.cholesky(cov * proposal_scale ** 2)
    z = torch.randn(m, k, generator=gen, dtype=torch.float64)
    df = 5.0
    g = torch.from_numpy(np.random.default_rng(seed).chisquare(df, m))
    t = z / torch.sqrt(g / df).unsqueeze(-1)
    draws = mean + t @ chol.T
    if limit is not None:   # never closer to the mode than 6 proposal SDs (a patient far out in the population)
        reach = mean.abs() + 6 * proposal_scale * torch.sqrt(torch.diagonal(cov))
        limit = torch.maximum(torch.as_tensor(limit, dtype=draws.dtype), reach)
    inside = torch.ones(m, dtype=torch.bool) if limit is None else (draws.abs() <= limit).all(-1)
    with torch.no_grad():
        logpost = torch.full((m,), -float("inf"), dtype=torch.float64)
        if bool(inside.any()):
            logpost[inside] = log_post(draws[inside]).to(torch.float64)
        # log density of the multivariate t proposal (up to a constant)
        maha = (torch.linalg.solve_triangular(chol, (draws - mean).T, upper=False) ** 2).sum(0)
        logq = -0.5 * (df + k) * torch.log1p(maha / df)
        logw = torch.nan_to_num(logpost - logq, nan=-np.inf)
        w = torch.softmax(logw, 0)
        ess = float(1.0 / (w * w).sum())
        idx = torch.multinomial(w, n, replacement=True, generator=gen)
    return draws[idx], ess
