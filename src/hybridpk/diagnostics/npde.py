"""Normalised prediction distribution errors (NPDE: Brendel, Comets, Laffont, Laveille, Mentre, Pharm Res
2006; 23:2036; Comets, Brendel, Mentre, Comput Methods Programs Biomed 2008; 90:154).

For each patient the fitted model simulates K replicates of its design. The observed vector y_i and every
simulated vector are decorrelated with the simulations' own mean E_i and covariance V_i
(y*_i = V_i^(-1/2) (y_i - E_i), Cholesky factor), the prediction discrepancy of each observation is the
fraction of decorrelated simulations below the decorrelated observation, pde_ij (kept within [1/(2K),
1 - 1/(2K)]), and npde_ij = Phi^-1(pde_ij). Under the model, the NPDE are independent N(0, 1).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import norm

__all__ = ["npde", "plot_npde"]


def npde(model, dataset, n: int = 1000, seed: int = 0) -> pd.DataFrame:
    """ID, TIME, DV, PDE and NPDE of every observation of ``dataset`` under ``model`` (a FittedPopulation or
    HybridFit), from ``n`` replicates."""
    df = dataset.to_dataframe()
    obs = ((df.EVID == 0) & (df.MDV == 0)).to_numpy()
    sims = model.simulate(dataset, n=n, seed=seed)
    sim = sims.DV.to_numpy(float).reshape(n, len(df))
    out = []
    for pid in dataset.ids:
        rows = np.nonzero((df.ID == pid).to_numpy() & obs)[0]
        if rows.size == 0:
            continue
        y, s = df.DV.to_numpy(float)[rows], sim[:, rows]                           # (m,), (n, m)
        mean = s.mean(0)
        cov = np.cov(s, rowvar=False).reshape(rows.size, rows.size)
        try:
            chol = np.linalg.cholesky(cov + 1e-12 * np.eye(rows.size) * max(np.trace(cov), 1e-12))
        except np.linalg.LinAlgError:
            chol = np.diag(np.sqrt(np.clip(np.diag(cov), 1e-24, None)))
        dec_y = np.linalg.solve(chol, y - mean)
        dec_s = np.linalg.solve(chol, (s - mean).T).T
        pde = (dec_s < dec_y).mean(0)
        pde = np.clip(pde, 1.0 / (2 * n), 1 - 1.0 / (2 * n))
        out.append(pd.DataFrame({"ID": pid, "TIME": df.TIME.to_numpy(float)[rows], "DV": y, "PDE": pde,
                                 "NPDE": norm.ppf(pde)}))
    return pd.concat(out, ignore_index=True)


def plot_npde(table: pd.DataFrame, time_unit: str = "h"):
    """QQ plot of the NPDE against N(0, 1), their histogram with the N(0, 1) density, and NPDE vs TIME."""
    from matplotlib.figure import Figure

    v = np.sort(table.NPDE.to_numpy(float))
    q = norm.ppf((np.arange(1, v.size + 1) - 0.5) / max(v.size, 1))
    fig = Figure(figsize=(12, 3.8))
    a, b, c = fig.subplots(1, 3)
    a.scatter(q, v, s=8, alpha=0.6)
    a.plot([-3, 3], [-3, 3], "k-", lw=1)
    a.set_xlabel("N(0, 1) quantile")
    a.set_ylabel("NPDE")
    a.set_title("QQ plot of NPDE")
    b.hist(v, bins=20, density=True, alpha=0.6)
    x = np.linspace(-4, 4, 200)
    b.plot(x, norm.pdf(x), "k-", lw=1)
    b.set_xlabel("NPDE")
    b.set_title(f"mean {v.mean():.2f}, variance {v.var(ddof=1):.2f}")
    c.scatter(table.TIME, table.NPDE, s=8, alpha=0.6)
    for level in (0, 1.96, -1.96):
        c.axhline(level, color="k", lw=1, ls="-" if level == 0 else ":")
    c.set_xlabel(f"TIME ({time_unit})")
    c.set_ylabel("NPDE")
    c.set_title("NPDE vs TIME")
    fig.tight_layout()
    return fig
