"""Replicates of a design simulated from a fitted population model (the simulations behind a VPC)."""

from __future__ import annotations

import pandas as pd
import torch

__all__ = ["simulate_replicates", "residual_noise"]


def residual_noise(error_model, sd: dict, conc, gen):
    """DV drawn around the concentrations ``conc`` (mg/L) with the residual error: Var = ADD^2 + (PROP C)^2
    (NONMEM's Y = F + F EPS(1) + EPS(2)), or multiplicative C exp(ADD EPS) for log-transform-both-sides."""
    z = torch.randn(conc.shape, generator=gen, dtype=conc.dtype)
    s = torch.sqrt(error_model.variance(conc, sd))
    return conc * torch.exp(s * z) if error_model.ltbs else conc + s * z


def simulate_replicates(fitted, dataset, n: int = 1, seed: int = 0) -> pd.DataFrame:
    """REP, ID, TIME, EVID, MDV, IPRED, DV and the ETAs for every record of ``n`` replicates of ``dataset``'s
    design under ``fitted`` (a FittedPopulation); seeded (torch CPU generator)."""
    pm = fitted.model
    gen = torch.Generator().manual_seed(int(seed))
    batch = dataset.to_batch(covariates=list(pm.covariates))
    omega = fitted.omega.tensor()
    chol = torch.linalg.cholesky(omega) if pm.n_eta else omega
    sd = fitted.sigma.sd_tensors()
    df = dataset.to_dataframe()
    idx = batch.subject_of_rows()
    obs = batch.is_obs
    out = []
    for rep in range(1, int(n) + 1):
        eta = torch.randn(batch.n_subjects, pm.n_eta, generator=gen, dtype=torch.float64) @ chol.T
        conc = fitted.concentrations(batch, eta)
        dv = torch.where(obs, residual_noise(pm.error, sd, conc, gen), torch.zeros_like(conc))
        table = pd.DataFrame({"REP": rep, "ID": df.ID.to_numpy(), "TIME": df.TIME.to_numpy(),
                              "EVID": df.EVID.to_numpy(), "MDV": df.MDV.to_numpy(), "IPRED": batch.to_rows(conc),
                              "DV": batch.to_rows(dv)})
        for j, name in enumerate(pm.etas):
            table[name] = eta[idx, j].numpy()
        out.append(table)
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()
