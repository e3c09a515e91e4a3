"""Replicates of a design simulated from a fitted population model (the simulations behind a VPC)."""

from __future__ import annotations

import pandas as pd
import torch

__all__ = ["replicates", "eta_sampler", "simulate_replicates", "residual_noise", "model_variance"]


def residual_noise(error_model, variance, conc, gen):
    """DV drawn around the concentrations ``conc`` (mg/L) with the residual error of variance ``variance``
    (same shape; :meth:`PopulationModel.residual_variance`, e.g. ADD^2 + (PROP C)^2 for NONMEM's
    Y = F + F EPS(1) + EPS(2)): additive, or multiplicative C exp(SD EPS) for log-transform-both-sides. The
    draws come from ``gen`` (a CPU generator) on any device: the same seed, the same DV."""
    z = torch.randn(conc.shape, generator=gen, dtype=conc.dtype, device="cpu").to(conc.device)
    s = torch.sqrt(variance)
    return conc * torch.exp(s * z) if error_model.ltbs else conc + s * z


def eta_sampler(fitted):
    """A function (n, gen) -> ETAs (n, K) drawn from the fitted OMEGA (by the CPU generator ``gen``), on the
    model's device."""
    omega = fitted.omega.tensor()
    chol = torch.linalg.cholesky(omega) if fitted.model.n_eta else omega

    def draw(n: int, gen):
        eta = torch.randn(n, fitted.model.n_eta, generator=gen, dtype=torch.float64, device="cpu") @ chol.T
        return eta.to(fitted.device)

    return draw


def replicates(dataset, covariates, error_model, sd: dict, n: int, seed: int, draw, variance=None,
               device="cpu") -> pd.DataFrame:
    """REP, ID, TIME, EVID, MDV, IPRED, DV and per-subject columns for every record of ``n`` replicates of
    ``dataset``'s design: ``draw(batch, gen)`` gives each replicate's concentrations (N, R) and its
    per-subject values {column: (N,)} (the ETAs, ...); DV adds the residual error at the observation records
    (0 elsewhere), of variance ``variance(batch, conc, per_subject)`` (default: the error model's at the
    concentrations). Seeded (torch CPU generator); computed on ``device``."""
    gen = torch.Generator().manual_seed(int(seed))
    batch = dataset.to_batch(covariates=list(covariates), device=device)
    df, idx, obs = dataset.to_dataframe(), batch.subject_of_rows(), batch.is_obs
    out = []
    for rep in range(1, int(n) + 1):
        conc, per_subject = draw(batch, gen)
        v = variance(batch, conc, per_subject) if variance is not None else error_model.variance(conc, sd)
        dv = torch.where(obs, residual_noise(error_model, v, conc, gen), torch.zeros_like(conc))
        table = pd.DataFrame({"REP": rep, "ID": df.ID.to_numpy(), "TIME": df.TIME.to_numpy(),
                              "EVID": df.EVID.to_numpy(), "MDV": df.MDV.to_numpy(), "IPRED": batch.to_rows(conc),
                              "DV": batch.to_rows(dv)})
        for name, values in per_subject.items():
            table[name] = values[idx].cpu().numpy()
        out.append(table)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def simulate_replicates(fitted, dataset, n: int = 1, seed: int = 0) -> pd.DataFrame:
    """:func:`replicates` of ``dataset``'s design under ``fitted`` (a FittedPopulation): new ETAs from OMEGA
    in each replicate."""
    pm = fitted.model
    etas = eta_sampler(fitted)

    def draw(batch, gen):
        eta = etas(batch.n_subjects, gen)
        return fitted.concentrations(batch, eta), {name: eta[:, j] for j, name in enumerate(pm.etas)}

    sd = fitted.sigma.sd_tensors(fitted.device)
    return replicates(dataset, pm.covariates, pm.error, sd, n, seed, draw,
                      model_variance(pm, fitted.theta.tensors(fitted.device), sd), device=fitted.device)


def model_variance(pm, theta: dict, sd: dict):
    """A ``variance`` for :func:`replicates`: the PopulationModel ``pm``'s residual variance at the THETAs
    ``theta`` and each replicate's ETAs, read back from its per-subject columns (named as ``pm.etas``), for a
    $ERROR whose SD reads THETAs, ETAs or data items."""
    def variance(batch, conc, per_subject):
        eta = (torch.stack([per_subject[name] for name in pm.etas], 1) if pm.etas
               else conc.new_zeros(conc.shape[0], 0))
        return pm.residual_variance(theta, eta, batch, conc, sd)
    return variance
