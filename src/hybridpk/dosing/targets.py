"""Exposure metrics of a candidate regimen and the dose that hits a target (linear models: exact).

A regimen is continued from ``start`` (h): doses of ``dose`` mg every ``interval`` h, as infusions of
``duration`` h (0: bolus or oral). For linear models every metric is affine in the dose,
metric = a + b * dose, per posterior draw, so one simulation at dose 0 and one at dose 1 give it exactly.
Metrics: auc24 (mg*h/L over 24 h at steady state, = 24 F dose / (interval CL)), trough and peak at
steady state, conc@T (concentration at time T h after the first new dose, history included).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..errors import HybridPKError

__all__ = ["Target", "parse_target", "regimen_records", "metric_coefficients"]


@dataclass(frozen=True)
class Target:
    """A target window on a metric: ``metric`` in auc24, trough, peak, conc@T; bounds ``low``-``high``."""

    metric: str
    low: float
    high: float
    time: float | None = None

    @property
    def mid(self) -> float:
        return 0.5 * (self.low + self.high)

    @property
    def label(self) -> str:
        if self.metric == "aucday":
            return f"auc24@day{self.time:g}"
        return self.metric if self.time is None else f"conc@{self.time:g}"


def parse_target(text: str) -> Target:
    """'auc24=400:600' (steady state), 'auc24@2=400:600' (day 2 of the new regimen, history included),
    'trough=10:15', 'peak=20:40', 'conc@36=10:15' (or a single value 'trough=12')."""
    m = re.fullmatch(r"\s*(auc24@([0-9]+)|auc24|trough|peak|conc@([0-9.]+))\s*=\s*([0-9.]+)\s*(?::\s*([0-9.]+))?\s*",
                     text.lower())
    if not m:
        raise HybridPKError(f"cannot read target {text!r}; write e.g. 'auc24=400:600', 'auc24@2=400:600', "
                            "'trough=10:15', 'peak=20:40' or 'conc@36=10:15'")
    low = float(m.group(4))
    high = float(m.group(5)) if m.group(5) else low
    if high < low:
        raise HybridPKError(f"target {text!r}: the upper bound is below the lower bound")
    if m.group(2):
        if int(m.group(2)) < 1:
            raise HybridPKError("auc24@DAY: days count from 1 (the first 24 h of the new regimen)")
        return Target("aucday", low, high, float(m.group(2)))
    if m.group(3):
        return Target("conc", low, high, float(m.group(3)))
    return Target(m.group(1), low, high, None)


def regimen_records(patient_id, start: float, dose: float, interval: float, duration: float, n_doses: int,
                    cmt: int = 0) -> pd.DataFrame:
    """The recommended regimen as NONMEM dose records (one record with ADDL), ready to append to the data."""
    rate = dose / duration if duration > 0 else 0.0
    return pd.DataFrame([{"ID": patient_id, "TIME": float(start), "AMT": float(dose), "RATE": rate,
                          "ADDL": int(n_doses - 1), "II": float(interval), "EVID": 1, "MDV": 1, "CMT": cmt,
                          "DV": 0.0}])


def _one_subject_dataset(history: pd.DataFrame, extra: pd.DataFrame):
    from ..data.dataset import read_nonmem

    df = pd.concat([history, extra], ignore_index=True)
    order = np.lexsort((df["_o"].to_numpy(), df["TIME"].to_numpy()))
    df = df.iloc[order].drop(columns="_o").reset_index(drop=True)
    return read_nonmem(df, covariates=None)


def metric_coefficients(prior, patient_df: pd.DataFrame, eta, target: Target, start: float, interval: float,
                        duration: float, cmt: int = 0):
    """(a, b) tensors (S,) with metric = a + b * dose for each ETA draw (S, K)."""
    if not prior.pm.structural.linear:
        raise HybridPKError(f"dose optimisation needs a linear model; {prior.pm.structural.name} is not (yet)")
    pid = patient_df["ID"].iloc[0]
    first = patient_df.iloc[0]
    covs = {c: float(first[c]) for c in prior.pm.covariates}
    s = eta.shape[0]
    if target.metric == "auc24":
        cov = {c: torch.full((s,), v, dtype=torch.float64) for c, v in covs.items()}
        p = prior.pm.individual(prior.theta, eta, cov)
        f = p.get("F", torch.ones(s, dtype=torch.float64))
        return torch.zeros(s, dtype=torch.float64), 24.0 * f / (interval * p["CL"])
    # simulate a unit regimen
    base = {"ID": pid, "DV": 0.0, "MDV": 1, "EVID": 0, "AMT": 0.0, "RATE": 0.0, "ADDL": 0, "II": 0.0, "SS": 0,
            "CMT": cmt, **covs}
    if target.metric in ("trough", "peak"):
        # steady state of a unit regimen; trough just before the next dose, peak at the end of the infusion
        # (or the maximum over the interval for a bolus / oral dose)
        if target.metric == "trough":
            grid = [float(interval)]
        elif duration > 0:
            grid = [float(duration)]
        else:
            grid = list(np.linspace(0.0, interval, 97))
        hist = pd.DataFrame([{**base, "TIME": 0.0, "AMT": 1.0, "RATE": (1.0 / duration) if duration > 0 else 0.0,
                              "SS": 1, "II": interval, "EVID": 1, "_o": 0}])
        obs = pd.DataFrame([{**base, "TIME": t, "EVID": 2, "_o": 1} for t in grid])
        ds = _one_subject_dataset(hist, obs)
        b = _predict_all(prior, ds.to_batch(covariates=list(prior.pm.covariates)), eta)[:, 1:].amax(1)
        return torch.zeros(s, dtype=torch.float64), b
    elif target.metric == "aucday":  # AUC over day D of the new regimen, the patient's history included
        t0 = start + 24.0 * (target.time - 1)
        grid = np.linspace(t0, t0 + 24.0, 481)
        hist = patient_df.assign(_o=0)
        doses_hist = hist[hist.EVID.isin([1, 4])]
        obs = pd.DataFrame([{**base, "TIME": float(t), "EVID": 2, "_o": 1} for t in grid])
        unit = regimen_records(pid, start, 1.0, interval, duration, int(np.ceil((t0 + 24 - start) / interval)) + 1,
                               cmt).assign(_o=0)
        for c, v in covs.items():
            unit[c] = v
        tt = torch.as_tensor(grid)
        conc0 = _predict_all(prior, _one_subject_dataset(doses_hist, obs).to_batch(
            covariates=list(prior.pm.covariates)), eta)
        conc1 = _predict_all(prior, _one_subject_dataset(unit, obs).to_batch(covariates=list(prior.pm.covariates)),
                             eta)
        n_hist = len(doses_hist)
        a = torch.trapezoid(conc0[:, n_hist:n_hist + len(grid)], tt, dim=1)
        b = torch.trapezoid(conc1[:, 1:1 + len(grid)], tt, dim=1)
        return a, b
    else:  # concentration at start + T, with the patient's history
        hist = patient_df.assign(_o=0)
        for col, v in base.items():
            if col not in hist:
                hist[col] = v
        unit = regimen_records(pid, start, 1.0, interval, duration, 100, cmt).assign(_o=0)
        for c, v in covs.items():
            unit[c] = v
        obs = pd.DataFrame([{**base, "TIME": float(start + target.time), "EVID": 2, "_o": 1}])
        ds0 = _one_subject_dataset(hist[hist.EVID.isin([1, 4])] if len(hist) else hist, obs)
        ds = _one_subject_dataset(unit, obs)
        b0 = ds0.to_batch(covariates=list(prior.pm.covariates))
        a = _predict_last(prior, b0, eta)
    b1 = ds.to_batch(covariates=list(prior.pm.covariates))
    return a, _predict_last(prior, b1, eta)


def _predict_all(prior, batch, eta):
    """Concentrations (S, R) at every record of a one-subject batch, for each ETA draw."""
    from ..solve import simulate

    s = eta.shape[0]
    sub = batch.select([0] * s)
    cov = sub.baseline_covariates()
    with torch.no_grad():
        p = prior.pm.individual(prior.theta, eta, cov)
        return simulate(prior.pm.structural, p, sub, throw=False).ipred


def _predict_last(prior, batch, eta):
    last = int(batch.record_mask[0].sum()) - 1
    return _predict_all(prior, batch, eta)[:, last]
