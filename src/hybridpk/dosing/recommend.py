"""One function per clinical question (as posologyr): the patient's posterior, then the regimen for a
target, the interval for a dose, the time to a concentration."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..data import Regimen
from ..errors import HybridPKError
from . import safety
from .model import dosing_model
from .targets import metric_coefficients, parse_target

__all__ = ["PatientPosterior", "Recommendation", "estimate_patient", "recommend_dose", "interval_for_dose",
           "time_to_concentration"]


@dataclass(frozen=True)
class PatientPosterior:
    """One patient's posterior under a model: ``estimate`` (IndividualEstimates: MAP ETAs, Laplace
    covariance, individual parameters), ``draws`` (S, K) posterior draws of the ETAs (importance
    resampling), ``ess`` their effective sample size, ``warnings`` about the patient and the estimate."""

    estimate: object = field(repr=False)
    draws: torch.Tensor = field(repr=False)
    ess: float
    warnings: tuple

    @property
    def model(self):
        return self.estimate.model

    def parameters(self) -> dict:
        """Per individual parameter: MAP value, posterior median and 5%/95% quantiles (natural scale)."""
        est, samples = self.estimate, self.draws
        cov = {c: v[[0] * samples.shape[0]] for c, v in est.problem.cov.items()}
        with torch.no_grad():
            draws = est.model.individual_parameters(samples, cov)
        out = {}
        for name in draws:
            v = draws[name].numpy()
            out[name] = {"map": float(est.parameters[name].iloc[0]), "median": float(np.median(v)),
                         "p05": float(np.quantile(v, 0.05)), "p95": float(np.quantile(v, 0.95))}
        return out

    def to_inference_data(self):
        """ArviZ InferenceData with the posterior draws of the ETAs, one chain."""
        import warnings

        with warnings.catch_warnings():   # arviz announces its 1.0 refactor on import
            warnings.simplefilter("ignore", FutureWarning)
            import arviz as az

        post = {name: self.draws[:, j].numpy()[None, :] for j, name in enumerate(self.model.model.etas)}
        return az.from_dict(posterior=post)


@dataclass(frozen=True)
class Recommendation:
    """A dose recommendation with its uncertainty. ``regimen`` the recommended :class:`Regimen`;
    ``records`` its NONMEM dose record (append it to the patient's data to simulate the regimen)."""

    model: str
    regimen: Regimen
    target: str
    exposure: dict
    pta: float
    map_parameters: dict
    warnings: tuple
    records: pd.DataFrame = field(repr=False)
    candidates: list = field(default_factory=list, repr=False)

    @property
    def dose(self) -> float:
        return self.regimen.dose

    @property
    def interval(self) -> float:
        return self.regimen.interval

    @property
    def duration(self) -> float:
        return self.regimen.duration

    @property
    def start(self) -> float:
        return self.regimen.start

    def to_dict(self) -> dict:
        return {"model": self.model, "dose_mg": self.dose, "interval_h": self.interval,
                "infusion_duration_h": self.duration, "start_h": self.start, "target": self.target,
                "probability_of_target_attainment": self.pta, "predicted_exposure": self.exposure,
                "map_parameters": self.map_parameters, "warnings": list(self.warnings),
                "records": self.records.to_dict(orient="records"), "candidates": self.candidates}


def estimate_patient(model, dataset, n_samples: int = 1000, seed: int = 0) -> PatientPosterior:
    """MAP estimate and posterior draws for one patient under ``model`` (any fitted model, a run folder or a
    published spec name), with the safety warnings."""
    model = dosing_model(model)
    warns = safety.check_patient(model, dataset.to_dataframe())
    est = model.estimate(dataset)
    warns += safety.check_levels(est)
    samples, ess = est.posterior(0, n_samples, seed) if model.model.n_eta else (est.eta, float("nan"))
    if model.model.n_eta and ess < 100:
        warns.append(f"the posterior sampling is poorly resolved (effective sample size {ess:.0f}); intervals "
                     "are approximate")
    return PatientPosterior(estimate=est, draws=samples, ess=ess, warnings=tuple(warns))


def _candidate(tgt, dose, tau, a_map, b_map, a_s, b_s) -> dict:
    """Exposure of one (dose, interval) candidate: MAP value, posterior median/5%/95% and the probability of
    target attainment over the posterior draws (metric = a + b dose)."""
    m = (a_s + b_s * dose).numpy()
    return {"dose_mg": dose, "interval_h": tau, "pta": float(np.mean((m >= tgt.low) & (m <= tgt.high))),
            "map_exposure": float(a_map[0] + b_map[0] * dose), "median": float(np.median(m)),
            "p05": float(np.quantile(m, 0.05)), "p95": float(np.quantile(m, 0.95))}


def _coefficients(post: PatientPosterior, tgt, start, tau, duration):
    """(a, b) at the MAP and over the posterior draws for one interval."""
    est = post.estimate
    patient = est.problem.batch.select([0])
    a_map, b_map = metric_coefficients(est.model, patient, est.eta[:1], tgt, start, tau, duration)
    a_s, b_s = metric_coefficients(est.model, patient, post.draws, tgt, start, tau, duration)
    return a_map, b_map, a_s, b_s


def _default_start(df: pd.DataFrame) -> float:
    """Last dose + its interval, or the last observed dosing interval continued, or the last record."""
    doses = df[df.EVID.isin([1, 4])]
    last = doses.iloc[-1]
    ii = float(last.get("II", 0) or 0)
    addl = int(last.get("ADDL", 0) or 0)
    if ii > 0:
        return float(last.TIME + (addl + 1) * ii)
    if len(doses) >= 2:   # continue the last observed dosing interval
        return float(last.TIME + (last.TIME - doses.iloc[-2].TIME))
    return float(df.TIME.max())


def _exposure(tgt, choice) -> dict:
    return {tgt.label: {"map": choice["map_exposure"], "median": choice["median"], "p05": choice["p05"],
                        "p95": choice["p95"], "target": [tgt.low, tgt.high]}}


def recommend_dose(model, dataset, target, *, interval: float | None = None, intervals=(8.0, 12.0, 24.0),
                   duration: float = 1.0, dose_step: float = 250.0, max_dose: float | None = None,
                   start: float | None = None, n_doses: int = 10, n_samples: int = 1000, seed: int = 0,
                   posterior: PatientPosterior | None = None) -> Recommendation:
    """The dose (and interval) that puts ``target`` in its window for this patient.

    Parameters
    ----------
    model : any fitted model (FittedPopulation, HybridFit), run folder, or published spec name/path
    dataset : Dataset  one patient: dose history, covariates and TDM levels
    target : str or Target  e.g. 'auc24=400:600' (mg*h/L, steady state), 'trough=10:15', 'peak=25:40',
        'conc@36=10:15' (mg/L, 36 h after the first new dose)
    interval : dosing interval (h); if None the best of ``intervals`` (highest probability of target
        attainment, then the smallest daily dose)
    duration : infusion duration (h); 0 for bolus/oral
    dose_step : doses are multiples of this (mg); max_dose : cap per dose (mg)
    start : time of the first new dose (h; default: last dose + its interval, or last record)
    posterior : the patient's PatientPosterior when already computed (``estimate_patient``)
    Returns a Recommendation with the probability of target attainment computed from posterior draws.
    """
    model = dosing_model(model)
    tgt = parse_target(target) if isinstance(target, str) else target
    post = posterior or estimate_patient(model, dataset, n_samples, seed)
    df = dataset.to_dataframe()
    start = _default_start(df) if start is None else start
    options = [float(interval)] if interval else [float(i) for i in intervals]
    best, cands = None, []
    for tau in options:
        a_map, b_map, a_s, b_s = _coefficients(post, tgt, start, tau, duration)
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
    warns = list(post.warnings) + safety.check_dose(choice["dose_mg"], max_dose)
    regimen = Regimen(start, choice["dose_mg"], choice["interval_h"], n_doses, duration)
    return Recommendation(model=model.name, regimen=regimen, target=str(target), exposure=_exposure(tgt, choice),
                          pta=choice["pta"], map_parameters=post.parameters(), warnings=tuple(warns),
                          records=regimen.records(df.ID.iloc[0]), candidates=cands)


def interval_for_dose(model, dataset, dose: float, target, *, intervals=(6.0, 8.0, 12.0, 24.0, 36.0, 48.0),
                      duration: float = 1.0, n_samples: int = 1000, seed: int = 0,
                      posterior: PatientPosterior | None = None) -> Recommendation:
    """The dosing interval (from ``intervals``, h) that best keeps ``target`` in its window with a fixed
    ``dose`` (mg): highest probability of target attainment, then the prediction closest to the middle."""
    model = dosing_model(model)
    tgt = parse_target(target) if isinstance(target, str) else target
    post = posterior or estimate_patient(model, dataset, n_samples, seed)
    df = dataset.to_dataframe()
    last = float(df[df.EVID.isin([1, 4])].TIME.max())
    best, cands = None, []
    for tau in intervals:
        cands.append(_candidate(tgt, dose, tau, *_coefficients(post, tgt, last + tau, tau, duration)))
        key = (round(cands[-1]["pta"], 6), -abs(cands[-1]["map_exposure"] - tgt.mid))
        if best is None or key > best[0]:
            best = (key, cands[-1])
    c = best[1]
    regimen = Regimen(last + c["interval_h"], dose, c["interval_h"], 10, duration)
    return Recommendation(model=model.name, regimen=regimen, target=str(target), exposure=_exposure(tgt, c),
                          pta=c["pta"], map_parameters=post.parameters(), warnings=post.warnings,
                          records=regimen.records(df.ID.iloc[0]), candidates=cands)


def time_to_concentration(model, dataset, concentration: float, *, horizon: float = 168.0, n_samples: int = 1000,
                          seed: int = 0, posterior: PatientPosterior | None = None) -> dict:
    """When the concentration falls to ``concentration`` (mg/L) after the last dose if nothing more is given
    (e.g. when to re-dose after a toxic level): MAP time and the 5-95% posterior interval (h, absolute time).
    ``None`` where it does not happen within ``horizon`` h."""
    model = dosing_model(model)
    post = posterior or estimate_patient(model, dataset, n_samples, seed)
    est = post.estimate
    df = dataset.to_dataframe()
    t_last = float(df[df.EVID.isin([1, 4])].TIME.max())
    grid = np.linspace(t_last, t_last + horizon, int(horizon * 20) + 1)
    draws = torch.cat([est.eta[:1], post.draws])
    batch = est.problem.batch.select([0]).extend(None, grid)
    conc = model.concentrations(batch.select([0] * draws.shape[0]), draws)[:, -len(grid):].numpy()
    times = []
    for row in conc:
        peak = int(np.argmax(row))
        below = np.nonzero(row[peak:] <= concentration)[0]
        times.append(float(grid[peak + below[0]]) if len(below) else np.nan)
    times = np.array(times)
    post_t = np.where(np.isfinite(times[1:]), times[1:], np.inf)   # not reached: beyond the horizon
    q05, q95 = np.quantile(post_t, 0.05), np.quantile(post_t, 0.95)
    return {"concentration": concentration, "map_time_h": None if np.isnan(times[0]) else times[0],
            "p05_h": float(q05) if np.isfinite(q05) else None, "p95_h": float(q95) if np.isfinite(q95) else None,
            "fraction_reached_within_horizon": float(np.isfinite(post_t).mean()), "warnings": list(post.warnings)}
