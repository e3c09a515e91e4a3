"""A loading dose ahead of a maintenance regimen: the target reached from the first dosing interval.

The maintenance regimen (dose D every tau h) is the one :func:`~hybridpk.dosing.recommend_dose` recommends
for a steady-state target; the loading dose L is given at its start and the maintenance follows from
start + tau. L is the whole number of dose steps whose MAP first-interval metric lies closest to the target's
middle, the metric taken as the steady-state one is, over the first interval, the history included:

* trough: the concentration at start + tau, just before the first maintenance dose;
* peak: the end of the infusion, or the maximum over the first interval (97 points) for a bolus or oral dose;
* auc24: the AUC over the first 24 h from start (maintenance doses inside it included; quadrature as
  :func:`~hybridpk.dosing.auc`).

For a linear model the metric is affine in L, so the MAP solution is exact; otherwise it is bracketed and
found by Brent's method (the metric grows with L). The textbook one-compartment rule L = D / (1 - e^(-k tau))
(Rowland and Tozer, Clinical Pharmacokinetics, ch. 11) is this definition for a trough with an IV bolus and
no history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..data import Regimen
from ..errors import HybridPKError
from .exposure import _breakpoints, _quadrature
from .recommend import Recommendation, estimate_patient, recommend_dose
from .targets import parse_target

__all__ = ["LoadingDose", "loading_dose"]


@dataclass(frozen=True)
class LoadingDose:
    """``dose_mg`` the loading dose (None: the history already reaches the target's middle, no loading dose),
    given at ``maintenance.start``; ``exposure`` its first-interval metric (MAP, posterior median, 90% interval,
    target) and ``pta`` the probability that it lies in the window; ``maintenance`` the regimen that follows
    (its first dose one interval later); ``records`` the loading and maintenance dose records."""

    dose_mg: float | None
    exposure: dict
    pta: float
    maintenance: Recommendation
    warnings: tuple
    records: pd.DataFrame = field(repr=False)

    def to_dict(self) -> dict:
        return {"loading_dose_mg": self.dose_mg, "loading_exposure": self.exposure, "loading_pta": self.pta,
                "maintenance": self.maintenance.to_dict(), "warnings": list(self.warnings),
                "records": self.records.to_dict(orient="records")}


def loading_dose(model, dataset, target, *, dose_step: float | None = None, max_dose: float | None = None,
                 n_samples: int | None = None, seed: int = 0, posterior=None, **maintenance) -> LoadingDose:
    """The loading dose (mg) that puts the first interval's ``target`` (auc24, trough or peak) at the middle
    of its window, ahead of the maintenance regimen :func:`recommend_dose` chooses with the same arguments
    (``maintenance``: interval, intervals, duration, start, n_doses, cmt). The loading dose is a whole
    number of ``dose_step`` (mg; None: the maintenance's, from the patient's record as :func:`recommend_dose`
    takes it), at most ``max_dose``, given as the maintenance doses are (same duration and compartment).
    ``posterior``: the patient's PatientPosterior when already computed."""
    tgt = parse_target(target) if isinstance(target, str) else target
    if tgt.metric not in ("auc24", "trough", "peak"):
        raise HybridPKError(f"target {tgt.label}: a loading dose is computed for a steady-state target (auc24, "
                            "trough or peak), reached from the first interval")
    post = posterior or estimate_patient(model, dataset, n_samples, seed)
    rec = recommend_dose(post.model, dataset, tgt, dose_step=dose_step, max_dose=max_dose, posterior=post,
                         **maintenance)
    reg, dose_step = rec.regimen, rec.dose_step_mg
    follow = Regimen(reg.start + reg.interval, reg.dose, reg.interval, reg.n_doses, reg.duration, reg.cmt)

    def first(points, amount: float):
        return _first_interval(post.estimate, points, tgt, reg, follow, amount)

    at_map = post.estimate.eta[:1]
    raw = _solve(lambda amount: float(first(at_map, amount)[0]), tgt.mid, reg.dose)
    top = math.inf if max_dose is None else math.floor(float(max_dose) / dose_step + 1e-9) * dose_step
    warns = list(rec.warnings)
    if raw <= 0:
        amount = None
        warns.append(f"no loading dose: the doses already given put the MAP {tgt.label} of the first interval at "
                     f"{float(first(at_map, 0.0)[0]):.3g}, at or above the target's middle {tgt.mid:g}")
        values = first(post.draws, 0.0).cpu().numpy()
        m_map = float(first(at_map, 0.0)[0])
    else:
        steps = {k * dose_step for k in (math.floor(raw / dose_step), math.ceil(raw / dose_step))}
        steps = sorted({min(max(s, dose_step), top) for s in steps})
        amount = min(steps, key=lambda s: abs(float(first(at_map, s)[0]) - tgt.mid))
        if raw > top:
            warns.append(f"the loading dose is capped at the maximum dose {top:g} mg (the MAP solution is "
                         f"{raw:.4g} mg)")
        values = first(post.draws, amount).cpu().numpy()
        m_map = float(first(at_map, amount)[0])
    pta = float(np.mean((values >= tgt.low) & (values <= tgt.high)))
    exposure = {f"{tgt.label} (first interval)": {
        "map": m_map, "median": float(np.median(values)), "p05": float(np.quantile(values, 0.05)),
        "p95": float(np.quantile(values, 0.95)), "target": [tgt.low, tgt.high]}}
    pid = dataset.to_dataframe().ID.iloc[0]
    records = follow.records(pid) if amount is None else pd.concat(
        [Regimen(reg.start, amount, reg.interval, 1, reg.duration, reg.cmt).records(pid), follow.records(pid)],
        ignore_index=True)
    return LoadingDose(dose_mg=amount, exposure=exposure, pta=pta, maintenance=rec, warnings=tuple(warns),
                       records=records)


def _first_interval(est, points, tgt, reg: Regimen, follow: Regimen, amount: float) -> torch.Tensor:
    """The first-interval metric (S,) for each point (S, P) with a loading dose ``amount`` (mg) at reg.start."""
    load = Regimen(reg.start, float(amount), reg.interval, 1, reg.duration, reg.cmt)
    with_load = est.batch.extend(load, ()) if amount > 0 else est.batch
    s = points.shape[0]
    if tgt.metric == "trough":
        t = [reg.start + reg.interval]
        return est.concentrations(with_load.extend(None, t).select([0] * s), points)[:, -1]
    if tgt.metric == "peak":
        t = [reg.start + reg.duration] if reg.duration > 0 else list(np.linspace(reg.start, reg.start + reg.interval,
                                                                                  97))
        return est.concentrations(with_load.extend(None, t).select([0] * s), points)[:, -len(t):].amax(1)
    full = with_load.extend(follow, ())
    grid, weights = _quadrature(_breakpoints(full, reg.start, reg.start + 24.0, est))
    conc = est.concentrations(full.extend(None, grid).select([0] * s), points)[:, -len(grid):]
    return (conc * torch.as_tensor(weights, dtype=conc.dtype, device=conc.device)).sum(1)


def _solve(metric, mid: float, scale: float) -> float:
    """The loading amount (mg) whose metric is ``mid``: affine through 0 and ``scale`` when that holds to 1e-9
    at 2 x scale (linear models), else Brent's root over a doubling bracket; <= 0 when the history alone
    reaches it."""
    from scipy.optimize import brentq

    m0, m1, m2 = metric(0.0), metric(scale), metric(2 * scale)
    if m0 >= mid:
        return 0.0
    slope = (m1 - m0) / scale
    if slope > 0 and abs(m0 + 2 * scale * slope - m2) <= 1e-9 * max(abs(m2), 1e-12):
        return (mid - m0) / slope
    hi = scale
    while metric(hi) < mid:
        hi *= 2
        if hi > 2 ** 30 * scale:
            raise HybridPKError("no loading dose reaches the target's middle (the metric does not grow with the dose)")
    return float(brentq(lambda a: metric(a) - mid, 0.0, hi, xtol=1e-9, rtol=1e-12))
