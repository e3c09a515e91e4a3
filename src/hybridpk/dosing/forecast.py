"""Forecasts of a patient's concentrations with prediction intervals, and the forecast plot."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .posterior import predict_samples


def _grid_batch(est, times, extra_doses: pd.DataFrame | None = None):
    """The patient's records + future doses + EVID=2 rows at ``times``: (batch, covariates, row is a time)."""
    from ..data.dataset import read_nonmem

    prior = est.prior
    df = est.dataset.to_dataframe()
    first = df.iloc[0]
    rows = [df.assign(_o=0)]
    if extra_doses is not None and len(extra_doses):
        x = extra_doses.copy()
        for c in df.columns:
            if c not in x:
                x[c] = first[c] if c in prior.pm.covariates else 0
        rows.append(x[df.columns].assign(_o=0))
    t = np.asarray(times, dtype=float)
    base = {c: (first[c] if c in prior.pm.covariates or c == "ID" else 0) for c in df.columns}
    pts = pd.DataFrame([{**base, "TIME": tt, "EVID": 2, "MDV": 1, "AMT": 0.0, "DV": 0.0, "_o": 1} for tt in t])
    rows.append(pts)
    full = pd.concat(rows, ignore_index=True)
    order = np.lexsort((full["_o"].to_numpy(), full["TIME"].to_numpy()))
    full = full.iloc[order].reset_index(drop=True)
    is_pt = full["_o"].to_numpy() == 1
    ds = read_nonmem(full.drop(columns="_o"), covariates=list(prior.pm.covariates))
    batch = ds.to_batch(covariates=list(prior.pm.covariates))
    cov = batch.baseline_covariates()
    return batch, cov, is_pt


def forecast(est, samples, times, extra_doses: pd.DataFrame | None = None, seed: int = 0,
             level: float = 0.90, return_draws: bool = False):
    """TIME, PRED_MAP, median and ``level`` prediction interval (parameter uncertainty from the posterior
    draws plus residual error) of the concentration at ``times`` (h), optionally with future doses.
    With ``return_draws`` also the predictive draws (S, T) (for PIT / calibration checks)."""
    prior = est.prior
    t = np.asarray(times, dtype=float)
    batch, cov, is_pt = _grid_batch(est, t, extra_doses)
    full_len = len(is_pt)
    conc = predict_samples(prior, batch, cov, samples)[:, :full_len][:, is_pt]
    point = predict_samples(prior, batch, cov, est.eta[:1])[:, :full_len][:, is_pt][0]
    gen = torch.Generator().manual_seed(seed)
    sd = torch.sqrt(prior.pm.error.variance(conc, prior.sd))
    z = torch.randn(conc.shape, generator=gen, dtype=conc.dtype)
    if prior.pm.error.ltbs:   # additive on the log scale = multiplicative on concentrations
        noisy = conc * torch.exp(sd * z)
    else:
        noisy = (conc + sd * z).clamp(min=0.0)  # no negative levels
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    table = pd.DataFrame({"TIME": t, "IPRED_MAP": point.numpy(), "MEDIAN": conc.median(0).values.numpy(),
                          f"PI{int(level * 100)}_LOW": torch.quantile(noisy, lo, 0).numpy(),
                          f"PI{int(level * 100)}_HIGH": torch.quantile(noisy, hi, 0).numpy(),
                          f"CI{int(level * 100)}_LOW": torch.quantile(conc, lo, 0).numpy(),
                          f"CI{int(level * 100)}_HIGH": torch.quantile(conc, hi, 0).numpy()})
    return (table, noisy.numpy()) if return_draws else table


def plot_forecast(fc: pd.DataFrame, est, path=None, title: str = ""):
    """Forecast band with the TDM levels; returns the matplotlib figure (saved to ``path`` if given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = est.dataset.to_dataframe()
    obs = df[(df.EVID == 0) & (df.MDV == 0)]
    doses = df[df.EVID.isin([1, 4])]
    low = [c for c in fc.columns if c.startswith("PI") and c.endswith("LOW")][0]
    high = low.replace("LOW", "HIGH")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.fill_between(fc.TIME, fc[low], fc[high], alpha=0.25, label=f"{low[2:4]}% prediction interval")
    ax.plot(fc.TIME, fc.IPRED_MAP, lw=1.5, label="MAP prediction")
    ax.plot(obs.TIME, obs.DV, "o", color="black", label="TDM levels")
    for t in doses.TIME:
        ax.axvline(t, color="grey", lw=0.5, alpha=0.5)
    ax.set(xlabel="time (h)", ylabel="concentration (mg/L)", title=title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
