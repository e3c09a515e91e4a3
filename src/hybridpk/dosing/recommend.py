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
from .constraints import check_limits
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
    pta_mc_se: float | None = None

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
                "probability_of_target_attainment": self.pta,
                "probability_of_target_attainment_mc_se": self.pta_mc_se, "predicted_exposure": self.exposure,
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


def _candidate(tgt, dose, tau, a_map, b_map, a_s, b_s, ess: float) -> dict:
    """Exposure of one (dose, interval) candidate: MAP value, posterior median/5%/95%, and the probability of
    target attainment over the posterior draws (metric = a + b dose) with its Monte-Carlo standard error
    sqrt(p (1 - p) / ESS)."""
    m = (a_s + b_s * dose).numpy()
    pta = float(np.mean((m >= tgt.low) & (m <= tgt.high)))
    se = math.sqrt(pta * (1 - pta) / ess) if math.isfinite(ess) and ess > 0 else None
    return {"dose_mg": dose, "interval_h": tau, "pta": pta, "pta_mc_se": se,
            "map_exposure": float(a_map[0] + b_map[0] * dose), "median": float(np.median(m)),
            "p05": float(np.quantile(m, 0.05)), "p95": float(np.quantile(m, 0.95))}


def _allowed_doses(raw: float, limits) -> list:
    """The allowed doses next to ``raw`` (mg, the dose that puts the MAP exposure at the target's middle):
    whole multiples of the step between one step and the largest allowed dose."""
    step, top = limits.dose_step, limits.top
    if not math.isfinite(raw) or raw <= 0:   # the history alone reaches the middle: only the smallest dose
        return [step]
    lo = min(max(step, math.floor(raw / step) * step), top)
    return sorted({lo, min(lo + step, top)})


def _choose(tgt, cands: list, warnings=()) -> dict:
    """The candidate whose MAP exposure lies in the window closest to its middle (relative); ties: the smaller
    daily dose, then the order of the candidates (the intervals as given, smaller dose first). Deterministic:
    the posterior draws do not decide. No candidate in the window: HybridPKError naming the nearest allowed
    regimen and its exposure, and the patient's ``warnings``."""
    inside = [c for c in cands if tgt.low <= c["map_exposure"] <= tgt.high]
    if not inside:
        def distance(c):
            return max(tgt.low - c["map_exposure"], c["map_exposure"] - tgt.high)

        near = min(cands, key=distance)
        raise HybridPKError(f"no allowed regimen puts the MAP {tgt.label} in {tgt.low:g}-{tgt.high:g}: the nearest is "
                            f"{near['dose_mg']:g} mg every {near['interval_h']:g} h with MAP {tgt.label} "
                            f"{near['map_exposure']:.1f} (posterior median {near['median']:.1f}); widen the limits "
                            "(maximum dose, dose step, intervals) or review the target"
                            + "".join(f"\n  warning: {w}" for w in warnings))
    return min(inside, key=lambda c: (abs(c["map_exposure"] - tgt.mid) / max(abs(tgt.mid), 1e-12),
                                      c["dose_mg"] * 24 / c["interval_h"], cands.index(c)))


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
    if doses.empty:
        raise HybridPKError("the patient file has no dose record; the dosing history is needed")
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
    interval : dosing interval (h); if None the best of ``intervals``
    duration : infusion duration (h); 0 for bolus/oral; at most the interval (no overlapping infusions)
    dose_step : doses are whole multiples of this (mg); max_dose : cap per dose (mg, at least one step)
    start : time of the first new dose (h; default: last dose + its interval, or last record); within or
        up to 168 h after the patient's records
    posterior : the patient's PatientPosterior when already computed (``estimate_patient``)

    The choice is deterministic (the sampling seed does not change it): for each interval, the allowed doses
    next to the one that puts the MAP exposure at the middle of the window, then the regimen whose MAP
    exposure lies in the window closest to its middle; ties: the smaller daily dose, then the order of
    ``intervals``. The probability of target attainment over the posterior draws is reported with its
    Monte-Carlo error. Invalid limits, or no allowed regimen whose MAP exposure is in the window, raise
    HybridPKError (the latter naming the nearest allowed regimen): a recommendation is never 0 mg, never
    above the maximum, and never overlaps infusions.
    """
    model = dosing_model(model)
    tgt = parse_target(target) if isinstance(target, str) else target
    df = dataset.to_dataframe()
    limits = check_limits(df, intervals=[interval] if interval is not None else list(intervals), duration=duration,
                          dose_step=dose_step, max_dose=max_dose, start=_default_start(df) if start is None else start,
                          n_doses=n_doses)
    post = posterior or estimate_patient(model, dataset, n_samples, seed)
    cands = []
    for tau in limits.intervals:
        a_map, b_map, a_s, b_s = _coefficients(post, tgt, limits.start, tau, limits.duration)
        raw = (tgt.mid - float(a_map[0])) / float(b_map[0])
        for d in _allowed_doses(raw, limits):
            cands.append(_candidate(tgt, d, tau, a_map, b_map, a_s, b_s, post.ess))
    choice = _choose(tgt, cands, post.warnings)
    warns = list(post.warnings) + safety.check_dose(choice["dose_mg"], limits.max_dose)
    regimen = Regimen(limits.start, choice["dose_mg"], choice["interval_h"], limits.n_doses, limits.duration)
    return Recommendation(model=model.name, regimen=regimen, target=str(target), exposure=_exposure(tgt, choice),
                          pta=choice["pta"], map_parameters=post.parameters(), warnings=tuple(warns),
                          records=regimen.records(df.ID.iloc[0]), candidates=cands, pta_mc_se=choice["pta_mc_se"])


def interval_for_dose(model, dataset, dose: float, target, *, intervals=(6.0, 8.0, 12.0, 24.0, 36.0, 48.0),
                      duration: float = 1.0, n_samples: int = 1000, seed: int = 0,
                      posterior: PatientPosterior | None = None) -> Recommendation:
    """The dosing interval (from ``intervals``, h) that best keeps ``target`` in its window with a fixed
    ``dose`` (mg): highest probability of target attainment, then the prediction closest to the middle."""
    model = dosing_model(model)
    tgt = parse_target(target) if isinstance(target, str) else target
    df = dataset.to_dataframe()
    last = float(df[df.EVID.isin([1, 4])].TIME.max())
    d = _number_check(dose)
    check_limits(df, intervals=list(intervals), duration=duration, dose_step=d, max_dose=None, start=last,
                 n_doses=10)
    post = posterior or estimate_patient(model, dataset, n_samples, seed)
    best, cands = None, []
    for tau in intervals:
        cands.append(_candidate(tgt, dose, tau, *_coefficients(post, tgt, last + tau, tau, duration), post.ess))
        key = (round(cands[-1]["pta"], 6), -abs(cands[-1]["map_exposure"] - tgt.mid))
        if best is None or key > best[0]:
            best = (key, cands[-1])
    c = best[1]
    regimen = Regimen(last + c["interval_h"], dose, c["interval_h"], 10, duration)
    return Recommendation(model=model.name, regimen=regimen, target=str(target), exposure=_exposure(tgt, c),
                          pta=c["pta"], map_parameters=post.parameters(), warnings=post.warnings,
                          records=regimen.records(df.ID.iloc[0]), candidates=cands, pta_mc_se=c["pta_mc_se"])


def _number_check(dose) -> float:
    try:
        d = float(dose)
    except (TypeError, ValueError):
        d = math.nan
    if not math.isfinite(d) or d <= 0:
        raise HybridPKError(f"dose = {dose!r}: the dose must be a number > 0 (mg)")
    return d


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
