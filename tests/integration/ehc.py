"""The EHC population the hybrid's tests train on: simulated patients and their ODE-only FOCE-I fit."""

from __future__ import annotations

import warnings

from hybridpk.population import build_model, fit_population
from hybridpk.solve.examples import simulate_ehc_population


def fitted_ehc_population(n: int, seed: int):
    """(dataset, truth, model, fit): ``n`` EHC patients (hybridpk.solve.examples, ``seed``) and the FOCE-I fit of
    1cmt_oral (IIV on CL, V, KA, combined error; no standard errors) that a hybrid is trained on."""
    ds, truth = simulate_ehc_population(n, seed=seed)
    pm = build_model("1cmt_oral", iiv=["CL", "V", "KA"], error="combined")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_population(pm, ds, progress=False, covariance=False)
    return ds, truth, pm, fit
