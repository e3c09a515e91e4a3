"""Predictions of a fitted population model for (new) patients: EBEs from their own data, then IPRED."""

from __future__ import annotations

import pandas as pd
import torch

from .focei import Problem
from .result import load_model_file
from .spec import model_from_spec

__all__ = ["load_fit", "predict_population"]


def load_fit(run_dir):
    """(PopulationModel, theta, omega, sd) from a run folder written by ``hybridpk fit`` (JSON only)."""
    data = load_model_file(run_dir)
    pm = model_from_spec(data["spec"])
    theta = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in data["theta"].items()}
    om = data["omega"]
    if not om:
        omega = torch.zeros(0, 0, dtype=torch.float64)
    elif isinstance(om[0], list):      # full matrix (current format)
        omega = torch.tensor(om, dtype=torch.float64)
    else:                              # list of variances
        omega = torch.diag(torch.tensor(om, dtype=torch.float64))
    sd = {k: torch.tensor(float(v), dtype=torch.float64) for k, v in data["sigma_sd"].items()}
    return pm, theta, omega, sd


def predict_population(run_dir, dataset) -> pd.DataFrame:
    """ID, TIME, DV, MDV, PRED (ETA = 0), IPRED (ETAs estimated from each subject's observations; 0 for a
    subject without observations) and the ETAs, for every record of ``dataset``."""
    pm, theta, omega, sd = load_fit(run_dir)
    prob = Problem(pm, dataset)
    n, k = dataset.n_subjects, pm.n_eta
    eta0 = torch.zeros(n, k, dtype=torch.float64)
    eta = prob.ebe(theta, torch.linalg.inv(omega), sd, eta0) if k else eta0
    with torch.no_grad():
        pred = prob.predict(theta, eta0)
        ipred = prob.predict(theta, eta)
        if pm.error.ltbs:   # log scale inside the fit; concentrations out
            pred, ipred = torch.exp(pred), torch.exp(ipred)
    b = prob.batch
    df = dataset.to_dataframe()
    out = pd.DataFrame({"ID": df.ID.to_numpy(), "TIME": df.TIME.to_numpy(), "DV": df.DV.to_numpy(),
                        "MDV": df.MDV.to_numpy(), "PRED": b.to_rows(pred), "IPRED": b.to_rows(ipred)})
    idx = b.subject_of_rows()
    for j, name in enumerate(pm.etas):
        out[name] = eta[idx, j].numpy()
    return out
