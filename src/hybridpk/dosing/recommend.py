"""One function per clinical question (as posologyr): MAP estimate + posterior + the regimen for a target."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..errors import HybridPKError
from . import safety
from .posterior import map_estimate, posterior_samples
from .prior import load_prior
from .targets import metric_coefficients, parse_target, regimen_records

__all__ = ["Recommendation", "recommend_dose", "estimate_patient"]


@dataclass(frozen=True)
class Recommendation:
    """A dose recommendation with its uncertainty. ``records`` are NONMEM dose records (append them to the
    patient's data to simulate the regimen)."""

    model: str
    dose: float
    interval: float
    duration: float
    start: float
    target: str
    exposure: dict
    pta: float
    map_parameters: dict
    warnings: tuple
    records: pd.DataFrame = field(repr=False)
    candidates: list = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {"model": self.model, "dose_mg": self.dose, "interval_h": self.interval,
                "infusion_duration_h": self.duration, "start_h": self.start, "target": self.target,
                "probability_of_target_attainment": self.pta, "predicted_exposure": self.exposure,
                "map_parameters": self.map_parameters, "warnings": list(self.warnings),
                "records": self.records.to_dict(orient="records"), "candidates": self.candidates}


def estimate_patient(prior, dataset, n_samples: int = 1000, seed: int = 0):
    """MAP + posterior draws for one patient: (MAPEstimate, samples (S, K), ESS, warnings)."""
    prior = load_prior(prior)
    df = dataset.to_dataframe()
    warns = safety.check_patient(prior, df)
    est = map_estimate(prior, dataset)
    warns += safety.check_levels(est)
    samples, ess = posterior_samples(est, 0, n_samples, seed) if prior.pm.n_eta else (est.eta, float("nan"))
    if prior.pm.n_eta and ess < 100:
        warns.append(f"the posterior sampling is poorly resolved (effective sample size {ess:.0f}); intervals "
                     "are approximate")
    return est, samples, ess, warns


def map_parameters_summary(est, samples) -> dict:
    prior = est.prior
    cov = {c: v[[0] * samples.shape[0]] for c, v in est.problem.cov.items()}
    with torch.no_grad():
        draws = prior.pm.individual(prior.theta, samples, cov)
    out = {}
    for name in draws:
        v = draws[name].numpy()
        out[name] = {"map": float(est.parameters[name].iloc[0]), "median": float(np.median(v)),
                     "p05": float(np.quantile(v, 0.05)), "p95": float(np.quantile(v, 0.95))}
    return out


def _candidate(tgt, dose, tau, a_map, b_map, a_s, b_s) -> dict:
    """Exposure of one (dose, interval) candidate: MAP value, posterior median/5%/95% and the probability of
    target attainment over the posterior draws (metric = a + b dose)."""
    m = (a_s + b_s * dose).numpy()
    return {"dose_mg": dose, "interval_h": tau, "pta": float(np.mean((m >= tgt.low) & (m <= tgt.high))),
            "map_exposure": float(a_map[0] + b_map[0] * dose), "median": float(np.median(m)),
            "p05": float(np.quantile(m, 0.05)), "p95": float(np.quantile(m, 0.95))}


def recommend_dose(prior, dataset, target, *, interval: float | None = None, intervals=(8.0, 12.0, 24.0),
                   duration: float = 1.0, dose_step: float = 250.0, max_dose: float | None = None,
                   start: float | None = None, n_doses: int = 10, n_samples: int = 1000, seed: int = 0,
                   estimate=None) -> Recommendation:
    """The dose (and interval) that puts ``target`` in its window for this patient.

    Parameters
    ----------
    prior : Prior, spec name/path, or run folder
    dataset : Dataset  one patient: dose history, covariates and TDM levels
    target : str or Target  e.g. 'auc24=400:600' (mg*h/L, steady state), 'trough=10:15', 'peak=25:40',
        'conc@36=10:15' (mg/L, 36 h after the first new dose)
    interval : dosing interval (h); if None the best of ``intervals`` (highest probability of target
        attainment, then the smallest daily dose)
    duration : infusion duration (h); 0 for bolus/oral
    dose_step : doses are multiples of this (mg); max_dose : cap per dose (mg)
    start : time of the first new dose (h; default: last dose + its interval, or last record)
    Returns a Recommendation with the probability of target attainment computed from posterior draws.
    """
    prior = load_prior(prior)
    tgt = parse_target(target) if isinstance(target, str) else target
    est, samples, ess, warns = estimate if estimate is not None else estimate_patient(prior, dataset, n_samples,
                                                                                      seed)
    df = dataset.to_dataframe()
    if start is None:
        doses = df[df.EVID.isin([1, 4])]
        last = doses.iloc[-1]
        ii = float(last.get("II", 0) or 0)
        addl = int(last.get("ADDL", 0) or 0)
        if ii > 0:
            start = float(last.TIME + (addl + 1) * ii)
        elif len(doses) >= 2:   # continue the last observed dosing interval
            start = float(last.TIME + (last.TIME - doses.iloc[-2].TIME))
        else:
            start = float(df.TIME.max())
    cmt = 0
    options = [float(interval)] if interval else [float(i) for i in intervals]
    best = None
    cands = []
    for tau in options:
        a_map, b_map = metric_coefficients(prior, df, est.eta[:1], tgt, start, tau, duration, cmt)
        a_s, b_s = metric_coefficients(prior, df, samples, tgt, start, tau, duration, cmt)
        raw = (tgt.mid - float(a_map[0])) / float(b_map[0])
        if not math.isfinite(raw) or raw <= 0:
            continue
        lo = max(dose_step, math.floor(raw / dose_step) * dose_step)
        options_d = sorted({lo, lo + dose_step})
        if max_dose is not None:
            options_d = sorted({min(d, math.floor(max_dose / dose_step) * dose_step) for d in options_d})
        for d in options_d:
            cands.append(_candidate(tgt, d, tau, a_map, b_map, a_s, b_s))
            key = (round(cands[-1]["pta"], 6), -abs(cands[-1]["map_exposure"] - tgt.mid) / tgt.mid, -d * 24 / tau)
            if best is None or key > best[0]:
                best = (key, cands[-1])
    if best is None:
        raise HybridPKError("no dose within the constraints reaches the target; check the target and limits")
    choice = best[1]
    warns = list(warns) + safety.check_dose(choice["dose_mg"], max_dose)
    pid = df.ID.iloc[0]
    records = regimen_records(pid, start, choice["dose_mg"], choice["interval_h"], duration, n_doses, cmt)
    exposure = {tgt.label: {"map": choice["map_exposure"], "median": choice["median"], "p05": choice["p05"],
                            "p95": choice["p95"], "target": [tgt.low, tgt.high]}}
    return Recommendation(model=prior.name, dose=choice["dose_mg"], interval=choice["interval_h"],
                          duration=duration, start=start, target=str(target), exposure=exposure,
                          pta=choice["pta"], map_parameters=map_parameters_summary(est, samples),
                          warnings=tuple(warns), records=records, candidates=cands)


def interval_for_dose(prior, dataset, dose: float, target, *, intervals=(6.0, 8.0, 12.0, 24.0, 36.0, 48.0),
                      duration: float = 1.0, n_samples: int = 1000, seed: int = 0, estimate=None) -> Recommendation:
    """The dosing interval (from ``intervals``, h) that best keeps ``target`` in its window with a fixed
    ``dose`` (mg): highest probability of target attainment, then the prediction closest to the middle."""
    prior = load_prior(prior)
    tgt = parse_target(target) if isinstance(target, str) else target
    est, samples, ess, warns = estimate if estimate is not None else estimate_patient(prior, dataset, n_samples,
                                                                                      seed)
    df = dataset.to_dataframe()
    start = float(df[df.EVID.isin([1, 4])].TIME.max())
    best, cands = None, []
    for tau in intervals:
        a_map, b_map = metric_coefficients(prior, df, est.eta[:1], tgt, start + tau, tau, duration)
        a_s, b_s = metric_coefficients(prior, df, samples, tgt, start + tau, tau, duration)
        cands.append(_candidate(tgt, dose, tau, a_map, b_map, a_s, b_s))
        key = (round(cands[-1]["pta"], 6), -abs(cands[-1]["map_exposure"] - tgt.mid))
        if best is None or key > best[0]:
            best = (key, cands[-1])
    c = best[1]
    records = regimen_records(df.ID.iloc[0], start + c["interval_h"], dose, c["interval_h"], duration, 10)
    exposure = {tgt.label: {"map": c["map_exposure"], "median": c["median"], "p05": c["p05"], "p95": c["p95"],
                            "target": [tgt.low, tgt.high]}}
    return Recommendation(model=prior.name, dose=dose, interval=c["interval_h"], duration=duration,
                          start=start + c["interval_h"], target=str(target), exposure=exposure, pta=c["pta"],
                          map_parameters=map_parameters_summary(est, samples), warnings=tuple(warns),
                          records=records, candidates=cands)


def time_to_concentration(prior, dataset, concentration: float, *, horizon: float = 168.0, n_samples: int = 1000,
                          seed: int = 0, estimate=None) -> dict:
    """When the concentration falls to ``concentration`` (mg/L) after the last dose if nothing more is given
    (e.g. when to re-dose after a toxic level): MAP time and the 5-95% posterior interval (h, absolute time).
    ``None`` where it does not happen within ``horizon`` h."""
    from .posterior import predict_samples
    from .forecast import _grid_batch

    prior = load_prior(prior)
    est, samples, ess, warns = estimate if estimate is not None else estimate_patient(prior, dataset, n_samples,
                                                                                      seed)
    df = dataset.to_dataframe()
    t_last = float(df[df.EVID.isin([1, 4])].TIME.max())
    grid = np.linspace(t_last, t_last + horizon, int(horizon * 20) + 1)
    batch, cov, is_pt = _grid_batch(est, grid)
    draws = torch.cat([est.eta[:1], samples])
    conc = predict_samples(prior, batch, cov, draws)[:, : len(is_pt)][:, is_pt].numpy()
    times = []
    for row in conc:
        peak = int(np.argmax(row))
        below = np.nonzero(row[peak:] <= concentration)[0]
        times.append(float(grid[peak + below[0]]) if len(below) else np.nan)
    times = np.array(times)
    post = np.where(np.isfinite(times[1:]), times[1:], np.inf)   # not reached: beyond the horizon
    q05, q95 = np.quantile(post, 0.05), np.quantile(post, 0.95)
    return {"concentration": concentration, "map_time_h": None if np.isnan(times[0]) else times[0],
            "p05_h": float(q05) if np.isfinite(q05) else None, "p95_h": float(q95) if np.isfinite(q95) else None,
            "fraction_reached_within_horizon": float(np.isfinite(post).mean()), "warnings": list(warns)}
