"""Exposure metrics of a candidate regimen and the dose that hits a target (linear models: exact).

A regimen (:class:`~hybridpk.data.Regimen`) is continued from ``start`` (h): doses every ``interval`` h,
as infusions of ``duration`` h (0: bolus or oral). For linear models every metric is affine in the dose,
metric = a + b * dose, per posterior draw, so one simulation without the new doses and one of a unit-dose
regimen give it exactly. Metrics: auc24 (mg*h/L over 24 h at steady state, = 24 F dose / (interval CL)),
trough and peak at steady state (the peak of a bolus or oral dose refined around the maximum), auc24 over
day D of the new regimen and conc@T (concentration at time T h after the first new dose), the last two with
the patient's history included.

Other models (a hybrid, a nonlinear structural model) are simulated dose by dose
(:func:`metrics_by_simulation`); there "steady state" is the last interval of a run of the regimen's
doses on their own (the history left out, as at steady state; AUC24 = 24 / interval x the AUC over that
interval, the linear definition at steady state), and the intervals before it tell how far from steady
state that still is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from ..data import Regimen
from ..errors import HybridPKError

__all__ = ["Target", "parse_target", "metric_coefficients", "metrics_by_simulation"]


@dataclass(frozen=True)
class Target:
    """A target window on a metric: ``metric`` in auc24, aucday, trough, peak, conc; bounds ``low``-``high``;
    ``time`` the day (aucday) or the hours after the first new dose (conc)."""

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


def metric_coefficients(model, patient, eta, target: Target, start: float, interval: float, duration: float,
                        cmt: int = 0):
    """(a, b) tensors (S,) with metric = a + b * dose for each ETA draw (S, K) of the patient whose padded
    records are ``patient`` (a one-subject EventBatch) under the FittedPopulation ``model``."""
    if not model.model.structural.linear:
        raise HybridPKError(f"dose optimisation needs a linear model; {model.model.structural.name} is not (yet)")
    s = eta.shape[0]
    zero = torch.zeros(s, dtype=torch.float64, device=eta.device)
    if target.metric == "auc24":
        last = patient.ahead_covariates()[0]      # the regimen ahead: the latest covariates (a new occasion)
        cov = {c: last[k].expand(s) for k, c in enumerate(patient.covariate_names)}
        p = model.individual_parameters(eta, cov)
        structural = model.model.structural
        default_route = cmt in (0, structural.dose_cmt)
        f = p.get("F") if default_route and structural.bioavailability else None   # F: the default route only
        f = torch.ones(s, dtype=torch.float64, device=eta.device) if f is None else f
        return zero, 24.0 * f / (interval * p["CL"])
    if target.metric in ("trough", "peak"):
        # steady state of a unit regimen; trough just before the next dose, peak at the end of the infusion
        # (or the maximum over the interval for a bolus / oral dose)
        if target.metric == "trough":
            grid = [float(interval)]
        elif duration > 0:
            grid = [float(duration)]
        else:
            grid = list(np.linspace(0.0, interval, 97))
        unit = Regimen(0.0, 1.0, interval, 1, duration, cmt, steady_state=True)
        alone = patient.extend(unit, grid, keep_records=False, keep_doses=False, ahead=True)
        coarse = _at(model, alone, eta, len(grid))
        if len(grid) == 1:
            return zero, coarse[:, 0]
        # the maximum of a bolus / oral profile: refined on 401 points between the coarse maximum's neighbours
        # (over all draws), so the peak is exact to ~1e-9 relative rather than to the coarse grid's step
        k = coarse.argmax(1)
        lo, hi = float(grid[max(int(k.min()) - 1, 0)]), float(grid[min(int(k.max()) + 1, len(grid) - 1)])
        fine = list(np.linspace(lo, hi, 401))
        near = patient.extend(unit, fine, keep_records=False, keep_doses=False, ahead=True)
        return zero, torch.maximum(coarse.amax(1), _at(model, near, eta, len(fine)).amax(1))
    if target.metric == "aucday":  # AUC over day D of the new regimen, the patient's history included
        t0 = start + 24.0 * (target.time - 1)
        grid = np.linspace(t0, t0 + 24.0, 481)
        unit = Regimen(start, 1.0, interval, int(np.ceil((t0 + 24 - start) / interval)) + 1, duration, cmt)
        tt = torch.as_tensor(grid, device=eta.device)
        conc0 = _at(model, patient.extend(None, grid, keep_records=False), eta, len(grid))
        conc1 = _at(model, patient.extend(unit, grid, keep_records=False, keep_doses=False, ahead=True), eta,
                    len(grid))
        return torch.trapezoid(conc0, tt, dim=1), torch.trapezoid(conc1, tt, dim=1)
    # concentration at start + T, with the patient's history
    t = [float(start + target.time)]
    unit = Regimen(start, 1.0, interval, 100, duration, cmt)
    a = _at(model, patient.extend(None, t, keep_records=False), eta, 1)[:, -1]
    return a, _at(model, patient.extend(unit, t, keep_records=False, keep_doses=False, ahead=True), eta, 1)[:, -1]


def _at(model, batch, eta, k: int):
    """Concentrations (S, k) at the last ``k`` records of a one-subject batch, for each ETA draw (S, K)."""
    return model.concentrations(batch.select([0] * eta.shape[0]), eta)[:, -k:]


def metrics_by_simulation(conc, patient, target: Target, start: float, interval: float, duration: float, doses,
                          n_doses: int, cmt: int = 0, previous: int = 0):
    """(metric (S, D), the same metric over the ``previous`` intervals before (S, D, previous; earliest first;
    NaN before the first dose), or None) for each of S points and each
    of the ``doses`` (D,) (mg), by simulating the regimen of ``n_doses`` doses from ``start`` (h) for the
    patient of ``patient`` (a one-subject EventBatch: covariates and history); ``conc(batch)`` gives the
    concentrations (S, R) of the S points at every record of a one-subject batch. The steady-state metrics
    (auc24, trough, peak) are taken over the last interval (97 points) of the regimen given on its own (the
    history does not persist at steady state), the earlier values over the intervals before it (None for
    the other metrics); auc24@day and conc@T include the history."""
    tau = float(interval)
    out, prev = [], []
    for d in doses:
        if target.metric in ("auc24", "trough", "peak"):
            end = start + n_doses * tau
            last = np.linspace(end - tau, end, 97)
            grid = np.concatenate([last - (previous - j) * tau for j in range(previous)] + [last])
            c = _sim(conc, patient, Regimen(start, float(d), tau, n_doses, duration, cmt), grid, history=False)
            now = c[:, -97:]
            tt = torch.as_tensor(last - last[0], device=c.device)
            if target.metric == "auc24":
                def m(x):
                    return torch.trapezoid(x, tt, dim=1) * 24.0 / tau
            elif target.metric == "trough":
                def m(x):
                    return x[:, -1]
            elif duration > 0:
                k = int(np.argmin(np.abs(last - (end - tau + duration))))

                def m(x, k=k):
                    return x[:, k]
            else:
                def m(x):
                    return x.amax(1)
            out.append(m(now))
            if previous:
                nan = torch.full_like(m(now), float("nan"))
                earlier = [m(c[:, 97 * j:97 * (j + 1)]) if n_doses > previous - j else nan for j in range(previous)]
                prev.append(torch.stack(earlier, -1))
        elif target.metric == "aucday":
            t0 = start + 24.0 * (target.time - 1)
            grid = np.linspace(t0, t0 + 24.0, 481)
            n = int(np.ceil((t0 + 24 - start) / tau)) + 1
            c = _sim(conc, patient, Regimen(start, float(d), tau, n, duration, cmt), grid)
            out.append(torch.trapezoid(c, torch.as_tensor(grid, device=c.device), dim=1))
        else:
            t = [float(start + target.time)]
            n = int(np.ceil(target.time / tau)) + 1
            out.append(_sim(conc, patient, Regimen(start, float(d), tau, n, duration, cmt), t)[:, -1])
    values = torch.stack(out, 1)
    return values, (torch.stack(prev, 1) if prev else None)


def _sim(conc, patient, regimen, grid, history: bool = True):
    """Concentrations (S, len(grid)) of ``regimen`` (after the patient's history, or alone), at ``grid`` (h)."""
    return conc(patient.extend(regimen, grid, keep_records=False, keep_doses=history,
                               ahead=not history))[:, -len(grid):]
