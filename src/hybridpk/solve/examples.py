"""Example populations with known truth, used by the bundled data, tutorials, tests and benchmarks."""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["EHC_TYPICAL", "simulate_ehc_population"]

#: typical values of the enterohepatic-recirculation example (1cmt_oral_ehc); meals 4 h and 10 h after dose
EHC_TYPICAL = dict(CL=4.0, V=40.0, KA=1.2, KGB=0.3, KEMPT=3.0, TMEAL=4.0, MEALII=6.0, TEMPT=0.5)


def simulate_ehc_population(n: int, seed: int = 0, *, dose: float = 100.0, samples=(8, 12),
                            proportional: float = 0.10, additive: float = 0.05, horizon: float = 24.0,
                            covariates: dict | None = None, cl_scale=None, recirculating: bool = True):
    """Simulate ``n`` patients after one oral dose: every other patient recirculates (KGB > 0), the others do
    not (KGB = 0); with ``recirculating=False`` none does (a population the 1-cmt oral model describes
    fully). IIV: 30% CL, 20% V, 30% KA, 30% KGB. Each patient has 8-12 samples (``samples``) at random
    quarter-hour times in (0, ``horizon``) h; DV = C (1 + proportional eps1) + additive eps2. ``covariates``
    {name: (n,) values}: one value per patient, written on every record; ``cl_scale`` (n,): factors on each
    patient's CL (a covariate relation of the truth). Neither changes the random draws.

    Returns (Dataset, truth DataFrame with ID, RECIRC, the individual parameters and the covariates).
    """
    from ..data.dataset import read_nonmem
    from .population_sim import observe

    rng = np.random.default_rng([int(seed), 0xE4C])
    rows, truth = [], []
    grid = np.round(np.arange(0.25, horizon, 0.25), 2)
    for i in range(n):
        recirc = recirculating and i % 2 == 0
        p = dict(EHC_TYPICAL)
        p["CL"] *= float(np.exp(rng.normal(0, 0.3))) * (float(cl_scale[i]) if cl_scale is not None else 1.0)
        p["V"] *= float(np.exp(rng.normal(0, 0.2)))
        p["KA"] *= float(np.exp(rng.normal(0, 0.3)))
        p["KGB"] = p["KGB"] * float(np.exp(rng.normal(0, 0.3))) if recirc else 0.0
        k = int(rng.integers(samples[0], samples[1] + 1))
        t = np.sort(rng.choice(grid, k, replace=False))
        cov = {k: float(v[i]) for k, v in (covariates or {}).items()}
        rows.append(dict(ID=i + 1, TIME=0.0, DV=0.0, AMT=dose, EVID=1, MDV=1, CMT=1, **cov))
        rows += [dict(ID=i + 1, TIME=float(tt), DV=0.0, AMT=0.0, EVID=0, MDV=0, CMT=2, **cov) for tt in t]
        truth.append(dict(ID=i + 1, RECIRC=int(recirc), **p, **cov))
    par = pd.DataFrame(truth)
    ds, _ = observe("1cmt_oral_ehc", read_nonmem(pd.DataFrame(rows)), {k: par[k].to_numpy() for k in EHC_TYPICAL},
                    rng, proportional=proportional, additive=additive, decimals=5)
    return ds, par
